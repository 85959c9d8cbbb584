"""One trainer per workdir: a lock file, WORKDIR/train.lock, that holds the owner's host, pid and start time.

    with workdir_lock.hold(workdir):
        ...train...

A second trainer on the same workdir is refused with one line naming the holder. A lock left by a
process that no longer runs on this host (SIGKILL, power loss) is stale: it is taken over with a
warning. A lock from another host cannot be checked from here: the error says how to remove it by hand.

How the lock is taken, atomically:
  * A free workdir: the lock file is created with O_CREAT | O_EXCL, one atomic operation on local
    filesystems, NFS v3+ and the FUSE filesystems a pod mounts; of processes racing for it, one creates it.
  * A stale lock (its owner ran on this host and is gone): the takeover re-reads the lock and removes it
    while holding `fcntl.flock` on a guard file beside it (TAKEOVER_NAME, created on the first takeover and
    kept), then creates its own lock with O_EXCL as above. Only takeovers remove another process's lock,
    and they are serialised by the guard, so the lock re-read under the guard is still the one removed: a
    racer that comes second finds the winner's fresh lock (refused) or none (it races with O_EXCL). Without
    the guard, a racer's re-read-then-unlink deleted the lock another racer had just created, and 2 to 6
    processes held the workdir at once.
Why flock for the guard alone: a stale lock is only taken over by processes of the host that wrote it (the
pid can be checked there only), so the guard needs to exclude processes of one host, which flock does on
every filesystem (NFS maps it to byte-range locks, FUSE without lock support locks in the local kernel).
The lock itself stays a file that exists while it is held, naming its owner: flock is not seen across
hosts on some shared filesystems (gcsfuse), and the owner's name is what a refusal prints.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from absl import logging

from rwkv_jax.io import workdir as workdir_layout

LOCK_NAME = workdir_layout.LOCK
TAKEOVER_NAME = workdir_layout.LOCK + ".takeover"  # flock'ed while a stale lock is replaced


class WorkdirLockedError(RuntimeError):
    """Another live trainer holds the workdir."""


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def _read(path: Path) -> tuple[str, dict]:
    """(raw text, parsed owner) of a lock file; an unreadable or half-written one parses as {}."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")  # garbage: no owner
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
            text, owner = _read_settled(path)
            here = owner.get("host") == socket.gethostname()
            if not text and not path.exists():
                continue  # released meanwhile: try again
            if here and owner.get("pid") == os.getpid():
                raise WorkdirLockedError(f"workdir {workdir} is already locked by this process ({path})") from None
            if here and not _alive(owner.get("pid")):
                _remove_stale(path, text, owner)
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


def _read_settled(path: Path) -> tuple[str, dict]:
    """`_read`, waiting a moment for a lock that its creator has not written yet (created empty by O_EXCL,
    filled right after)."""
    for _ in range(20):
        text, owner = _read(path)
        if text or not path.exists():
            break
        time.sleep(0.01)
    return text, owner


def _remove_stale(path: Path, text: str, owner: dict) -> None:
    """Remove the stale lock `path` (read as `text`) if it is still that one, under the takeover guard."""
    guard_path = path.with_name(TAKEOVER_NAME)
    try:
        with open(guard_path, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                if _read(path)[0] == text:  # still the stale lock: no other takeover replaced it meanwhile
                    logging.warning("taking over the stale lock %s of a process that no longer runs (%s)",
                                    path, _describe(owner))
                    path.unlink()
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)
    except OSError as e:
        raise OSError(e.errno, f"cannot take over the stale lock {path} ({_describe(owner)}): {e.strerror} "
                      f"({guard_path}); if no trainer uses the workdir, delete {path}") from e


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
