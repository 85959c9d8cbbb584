"""One trainer per workdir: a lock file, WORKDIR/train.lock, that holds the owner's host, pid and start time.

    with workdir_lock.hold(workdir):
        ...train...

A second trainer on the same workdir is refused with one line naming the holder. A lock left by a
process that no longer runs on this host (SIGKILL, power loss) is stale: it is taken over with a
warning. A lock from another host cannot be checked from here: the error says how to remove it by hand.

The lock is created with O_CREAT | O_EXCL, which is atomic on local filesystems and NFS v3+. Taking over
a stale lock re-reads it just before removing it, so a lock that a live process has just written is
never removed (two processes racing for the same stale lock: one wins, the other is refused).
"""

import contextlib
import datetime
import json
import os
import socket
import sys
from pathlib import Path

from absl import logging

from rwkv_jax.io import workdir as workdir_layout

LOCK_NAME = workdir_layout.LOCK


class WorkdirLockedError(RuntimeError):
    """Another live trainer holds the workdir."""


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def _read(path: Path) -> tuple[str, dict]:
    """(raw text, parsed owner) of a lock file; an unreadable or half-written one parses as {}."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return "", {}
    try:
        owner = json.loads(text)
    except ValueError:
        owner = {}
    return text, owner if isinstance(owner, dict) else {}


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _describe(owner: dict) -> str:
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started "
            f"{owner.get('started', '?')}")


def acquire(workdir) -> Path:
    """Create WORKDIR/train.lock for this process, taking over a stale one; returns its path. Raises
    WorkdirLockedError when a live trainer holds it, OSError (naming the workdir) when it cannot be written."""
    path = Path(workdir) / LOCK_NAME
    mine = json.dumps(_owner())
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            text, owner = _read(path)
            here = owner.get("host") == socket.gethostname()
            if not text and not path.exists():
                continue  # released meanwhile: try again
            if here and owner.get("pid") == os.getpid():
                raise WorkdirLockedError(f"workdir {workdir} is already locked by this process ({path})") from None
            if here and not _alive(owner.get("pid")):
                if _read(path)[0] == text:  # still the stale lock, not one a live process just wrote
                    logging.warning("taking over the stale lock %s of a process that no longer runs (%s)",
                                    path, _describe(owner))
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                continue
            if not owner:
                raise WorkdirLockedError(
                    f"workdir {workdir} is locked by {path}, which does not name its owner: if no trainer "
                    "uses this workdir, delete that file") from None
            hint = ("" if here else f"; if that process is gone, delete {path}")
            raise WorkdirLockedError(f"workdir {workdir} is in use by another trainer ({_describe(owner)}): "
                                     f"wait for it to finish, stop it, or use another --workdir{hint}") from None
        except OSError as e:
            raise OSError(e.errno, f"cannot lock workdir {workdir}: {e.strerror} ({path}); the workdir must "
                          "be a writable directory") from e
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        return path
    raise WorkdirLockedError(f"workdir {workdir}: could not take the lock {path} (other processes keep "
                             "taking it); try again")


def release(path: Path) -> None:
    """Remove the lock if it is still this process's own."""
    _, owner = _read(path)
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_writable(directory) -> None:
    """OSError naming `directory` unless a file can be created in it: a run that could not save its first
    checkpoint hours later is refused at its start instead."""
    probe = Path(directory) / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"cannot write in {directory}: {e.strerror}; checkpoints could not be saved "
                      "there (fix its permissions or free space, or use another --workdir)") from e


@contextlib.contextmanager
def hold(workdir, enabled: bool = True):
    """Hold the workdir's lock for the duration of the block (`enabled=False`: do nothing, e.g. on
    processes other than 0 of a multi-host run)."""
    path = acquire(workdir) if enabled else None
    try:
        yield path
    finally:
        if path is not None:
            release(path)
