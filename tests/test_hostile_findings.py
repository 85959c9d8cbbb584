"""The findings of the hostile tester's issue 30, each a test that failed before its fix:

  * many processes taking over one stale lock at the same moment: exactly one holds it;
  * a lock file of garbage bytes is refused naming it;
  * Ctrl-C saves a checkpoint (exit 130), a second Ctrl-C stops at once;
  * a resume with another train.seq_len or train.bptt_windows is refused;
  * a finished run rerun with other flags trains nothing and writes nothing;
  * a resume drops the metrics rows past its step (each step once in metrics.jsonl);
  * a tiny run on a CPU host prints its progress lines only (no libtpu init errors, no XLA heap warnings);
  * a usage error is its line and a hint to --help, not the whole flag help;
  * a failed save (ulimit -f) is one error line, its partial checkpoint directory removed;
  * an integer out of the range it is used in (train.num_steps, checkpoint.*, data.seed) is refused first;
  * model.d_att and model.d_ffn can be set on the command line;
  * a refused run (missing text files, a bad tokenizer, a bad init_from) leaves no directory it created;
  * model(tokens) refuses zero tokens and a state of another batch with a ValueError naming the shapes;
  * rwkv-convert refuses non-finite weights, naming the tensors, and a destination inside its source;
  * eval.py checks where --report goes before evaluating;
  * --compile_only checks the batch against the TPU mesh before compiling, and keeps libtpu quiet;

Self-contained: the small helpers are local (tests/ is being reorganised around shared helpers).
"""

import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rwkv_jax.io import workdir_lock
from tests import helpers
from tests.helpers import copy_package_source, read_records

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


# --- A tiny run on the command line (local helpers, as in tests/test_train.py) ---------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """This package's source as the corpus, a data dir shared by the runs (the tokenizer is trained once)."""
    root = tmp_path_factory.mktemp("hostile")
    return {"root": root, "corpus": copy_package_source(root / "corpus"), "data_dir": root / "data"}


def tiny_overrides(env: dict, **extra) -> dict:
    """helpers.tiny_overrides for short runs: 4 steps, no periodic evaluation, a checkpoint every 2 steps."""
    return helpers.tiny_overrides(env, **{"train__eval_every": 0, "train__eval_batches": 20, "train__num_steps": 4,
                                          "optim__warmup_steps": 2, **extra})


def train_args(workdir: Path, overrides: dict, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items()), *extra]


