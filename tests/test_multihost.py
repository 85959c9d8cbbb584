"""Multi-host training on localhost: two `train.py` processes (CPU, gloo collectives, 2 simulated devices
each) joined through `jax.distributed` train in lockstep with the same losses as one process holding the
same 4 devices; and `rwkv_jax.train.distributed.initialize` fails with a clear RuntimeError, within its
timeout, when a peer never comes.

Every subprocess has a timeout and is killed at the end of its test whatever happens.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rwkv_jax.train import distributed

REPO = Path(__file__).resolve().parents[1]
# Opt level 0 only shortens XLA:CPU compiles; both runs compared use the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"
NUM_STEPS = 4
RUN_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with_devices(n: int) -> dict:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags += [FAST_COMPILE, f"--xla_force_host_platform_device_count={n}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), PYTHONUNBUFFERED="1")
    for var in distributed._LAUNCHER_ENV:  # a CI runner under SLURM must not look like a multi-host job
        env.pop(var, None)
    return env


@contextlib.contextmanager
def processes():
    """Yields a list to append (Popen, log file) to; on exit every process still alive is killed."""
    started = []
    try:
        yield started
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc, log in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            log.close()


def start(started, args, env, log_path: Path):
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    started.append((proc, log))
    return proc


def wait_all(procs_and_logs, deadline: float):
    for proc, log_path in procs_and_logs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{log_path.name} still running after its timeout:\n{tail(log_path)}")
    for proc, log_path in procs_and_logs:
        assert proc.returncode == 0, f"{log_path.name} exited with {proc.returncode}:\n{tail(log_path)}"


def tail(path: Path, n: int = 8000) -> str:
    text = path.read_text(errors="replace")
    # Orbax and absl INFO lines drown the interesting part.
    lines = [line for line in text.splitlines() if not line.startswith(("I1", "I0"))]
    return "\n".join(lines)[-n:]


def make_corpus(directory: Path) -> None:
    """About 270 KB of seeded word salad in 40 documents (deterministic, independent of the checkout)."""
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(600)]
    directory.mkdir()
    for i in range(40):
        lines = [" ".join(rng.choice(words, rng.integers(4, 14))) for _ in range(80)]
        (directory / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")


def train_args(workdir: Path, corpus: Path, data_dir: Path, sampling: str = "random") -> list[str]:
    return [
        "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
        "--config.model.vocab_size=512", "--config.model.d_model=64", "--config.model.n_layer=2",
        "--config.data.source=text", f"--config.data.text_files={corpus}", f"--config.data.data_dir={data_dir}",
        "--config.data.validation_fraction=0.25", "--config.data.sp_vocab_size=512",
        "--config.data.sp_wait_timeout_s=120",
        "--config.train.batch_size=8", "--config.train.seq_len=32", f"--config.train.num_steps={NUM_STEPS}",
        "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.eval_batches=1",
        "--config.checkpoint.every_steps=2", f"--config.data.sampling={sampling}",
    ]


def read_metrics(workdir: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"]


def final_line(log_path: Path) -> str:
    finals = [line for line in log_path.read_text().splitlines() if line.startswith("final:")]
    assert len(finals) == 1, tail(log_path)
    return finals[0]


def token_caches_ready(data_dir: Path) -> bool:
    """Whether the tokenizer and both token caches (train, validation) are complete in `data_dir`."""
    return len(list(data_dir.glob("token_cache/*/*.tokens.json"))) >= 2


# Streams: each process reads its rows' streams and carries its rows' state (slow: a second pair of runs).
@pytest.mark.parametrize("sampling", ["random", pytest.param("streams", marks=pytest.mark.slow)])
def test_two_processes_train_like_one(tmp_path, sampling):
    corpus, data_dir = tmp_path / "corpus", tmp_path / "data"
    make_corpus(corpus)
    multi_dir, single_dir = tmp_path / "two_processes", tmp_path / "one_process"
    port = free_port()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    logs = [tmp_path / "process0.log", tmp_path / "process1.log"]
    single_log = tmp_path / "single.log"
    with processes() as started:
        # Two processes x 2 devices, a fresh data_dir: process 0 builds the dataset and trains the
        # tokenizer while process 1 waits for it; both write the checkpoints together.
        multi = [start(started, train_args(multi_dir, corpus, data_dir, sampling) + [
                     f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                     "--distributed_timeout_s=120"], env_with_devices(2), logs[i]) for i in range(2)]
        wait_all(list(zip(multi, logs)), deadline)
        assert token_caches_ready(data_dir)
        # One process x 4 devices, the same config (reusing the tokenizer and token caches). Run after,
        # not beside, the two: on a 2-core runner overlapping them measured slower (72 s against 53 s).
        single = start(started, train_args(single_dir, corpus, data_dir, sampling), env_with_devices(4), single_log)
        wait_all([(single, single_log)], time.monotonic() + RUN_TIMEOUT_S)

    assert "devices: 4 x cpu in 2 process(es)" in logs[0].read_text()
    assert "devices: 4 x cpu in 1 process(es)" in single_log.read_text()

    multi_train, multi_eval = read_metrics(multi_dir)
    single_train, single_eval = read_metrics(single_dir)
    assert [r["step"] for r in multi_train] == list(range(1, NUM_STEPS + 1))
    assert [r["step"] for r in single_train] == list(range(1, NUM_STEPS + 1))
    losses_multi = [r["loss"] for r in multi_train]
    losses_single = [r["loss"] for r in single_train]
    assert len(set(losses_multi)) == NUM_STEPS, losses_multi  # it trains: every step's loss differs
    np.testing.assert_allclose(losses_multi, losses_single, rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in multi_train], [r["grad_norm"] for r in single_train],
                               rtol=1e-4)
    assert len(multi_eval) == len(single_eval) == 1
    np.testing.assert_allclose(multi_eval[0]["eval_loss"], single_eval[0]["eval_loss"], rtol=1e-5)
    assert multi_eval[0]["eval_tokens"] == single_eval[0]["eval_tokens"]

    # Lockstep: both processes finished the same step with the same loss (process 1 reports it on its
    # own stdout; only process 0 writes metrics).
    f0, f1 = final_line(logs[0]), final_line(logs[1])
    assert f0 == f1 and f"'step': {NUM_STEPS}" in f0, (f0, f1)
    # Only process 0 writes metrics and the config; the checkpoints are written collectively.
    assert (multi_dir / "config.json").is_file()
    steps = sorted(int(p.name) for p in (multi_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4], steps


# --- Start-up failures ---------------------------------------------------------------------------

_INIT_SCRIPT = """
import sys, time
from rwkv_jax.train import distributed
start = time.monotonic()
try:
    distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), timeout_s=int(sys.argv[4]))
