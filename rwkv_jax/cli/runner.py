"""One command-line style for every entry point (train, eval, generate, convert, make_binidx): absl flags,
and expected errors as one line.

    from rwkv_jax.cli import runner as cli
    def main(argv): ...
    if __name__ == "__main__":
        cli.run(main)

Console: our progress lines and warnings; INFO logging (orbax's, ...) goes to the run's train.log, or
to the console with absl's --verbosity=0 / --logger_levels / --alsologtostderr (rwkv_jax.io.logs).

JAX's start (`prepare_jax`, before JAX is loaded): on a host without an accelerator (no TPU, GPU or JAX
plugin found) JAX_PLATFORMS=cpu, so that an installed libtpu (the --compile_only extra) is not woken to
print its init errors; on CPU, XLA's C++ warnings are filtered (TF_CPP_MIN_LOG_LEVEL=2: the train step's
small-heap option warns for every buffer larger than a heap). Variables the user set are left alone.

Exit codes: 0 success; 2 a usage error (a bad flag or flag value: raise `cli.UsageError`); 1 an expected
runtime error (bad input file, missing checkpoint, refused resume, ...), printed as one line
`PROG: error: MESSAGE`. `--traceback` (or RWKV_JAX_TRACEBACK=1) shows the full trace instead. Anything
that is not an expected error is a bug and keeps its traceback.
"""

import glob
import importlib.util
import logging
import os
import sys
import threading

from absl import app, flags

from rwkv_jax.io import logs

_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full Python traceback of an error instead of one "
                               "line (also RWKV_JAX_TRACEBACK=1).")

# Errors that bad input or a bad environment cause: reported as one line. Library code raises these with a
# message that names the file or value and the fix.
EXPECTED_ERRORS = (ValueError, OSError, RuntimeError, ImportError, KeyError)


class UsageError(app.UsageError):
    """A bad command line: one line `PROG: error: MESSAGE` and a pointer to --help, exit code 2."""

    def __init__(self, message: str):
        super().__init__(message, exitcode=2)


# Device files of accelerators JAX may use: NVIDIA (jax.hardware_utils' list), AMD ROCm, TPU v2-v4
# (/dev/accel*) and TPU v5e and later (/dev/vfio/N).
_ACCELERATOR_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd", "/dev/accel*", "/dev/vfio/[0-9]*")
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on the PCI bus (what JAX checks before suggesting libtpu)


def has_accelerator() -> bool:
    """Whether this host may have a device JAX can use besides its CPU: an accelerator's device file, a
    Google PCI device, or a JAX plugin package (CUDA, ROCm, Metal, ...) installed."""
    if any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if open(vendor).read().strip() == _GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return importlib.util.find_spec("jax_plugins") is not None


def prepare_jax() -> None:
    """Set JAX's environment before it is loaded (see the module docstring); no-op once it is."""
    if "jax" in sys.modules:
        return
    if "JAX_PLATFORMS" not in os.environ and not has_accelerator():
        os.environ["JAX_PLATFORMS"] = "cpu"
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _ClosedLoopTracebacksDropped:
    """sys.stderr, less the tracebacks of RuntimeError('Event loop is closed') that tensorstore prints from
    C (past sys.excepthook) for each of its writes that completes after orbax's save has failed and closed
    its event loop: tens to hundreds of them, while the failed save is reported once, as an error line.
    A traceback is held until its exception line (per thread: threads print at the same time), then
    written, or logged to the log file when it is that one."""

    _HEADER, _DROPPED = "Traceback (most recent call last):", "RuntimeError: Event loop is closed"

    def __init__(self, stream):
        self._stream = stream
        self._pending: dict[int, str] = {}

    def write(self, text):
        ident = threading.get_ident()
        held = self._pending.pop(ident, None)
        if held is None and not text.startswith(self._HEADER):
            return self._stream.write(text)
        held = (held or "") + text
        lines = held.split("\n")
        last = next((line for line in lines[1:-1] if line and not line[0].isspace()), None)
        if last is None:  # the exception line is not there yet
            self._pending[ident] = held
        elif last == self._DROPPED:
            logging.info("a write completed after its event loop was closed (a failed save)")
        else:
            self._stream.write(held)
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def want_traceback() -> bool:
    env = os.environ.get("RWKV_JAX_TRACEBACK", "").lower() not in ("", "0", "false", "no")
    return env or (flags.FLAGS.is_parsed() and _TRACEBACK.value)