def subprocess_env(env: dict, **extra) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(env["root"] / "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                **extra)


def train(env: dict, workdir: Path, overrides: dict, *extra: str, timeout_s: float = TIMEOUT_S):
    """train.py to its end: the CompletedProcess (text stdout and stderr)."""
    return subprocess.run(train_args(workdir, overrides, *extra), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s, env=subprocess_env(env))


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def wait_for_step(proc, workdir: Path, step: int, err_path: Path) -> None:
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
        if any(r["kind"] == "train" and r["step"] >= step for r in read_records(workdir)):
            return
        if proc.poll() is not None:
            pytest.fail(f"train.py exited ({proc.returncode}) before step {step}:\n{err_path.read_text()[-3000:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no step {step} within {TIMEOUT_S}s")

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


# --- Ctrl-C saves ------------------------------------------------------------------------------------------

def test_ctrl_c_saves_a_checkpoint_and_a_second_one_exits_at_once(env, tmp_path):
    workdir = tmp_path / "run"
    overrides = tiny_overrides(env, train__num_steps=400, checkpoint__every_steps=50)
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(train_args(workdir, overrides), cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                env=subprocess_env(env))
        wait_for_step(proc, workdir, 3, err_path)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(TIMEOUT_S)
    stderr = err_path.read_text()
    assert rc == 130, stderr[-3000:]
    stopped = re.search(r"Stopped by Ctrl-C after step (\d+); the checkpoint is saved", stderr)
    assert stopped, stderr[-3000:]
    step = int(stopped.group(1))
    assert 3 <= step < 50 and checkpoint_steps(workdir) == [step]
    assert not (workdir / workdir_lock.LOCK_NAME).exists()


def test_a_second_ctrl_c_raises_at_once():
    from rwkv_jax.train import trainer
    preemption = trainer._Preemption()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # handled here, between bytecodes: a request, no exception
        assert preemption.requested == "Ctrl-C"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at once: never reached
    finally:
        preemption.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- Resumes that cannot continue exactly -----------------------------------------------------------------

@pytest.fixture(scope="module")
def base(env):
    """A finished 4-step run (checkpoints at steps 2 and 4)."""
    workdir = env["root"] / "base"
    result = train(env, workdir, tiny_overrides(env))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def copy_of(base_dir: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "workdir"
    shutil.copytree(base_dir, workdir)
    return workdir


def file_bytes(workdir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}


@pytest.mark.parametrize("field, value, change", [("train.seq_len", 64, "seq_len 32 -> 64"),
                                                  ("train.bptt_windows", 2, "bptt_windows 1 -> 2")])
def test_a_resume_with_another_window_length_is_refused(env, base, tmp_path, field, value, change):
    workdir = copy_of(base, tmp_path)
    before = file_bytes(workdir)
    result = train(env, workdir, tiny_overrides(env, train__num_steps=6, **{field.replace(".", "__"): value}))
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "resume refused: the data setup differs" in errors[0] and change in errors[0], \
        result.stderr[-3000:]
    assert file_bytes(workdir) == before
    assert checkpoint_steps(workdir) == [2, 4]


def test_a_finished_run_rerun_with_other_flags_writes_nothing(env, base, tmp_path):
    workdir = copy_of(base, tmp_path)
    before = file_bytes(workdir)
    result = train(env, workdir, tiny_overrides(env, optim__lr_init=1e-3))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the run is finished: checkpoint step 4 is train.num_steps=4, nothing to train" in result.stdout
    assert file_bytes(workdir) == before  # config.json, metrics.jsonl, ... untouched
    assert checkpoint_steps(workdir) == [2, 4]


def test_a_resume_drops_the_metrics_rows_past_the_restored_step(env, base, tmp_path):
    workdir = copy_of(base, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "4")  # as if killed after step 4 was logged, before its save
    result = train(env, workdir, tiny_overrides(env))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from the checkpoint of step 2" in result.stdout
    rows = [(r["kind"], r["step"]) for r in read_records(workdir)]
    assert rows == [("train", 1), ("train", 2), ("train", 3), ("train", 4), ("eval", 4)]


# --- The console a newcomer sees --------------------------------------------------------------------------

def test_a_tiny_run_prints_its_progress_and_nothing_else(env, tmp_path):
    """No JAX_PLATFORMS or TF_CPP_MIN_LOG_LEVEL set, libtpu installed (the dev extra) on a host without a TPU:
    neither libtpu's init errors nor XLA:CPU's per-heap warnings (a 8 MiB logits buffer > the 4 MiB heaps)."""
    overrides = tiny_overrides(env, train__num_steps=6, train__batch_size=16, train__seq_len=256,
                               train__log_every=5, checkpoint__every_steps=100)
    clean_env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
    result = subprocess.run(train_args(tmp_path / "run", overrides), cwd=REPO, capture_output=True, text=True,
                            timeout=TIMEOUT_S, env=clean_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    lines = [line for line in result.stdout.splitlines() if not line.startswith("building dataset")]  # 1st run
    assert [line.split()[0] for line in lines] == [
        "devices:", "unigram", "60,224", "compiling", "step", "step", "step", "eval", "final:"], lines


@pytest.mark.parametrize("script, args, message", [
    ("train.py", ["--config=configs/tiny.py"], "--workdir must have a value"),
    ("eval.py", ["--checkpoint=x", "unexpected"], "unexpected"),
], ids=["train_missing_workdir", "eval_extra_argument"])
def test_a_usage_error_is_its_line_and_a_hint_not_the_flag_help(script, args, message):
    result = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{script}: error: ") and message in lines[0], result.stderr
    assert "--help" in lines[1]


# --- A failed save: one line, nothing left behind ---------------------------------------------------------

# train.py with every file write past 200 KB failing (EFBIG), as on a full disk: the checkpoint's data files
# are larger, every other file of the run smaller. Python ignores SIGXFSZ, so writes raise instead.
FILE_SIZE_LIMIT = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, resource.RLIM_INFINITY))
sys.argv = sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_failed_save_is_one_line_and_leaves_no_partial_checkpoint(env, base, tmp_path):  # base: data built
    workdir = tmp_path / "run"
    args = train_args(workdir, tiny_overrides(env, train__num_steps=40))
    result = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, *args[1:]], cwd=REPO, capture_output=True,
                            text=True, timeout=TIMEOUT_S, env=dict(os.environ, JAX_PLATFORMS="cpu"))  # no cache
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, f"{len(lines)} lines:\n{result.stderr[-3000:]}"
    failed = re.match(rf"train.py: error: could not save checkpoint step (\d+) in {workdir}/checkpoints: File too "
                      r"large \(errno 27\)\. The last good checkpoint there is ", lines[0])
    assert failed, lines[0]
    assert "--traceback" in lines[1]
    left = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert all(name.isdigit() and int(name) < int(failed.group(1)) for name in left), left  # no *.orbax-checkpoint-tmp*