except RuntimeError as e:
    print(f"RUNTIME_ERROR after {time.monotonic() - start:.1f}s: {e}", flush=True)
    sys.exit(3)
print("JOINED", flush=True)
"""


TIMEOUT_S = 3
WHO = {0: "the coordinator waits for a peer that never comes",
       1: "a worker waits for a coordinator that never comes"}


@pytest.fixture(scope="module")
def lonely_processes(tmp_path_factory):
    """{process_id: (returncode, seconds, output)} of a 2-process initialize where only that one comes;
    both cases run at the same time (different ports)."""
    tmp = tmp_path_factory.mktemp("lonely")
    results = {}
    with processes() as started:
        begin = time.monotonic()
        runs = {}
        for process_id in WHO:
            address = f"127.0.0.1:{free_port()}"
            log_path = tmp / f"process{process_id}.log"
            proc = start(started, ["-c", _INIT_SCRIPT, address, "2", str(process_id), str(TIMEOUT_S)],
                         env_with_devices(1), log_path)
            runs[process_id] = (proc, address, log_path)
        for process_id, (proc, address, log_path) in runs.items():
            try:
                proc.wait(timeout=max(1.0, begin + TIMEOUT_S + 60 - time.monotonic()))
            except subprocess.TimeoutExpired:
                results[process_id] = (None, None, address, tail(log_path))
                continue
            results[process_id] = (proc.returncode, time.monotonic() - begin, address,
                                   log_path.read_text(errors="replace"))
    return results


@pytest.mark.parametrize("process_id", sorted(WHO))
def test_initialize_times_out_with_a_clear_error(lonely_processes, process_id):
    who = WHO[process_id]
    returncode, elapsed, address, output = lonely_processes[process_id]
    assert returncode is not None, f"{who}: initialize still blocked 60s after a {TIMEOUT_S}s timeout"
    assert returncode == 3, f"{who}: rc {returncode}\n{output[-6000:]}"
    message = next(line for line in output.splitlines() if line.startswith("RUNTIME_ERROR"))
    assert address in message and f"process {process_id} of 2" in message and f"{TIMEOUT_S}s" in message, message
    # Within the timeout, plus process start-up (importing jax) and some slack.
    assert elapsed < TIMEOUT_S + 30, elapsed


def test_initialize_flags_go_together():
    with pytest.raises(ValueError, match="--coordinator_address=HOST:PORT --num_processes=N --process_id=I"):
        distributed.initialize("127.0.0.1:1234", 0, -1)
    with pytest.raises(ValueError, match="go together"):
        distributed.initialize("", 2, 0)


def test_initialize_single_process_is_a_no_op(monkeypatch):
    for var in distributed._LAUNCHER_ENV:
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is None
    assert distributed.initialize(auto=True) is None
    import jax
    assert jax.process_count() == 1


def test_loading_a_config_file_starts_no_jax_backend():
    """train.py reads its --config file while parsing flags, before jax.distributed.initialize, which must
    come before any backend starts. A config's 'auto' choices (dtype, scan_layers) are resolved later, by the
    trainer; loading configs/169m.py used to start the backend by resolving them."""
    script = ("import importlib.util, pathlib; from jax._src import xla_bridge\n"
              "for path in sorted(pathlib.Path('configs').glob('*.py')):\n"
              "    spec = importlib.util.spec_from_file_location('config', path)\n"
              "    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
              "    module.get_config()\n"
              "    assert not xla_bridge.backends_are_initialized(), path\n"
              "print('ok')")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env_with_devices(1), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