def prog_name() -> str:
    return os.path.basename(sys.argv[0]) or "rwkv_jax"


def error_line(e: BaseException) -> str:
    """The one-line form of an expected error: its message, newlines folded."""
    message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    message = " ".join(part.strip() for part in message.splitlines() if part.strip())
    return message or type(e).__name__


def _guarded(main):
    def wrapped(argv):
        try:
            return main(argv)
        except app.UsageError as e:  # absl would print the whole flag help before the message
            sys.stderr.write(f"{prog_name()}: error: {error_line(e)}\n"
                             f"{prog_name()}: (pass --helpshort or --helpfull to see help on flags)\n")
            sys.exit(e.exitcode if isinstance(e.exitcode, int) else 2)
        except KeyboardInterrupt:
            if want_traceback():
                raise
            sys.stderr.write(f"\n{prog_name()}: interrupted\n")
            sys.exit(130)
        except EXPECTED_ERRORS as e:
            if want_traceback():
                raise
            sys.stderr.write(f"{prog_name()}: error: {error_line(e)}\n")
            sys.stderr.write(f"{prog_name()}: (run with --traceback for the full trace)\n")
            sys.exit(1)
    return wrapped


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, a bad flag or flag value exiting with code 2 (a usage error) and one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.stderr.write(f"{prog_name()}: error: {error_line(e)}\n"
                         f"{prog_name()}: (pass --helpshort or --helpfull to see help on flags)\n")
        sys.exit(2)


_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def _help_exits_zero(parser):
    """absl exits with status 1 after printing --help; asking for help is no error."""
    def parse(argv):
        try:
            return parser(argv)
        except SystemExit as e:
            if e.code == 1 and any(arg in _HELP_FLAGS for arg in argv[1:]):
                sys.exit(0)
            raise
    return parse


def _show_in_help(main, shared_flags) -> None:
    """--help shows the main module's docstring and flags; the command's are in the package (the scripts
    and console scripts that call it are thin)."""
    command_doc = sys.modules[main.__module__].__doc__
    if command_doc and "__main__" in sys.modules:
        sys.modules["__main__"].__doc__ = command_doc
    program = sys.argv[0]
    for flag in [*flags.FLAGS.get_key_flags_for_module(main.__module__), *shared_flags, _TRACEBACK]:
        flags.FLAGS.register_key_flag_for_module(program, flags.FLAGS[flag.name])


def run(main, *, flags_parser=None, shared_flags=()):
    """`absl.app.run(main)` with expected errors reported as one line (see the module docstring).
    `shared_flags`: FlagHolders defined elsewhere that --help should list with main's module's flags."""
    prepare_jax()
    guarded = _guarded(main)

    def quiet_main(argv):
        logs.quiet_console()
        sys.stderr = _ClosedLoopTracebacksDropped(sys.stderr)
        return guarded(argv)

    _show_in_help(main, shared_flags)
    app.run(quiet_main, flags_parser=_help_exits_zero(flags_parser or parse_flags))


def call(main, argv: list[str], *, flags_parser=None) -> int:
    """Run `main` on the command line `argv` (argv[0]: the program) as `run` does, in this process, and
    return the exit code; the flags are reset before and after. For tests."""
    flags.FLAGS.unparse_flags()
    saved_argv, sys.argv = sys.argv, list(argv)
    try:
        remaining = (flags_parser or parse_flags)(list(argv))
        _guarded(main)(remaining)
    except app.UsageError as e:
        sys.stderr.write(f"{prog_name()}: usage error: {e}\n")
        return e.exitcode
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        flags.FLAGS.unparse_flags()
        sys.argv = saved_argv
    return 0