# --- Refused early, in one line, leaving nothing -------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.num_steps=10000000000000000000000", "train.num_steps=10000000000000000000000 is out of range"),
    ("checkpoint.every_steps=10000000000000000000000", "checkpoint.every_steps=10000000000000000000000 is out of"),
    ("checkpoint.keep=10000000000000000000000", "checkpoint.keep=10000000000000000000000 is out of range"),
    ("data.seed=-1", "data.seed must be in [0, 2**63), got -1"),
    ("data.seed=10000000000000000000000", "data.seed must be in [0, 2**63)"),
], ids=["num_steps", "every_steps", "keep", "negative_seed", "huge_seed"])
def test_an_integer_out_of_its_range_is_refused_before_any_work(tmp_path, override, message):
    workdir = tmp_path / "run"
    start = time.time()
    result = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
                             f"--config.{override}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and message in lines[0], result.stderr[-3000:]
    assert result.stdout == "" and not workdir.exists()
    assert time.time() - start < 30  # no data preparation, no compile


def test_d_att_and_d_ffn_can_be_set_on_the_command_line(tmp_path):
    """They defaulted to None, which ml_collections cannot override ("Type NoneType ... not supported")."""
    def refusal(*overrides):
        result = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py",
                                 f"--workdir={tmp_path / 'run'}", *overrides], cwd=REPO, capture_output=True,
                                text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert result.returncode == 1, result.stderr[-3000:]  # parsed: the config check refuses it (exit 1)
        return result.stderr.strip().splitlines()[0]

    # Accepted values: the run is stopped by another field's check, naming that field only.
    line = refusal("--config.model.d_att=64", "--config.model.d_ffn=256", "--config.train.num_steps=0")
    assert "train.num_steps must be >= 1" in line and "d_att" not in line and "d_ffn" not in line, line
    assert "model.d_att" in refusal("--config.model.d_att=-3")


