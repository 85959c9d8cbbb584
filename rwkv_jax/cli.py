"""One command-line style for every entry point (train, eval, generate, convert, make_binidx): absl flags,
and expected errors as one line.

    from rwkv_jax import cli
    def main(argv): ...
    if __name__ == "__main__":
        cli.run(main)

Exit codes: 0 success; 2 a usage error (a bad flag or flag value: raise `cli.UsageError`); 1 an expected
runtime error (bad input file, missing checkpoint, refused resume, ...), printed as one line
`PROG: error: MESSAGE`. `--traceback` (or RWKV_JAX_TRACEBACK=1) shows the full trace instead. Anything
that is not an expected error is a bug and keeps its traceback.
"""

import os
import sys

from absl import app, flags

_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full Python traceback of an error instead of one "
                               "line (also RWKV_JAX_TRACEBACK=1).")

# Errors that bad input or a bad environment cause: reported as one line. Library code raises these with a
# message that names the file or value and the fix.
EXPECTED_ERRORS = (ValueError, OSError, RuntimeError, ImportError, KeyError)


class UsageError(app.UsageError):
    """A bad command line: absl prints the message with a pointer to --help, exit code 2."""

    def __init__(self, message: str):
        super().__init__(message, exitcode=2)


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
        except app.UsageError:
            raise
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


def run(main, *, flags_parser=None):
    """`absl.app.run(main)` with expected errors reported as one line (see the module docstring)."""
    kwargs = {"flags_parser": flags_parser} if flags_parser else {}
    app.run(_guarded(main), **kwargs)
