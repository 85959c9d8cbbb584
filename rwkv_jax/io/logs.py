"""Where log records go when a command runs: the console shows our progress lines (plain prints), our
warnings and everyone's errors but orbax's (rwkv_jax.io.checkpoint reports its failures); INFO records
(orbax reports every save and restore, ~150 lines in a short run) and third-party warnings (TFDS on a
dataset it builds, ...) go to a file such as WORKDIR/train.log.
absl's `--verbosity` (`-v`), `--logger_levels`, `--alsologtostderr` or
`--stderrthreshold` on the command line bring them back to the console.

    logs.quiet_console()              # cli.run does this once the flags are parsed
    logs.log_to_file(workdir.log_path)  # the trainer, once its workdir is known: the buffered records too
"""

import contextlib
import io
import logging
import os

from absl import flags
from absl import logging as absl_logging

_CONSOLE_FLAGS = ("verbosity", "logger_levels", "alsologtostderr", "logtostderr", "stderrthreshold")
_BUFFER_LIMIT = 10_000  # records kept until a file is named


class _Buffer(logging.Handler):
    """Holds INFO records until `log_to_file` names their file (the first ones come before it is known)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        if len(self.records) < _BUFFER_LIMIT:
            self.records.append(record)


_state = {"buffer": None, "file": None}
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # rwkv_jax/


def _console_filter(record: logging.LogRecord) -> bool:
    """Our warnings, and errors from anywhere but orbax; third-party warnings only in the file. Orbax logs
    every failure of a save or restore from each of its threads with a traceback (32 to 127 of them for
    one failed save, ~1,000 lines): rwkv_jax.io.checkpoint reports each such failure as one error."""
    path = os.path.abspath(record.pathname)
    if path.startswith(_PACKAGE_DIR):
        return True
    return record.levelno >= logging.ERROR and _ORBAX_DIR not in path


_ORBAX_DIR = f"{os.sep}orbax{os.sep}checkpoint{os.sep}"


def console_verbosity_requested() -> bool:
    """Whether the command line set one of absl's logging flags."""
    return flags.FLAGS.is_parsed() and any(name in flags.FLAGS and flags.FLAGS[name].present
                                           for name in _CONSOLE_FLAGS)


def quiet_console() -> None:
    """Console: warnings and errors only, unless the user asked for more with absl's flags; INFO records
    are kept for `log_to_file`."""
    if console_verbosity_requested() or _state["buffer"] is not None:
        return
    handler = absl_logging.get_absl_handler()
    handler.setLevel(logging.WARNING)
    handler.addFilter(_console_filter)
    _state["buffer"] = _Buffer()
    logging.getLogger().addHandler(_state["buffer"])


def log_to_file(path) -> None:
    """Append every INFO+ record (the buffered ones first) to `path` from now on."""
    root = logging.getLogger()
    if _state["file"] is not None:
        root.removeHandler(_state["file"])
        _state["file"].close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
    buffer = _state["buffer"]
    if buffer is not None:
        root.removeHandler(buffer)
        for record in buffer.records:
            handler.handle(record)
        buffer.records.clear()
        _state["buffer"] = None
    root.addHandler(handler)
    _state["file"] = handler


class _LogLines(io.TextIOBase):
    """A text stream whose lines become INFO records of `logger`."""

    def __init__(self, logger: str):
        self._logger = logging.getLogger(logger)

    def write(self, text):
        for line in text.splitlines():
            if line.strip():
                self._logger.info("%s", line)
        return len(text)


@contextlib.contextmanager
def third_party_output(logger: str):
    """Inside: what a library prints to stdout becomes INFO records of `logger` (so it lands in the log
    file, not between our progress lines), and TFDS shows no progress bars."""
    import tensorflow_datasets as tfds
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(_LogLines(logger)):
            yield
    finally:
        tfds.display_progress_bar(True)