@pytest.mark.parametrize("field, value, message", [
    ("data.text_files", "{tmp}/no_such_file.txt", "no_such_file.txt"),
    ("data.tokenizer_path", "{tmp}/garbage.model", "garbage.model"),
], ids=["text_files", "tokenizer_path"])
def test_a_refused_run_creates_no_workdir(env, tmp_path, field, value, message):
    workdir = tmp_path / "run"
    (tmp_path / "garbage.model").write_bytes(b"not a sentencepiece model")
    overrides = tiny_overrides(env, **{field.replace(".", "__"): value.format(tmp=tmp_path)})
    result = subprocess.run(train_args(workdir, overrides), cwd=REPO, capture_output=True, text=True,
                            timeout=TIMEOUT_S, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 1 and message in result.stderr.splitlines()[0], result.stderr[-3000:]
    assert not workdir.exists()


def test_an_init_from_refusal_leaves_no_checkpoints_dir(env, base, tmp_path):
    workdir = tmp_path / "existing"
    workdir.mkdir()  # a directory the user made: kept, and left empty
    overrides = tiny_overrides(env, model__d_model=64, train__init_from=str(base),
                               data__tokenizer_path=str(base / "tokenizer.model"))
    result = subprocess.run(train_args(workdir, overrides), cwd=REPO, capture_output=True, text=True,
                            timeout=TIMEOUT_S, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "is a model of" in result.stderr.splitlines()[0], result.stderr[-3000:]
    assert workdir.is_dir() and list(workdir.iterdir()) == []


# --- The Python API -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model():
    from flax import nnx

    from rwkv_jax.model import RWKV, ModelConfig
    return RWKV(ModelConfig(vocab_size=64, d_model=16, n_layer=2), rngs=nnx.Rngs(0))


def test_the_model_refuses_zero_tokens_naming_the_shape(small_model):
    import jax.numpy as jnp
    with pytest.raises(ValueError, match=r"tokens of shape \(2, 0\) hold no token"):
        small_model(jnp.zeros((2, 0), jnp.int32))


def test_the_model_refuses_a_state_of_another_batch_naming_the_shapes(small_model):
    import jax.numpy as jnp
    state = small_model.init_state(3)
    with pytest.raises(ValueError, match=r"state does not fit tokens of batch 1: its arrays are .*'att_x': "
                                         r"\(2, 3, 16\).* a state for batch 1 is .*'att_x': \(2, 1, 16\)"):
        small_model(jnp.zeros((1, 4), jnp.int32), state)
    small_model(jnp.zeros((3, 4), jnp.int32), state)  # its own batch: accepted


# --- rwkv-convert ------------------------------------------------------------------------------------------

def convert(*args: str) -> int:
    from rwkv_jax.cli import convert as convert_command
    from rwkv_jax.cli import runner as cli
    return cli.call(convert_command.main, ["convert", *args])


def test_convert_refuses_non_finite_weights_naming_the_tensors(small_model, tmp_path, capsys):
    import numpy as np

    from rwkv_jax.io import weights
    tensors = weights.model_to_official(small_model)
    tensors["blocks.1.att.time_decay"] = np.full_like(tensors["blocks.1.att.time_decay"], np.nan)
    weights.write_pth(tensors, tmp_path / "nan.pth")
    assert convert(str(tmp_path / "nan.pth"), str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "holds non-finite weights (NaN or Inf) in 1 tensor(s): blocks.1.att.time_decay" in err, err
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_destination_inside_its_source(small_model, tmp_path, capsys):
    from rwkv_jax.io import weights
    src = tmp_path / "model"
    weights.write_model(small_model, src, "rwkv_jax")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    assert convert(str(src), str(src / "sub")) == 2
    assert "is inside SRC" in capsys.readouterr().err
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before


# --- eval.py ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("report, problem", [("/dev/null/x", "/dev/null is not a directory"),
                                             ("/proc/self/x", "cannot create files in /proc/self")],
                         ids=["under_a_file", "unwritable"])
def test_eval_checks_where_the_report_goes_before_evaluating(base, tmp_path, capsys, report, problem):
    from rwkv_jax.cli import eval as eval_command
    from rwkv_jax.cli import runner as cli
    (tmp_path / "doc.txt").write_text("some text to evaluate\n" * 50)
    code = cli.call(eval_command.main, ["eval", f"--checkpoint={base}", f"--report={report}",
                                        f"--text_files={tmp_path / 'doc.txt'}"])
    captured = capsys.readouterr()
    assert code == 2 and f"--report={report}: {problem}" in captured.err, captured.err
    assert captured.out == ""  # refused before loading or evaluating anything


# --- train.py --compile_only -------------------------------------------------------------------------------

def compile_only(*overrides: str):
    pytest.importorskip("libtpu")
    return subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", "--compile_only",
                           "--topology=v5e:2x2", *overrides], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"})


def test_compile_only_checks_the_batch_against_the_tpu_mesh_first():
    start = time.time()
    result = compile_only("--config.train.batch_size=6")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "a microbatch of 6 rows does not split over the 4 devices of the mesh's data x fsdp axes" in \
        result.stderr.splitlines()[0], result.stderr[-3000:]
    assert time.time() - start < 30  # before compiling


def test_compile_only_keeps_libtpus_init_lines_off_the_console():
    result = compile_only("--config.train.batch_size=6")  # refused after libtpu is loaded: quick
    assert len(result.stderr.strip().splitlines()) == 2, result.stderr[-3000:]  # the error and the hint
    assert "TPU_WORKER_HOSTNAMES" not in result.stderr and "host bounds" not in result.stderr
