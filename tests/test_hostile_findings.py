"""The findings of the hostile tester's issue 30, each a test that failed before its fix:

  * many processes taking over one stale lock at the same moment: exactly one holds it;
  * a lock file of garbage bytes is refused naming it;

Self-contained: the small helpers are local (tests/ is being reorganised around shared helpers).
"""

import json
import multiprocessing
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from rwkv_jax.io import workdir_lock

# --- One holder of the workdir lock ---------------------------------------------------------------------

LOCK_PROCESSES, LOCK_ROUNDS, LOCK_HOLD_S = 8, 20, 0.2


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped) on this host."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock_racer(workdir, start, done, holders, peak, taken):
    """One of the racing processes: at each round's barrier, try to take the lock; hold it a moment."""
    for _ in range(LOCK_ROUNDS):
        try:
            start.wait()
        except threading.BrokenBarrierError:
            return
        try:
            path = workdir_lock.acquire(workdir)
        except workdir_lock.WorkdirLockedError:
            path = None
        if path is not None:
            with holders.get_lock():
                holders.value += 1
                peak.value = max(peak.value, holders.value)
                taken.value += 1
            time.sleep(LOCK_HOLD_S)
            with holders.get_lock():
                holders.value -= 1
            workdir_lock.release(path)
        try:
            done.wait()
        except threading.BrokenBarrierError:
            return


def test_a_stale_lock_raced_for_by_many_processes_has_one_holder(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Barrier(LOCK_PROCESSES + 1), ctx.Barrier(LOCK_PROCESSES + 1)
    holders, peak, taken = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
    racers = [ctx.Process(target=_lock_racer, args=(str(tmp_path), start, done, holders, peak, taken))
              for _ in range(LOCK_PROCESSES)]
    for p in racers:
        p.start()
    stale = {"host": socket.gethostname(), "pid": dead_pid(), "started": "2020-01-01T00:00:00+00:00"}
    try:
        for round_ in range(LOCK_ROUNDS):
            (tmp_path / workdir_lock.LOCK_NAME).write_text(json.dumps(stale))
            start.wait(timeout=60)
            done.wait(timeout=60)
            assert taken.value == round_ + 1, f"round {round_}: the lock was taken {taken.value} times so far"
            assert peak.value == 1, f"round {round_}: {peak.value} processes held the lock at once"
    finally:
        start.abort()  # a failed round: the racers leave their barriers instead of waiting for it
        done.abort()
        for p in racers:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in racers)


def test_a_lock_of_garbage_bytes_is_refused_naming_the_file(tmp_path):
    lock = tmp_path / workdir_lock.LOCK_NAME
    lock.write_bytes(b"\x90\xff\x00garbage")
    with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"locked by {re.escape(str(lock))}, which does "
                                                              "not name its owner: .* delete that file"):
        workdir_lock.acquire(tmp_path)
    assert lock.read_bytes() == b"\x90\xff\x00garbage"
