"""Multi-host start-up: `jax.distributed` from explicit flags or from the launcher's environment.

  * explicit: coordinator address, number of processes and this process's id (any launcher, or by hand);
  * auto: `jax.distributed.initialize()` detects Cloud TPU pods, SLURM and Open MPI by itself;
  * neither: a single process.
"""

import os
import socket
import time

import jax

# Environment variables by which jax.distributed.initialize() recognises a multi-process launch.
_LAUNCHER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               timeout_s: int = 300, auto: bool = False) -> None:
    """Join the job's processes, or do nothing for a single-process run. Raises RuntimeError naming the
    coordinator and the fix when the peers do not come within `timeout_s`."""
    explicit = bool(coordinator_address) or num_processes > 1
    if not explicit and not (auto and any(v in os.environ for v in _LAUNCHER_ENV)):
        return
    if explicit and not (coordinator_address and num_processes > 0 and process_id >= 0):
        raise ValueError("multi-host flags go together: --coordinator_address=HOST:PORT --num_processes=N "
                         f"--process_id=I (got {coordinator_address!r}, {num_processes}, {process_id})")
    if explicit and num_processes > 1:
        # jax aborts the whole process (SIGABRT, no exception) when its initialization times out, so
        # first wait for every process over plain TCP on the coordinator's port, where a timeout can raise.
        _rendezvous(coordinator_address, num_processes, process_id, timeout_s)
    try:
        if explicit:
            jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                       process_id=process_id, initialization_timeout=timeout_s)
        else:
            jax.distributed.initialize(initialization_timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - jax raises several types here; all mean the same to the user
        where = f"coordinator {coordinator_address}, process {process_id} of {num_processes}" if explicit \
            else "the launcher's environment"
        raise _start_error(where, timeout_s, e) from e


_HELLO, _GO = b"rwkv-jax hello %d\n", b"rwkv-jax go\n"


def _start_error(where: str, timeout_s, what) -> RuntimeError:
    return RuntimeError(
        f"jax.distributed could not start ({where}) within {timeout_s}s: {what}\n"
        "Check that every process was started with the same coordinator address and process count, "
        "that the coordinator (process 0) is reachable on that port, and that each id is unique.")


def _rendezvous(coordinator_address: str, num_processes: int, process_id: int, timeout_s: float) -> None:
    """All processes meet on the coordinator's port before jax binds it; RuntimeError after `timeout_s`."""
    host, port = coordinator_address.rsplit(":", 1)
    host, port = host.strip("[]"), int(port)
    deadline = time.monotonic() + timeout_s
    where = f"coordinator {coordinator_address}, process {process_id} of {num_processes}"
    fail = lambda what: _start_error(where, timeout_s, what)
    if process_id == 0:
        family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
        peers = {}
        try:
            server = socket.create_server(("", port), family=family, dualstack_ipv6=family == socket.AF_INET6)
        except OSError as e:
            raise fail(f"cannot listen on port {port} ({e}); is another job using it?") from e
        with server:
            try:
                while len(peers) < num_processes - 1:
                    server.settimeout(max(deadline - time.monotonic(), 0.001))
                    try:
                        conn, _ = server.accept()
                    except TimeoutError:
                        missing = sorted(set(range(1, num_processes)) - set(peers))
                        raise fail(f"process(es) {missing} did not join") from None
                    conn.settimeout(max(deadline - time.monotonic(), 0.001))
                    try:
                        line = conn.makefile("rb").readline()
                        peer = int(line.split()[-1]) if line.startswith(_HELLO.split(b" %d")[0]) else -1
                    except (OSError, ValueError):
                        peer = -1
                    if not 0 < peer < num_processes or peer in peers:
                        conn.close()  # not one of ours, or a duplicate id
                        continue
                    peers[peer] = conn
                for conn in peers.values():
                    conn.sendall(_GO)
                for conn in peers.values():  # let each peer close first
                    conn.settimeout(max(deadline - time.monotonic(), 1.0))
                    try:
                        conn.recv(1)
                    except OSError:
                        pass
            finally:
                for conn in peers.values():
                    conn.close()
        return
    while True:
        try:
            timeout = max(min(deadline - time.monotonic(), 5), 0.001)
            with socket.create_connection((host, port), timeout=timeout) as conn:
                conn.sendall(_HELLO % process_id)
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                if conn.makefile("rb").readline() == _GO:
                    return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise fail(f"the coordinator did not answer with all {num_processes} processes present")
        time.sleep(0.25)
