"""Training never loses data and refuses bad input early, in one line (issue 14, the training side):

  * a second trainer on a workdir is refused naming the holder, and the first finishes intact; a stale lock
    (dead pid on this host) is taken over with a warning;
  * checkpoint.keep=0 and every other bad config value are refused before data preparation or compile;
  * a refused resume (changed model or data setup) leaves config.json / rwkv_config.json / the tokenizer
    byte-identical; the data override lets it through;
  * a failed save is reported as that step's, naming the directory and the cause, and the run exits within
    seconds with the last good checkpoint intact;
  * the bad-step limit is checked on every step, not only on logging steps;
  * token ids outside the vocabulary are refused in binidx files and token caches, naming them;
  * damaged token caches and bad config files are one-line errors naming the file.

The same refusals outside a training run: the model API's in tests/test_model.py, the batches' in
tests/test_data_pipeline.py, damaged tokenizer files' in tests/test_data_tokenizer.py.

The tiny setup and the subprocess helpers are those of tests/test_train.py, in tests/helpers.py.
"""

import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from rwkv_jax import data
from rwkv_jax.data import binidx
from rwkv_jax.data import tokenizer as tokenizer_lib
from rwkv_jax.io import workdir_lock
from rwkv_jax.io.checkpoint import Checkpointer, IncompatibleCheckpointError
from rwkv_jax.model import RWKV, ModelConfig
from rwkv_jax.train import resume, trainer
from rwkv_jax.train import train_config as config_lib
from tests.helpers import (
    REPO,
    SUBPROCESS_TIMEOUT_S,
    Run,
    make_config,
    read_records,
    restore_latest,
    run_cli,
    subprocess_env,
    tiny_overrides,
)

BASE_STEPS = 4  # the base run: checkpoints at steps 2 and 4


@pytest.fixture(scope="module")
def env(train_env):
    """This package's source as the corpus, a data dir, and a base workdir trained for BASE_STEPS steps."""
    env = dict(train_env)
    root = env["root"]
    env["overrides"] = tiny_overrides(env, train__num_steps=BASE_STEPS, train__eval_every=0)
    env["base"] = root / "base"
    trainer.train(make_config(env["overrides"]), env["base"])
    return env


def copy_of_base(env, tmp_path) -> Path:
    workdir = tmp_path / "workdir"
    shutil.copytree(env["base"], workdir)
    return workdir


def file_bytes(workdir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}


# --- The workdir lock -----------------------------------------------------------------------------------

@pytest.mark.slow  # CI time: the lock's refusal and its message are also checked in test_hostile_findings
def test_a_second_trainer_is_refused_naming_the_holder_and_the_first_finishes(env, tmp_path):
    workdir = tmp_path / "shared"
    overrides = dict(env["overrides"], **{"train.num_steps": 40, "checkpoint.every_steps": 10})
    first = Run(workdir, overrides)
    first.wait_for_step(1)
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf"workdir {workdir} is in use by another trainer \(pid {first.proc.pid} on host "):
        trainer.train(make_config(overrides), workdir)
    assert first.finish() == 0, first.stderr[-3000:]
    steps = [r["step"] for r in read_records(workdir) if r["kind"] == "train"]
    assert steps == list(range(1, 41))  # one run's records, not two interleaved
    assert not (workdir / workdir_lock.LOCK_NAME).exists()  # released at the end


def test_a_second_trainer_on_the_command_line_gets_one_line(env, tmp_path):
    workdir = tmp_path / "held"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (workdir / workdir_lock.LOCK_NAME).write_text(json.dumps(
            {"host": socket.gethostname(), "pid": holder.pid, "started": "2026-01-01T00:00:00+00:00"}))
        result = run_cli(["--config=configs/tiny.py", f"--workdir={workdir}",
                          *(f"--config.{k}={v}" for k, v in env["overrides"].items())])
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and f"pid {holder.pid} on host {socket.gethostname()}" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == [workdir_lock.LOCK_NAME]  # nothing else written


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / workdir_lock.LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
    caplog.set_level(logging.WARNING, logger="absl")
    path = workdir_lock.acquire(tmp_path)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert any("stale lock" in r.getMessage() and str(dead.pid) in r.getMessage() for r in caplog.records)
    workdir_lock.release(path)
    assert not lock.exists()


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    lock = tmp_path / workdir_lock.LOCK_NAME
    lock.write_text(json.dumps({"host": "some-other-host", "pid": 1, "started": "x"}))
    with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"host some-other-host.*delete {re.escape(str(lock))}"):
        workdir_lock.acquire(tmp_path)
    assert json.loads(lock.read_text())["host"] == "some-other-host"  # untouched


def test_a_workdir_that_cannot_hold_the_lock_is_one_error_naming_it(tmp_path):
    """A read-only workdir fails the same way (not reproducible as root, who may write anywhere)."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(OSError, match=rf"cannot lock workdir {re.escape(str(not_a_dir))}: Not a directory .*"
                                      r"must be a writable directory"):
        workdir_lock.acquire(not_a_dir)
    with pytest.raises(OSError, match=rf"cannot write in {re.escape(str(not_a_dir))}: Not a directory"):
        workdir_lock.check_writable(not_a_dir)
    workdir_lock.check_writable(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe is gone


# --- Config values, all refused before data preparation and compile ------------------------------------

BAD_VALUES = [
    ("train.log_every", 0), ("train.eval_every", -1), ("train.eval_batches", -1), ("train.seq_len", 0),
    ("train.microbatches", 0), ("train.bptt_windows", 0), ("train.batch_size", 0), ("train.num_steps", 0),
    ("checkpoint.every_steps", 0), ("checkpoint.keep", 0), ("optim.lr_init", 0.0), ("optim.lr_final", -1e-5),
    ("optim.max_consecutive_bad_steps", 0), ("optim.beta2", 1.0), ("optim.grad_clip", 0.0),
    ("data.sp_vocab_size", 100), ("data.sp_vocab_size", 1024), ("data.validation_fraction", 1.0),
    ("data.source", "pile"), ("data.sampling", "stream"), ("model.wkv_form", "fast"),
]


@pytest.mark.parametrize("field, value", BAD_VALUES, ids=[f"{f}={v}" for f, v in BAD_VALUES])
def test_a_bad_config_value_is_one_line_before_any_work(env, tmp_path, field, value):
    workdir = tmp_path / "never_created"
    config = make_config(dict(env["overrides"], **{field: value}))
    with pytest.raises(config_lib.ConfigError, match=rf"^config: .*{re.escape(field)}") as raised:
        trainer.train(config, workdir)
    assert "\n" not in str(raised.value)
    assert not workdir.exists()  # refused before the workdir, the data or the compile


def test_a_tokenizer_path_that_is_a_directory_is_refused_before_training_it(env, tmp_path):
    directory = tmp_path / "tok"
    directory.mkdir()
    config = make_config(dict(env["overrides"], **{"data.tokenizer_path": str(directory),
                                                   "data.data_dir": str(tmp_path / "data")}))
    with pytest.raises(config_lib.ConfigError, match=r"data\.tokenizer_path=.* is a directory"):
        trainer.train(config, tmp_path / "w")
    assert list(directory.iterdir()) == [] and not (tmp_path / "data").exists()


def test_checkpointer_refuses_keep_0(tmp_path):
    with pytest.raises(ValueError, match=r"keep must be >= 1"):
        Checkpointer(tmp_path / "checkpoints", keep=0)


def test_a_bad_value_on_the_command_line_is_one_line_exit_1(env, tmp_path):
    result = run_cli(["--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}", "--config.train.log_every=0",
                      "--config.checkpoint.every_steps=0"])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == ("train.py: error: config: train.log_every must be >= 1, got 0; checkpoint.every_steps "
                        "must be >= 1, got 0"), result.stderr
    assert len(lines) == 2 and "--traceback" in lines[1]


@pytest.mark.parametrize("content, message", [
    (None, r"cannot load the config file .*missing\.py: OSError: \[Errno 2\] No such file or directory"),
    ("def get_config(:\n", r"cannot load the config file .*broken\.py: SyntaxError: invalid syntax at line 1"),
], ids=["missing", "syntax_error"])
def test_a_bad_config_file_is_one_line_exit_2(tmp_path, content, message):
    path = tmp_path / ("missing.py" if content is None else "broken.py")
    if content is not None:
        path.write_text(content)
    result = run_cli([f"--config={path}", f"--workdir={tmp_path / 'w'}"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr


def test_a_workdir_that_is_a_file_is_refused(env, tmp_path):
    workdir = tmp_path / "file"
    workdir.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match=r"is a file, not a directory"):
        trainer.train(make_config(env["overrides"]), workdir)


def test_a_model_directory_as_the_workdir_is_refused_and_kept(env, tmp_path):
    """An HF or rwkv_jax model directory (config.json / rwkv_config.json, no checkpoints/) given as --workdir:
    the run wrote its own config.json over the model's."""
    model_dir = tmp_path / "hf_model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "rwkv"}')
    with pytest.raises(FileExistsError, match=r"holds config.json but no checkpoints/.*use a new --workdir"):
        trainer.train(make_config(env["overrides"]), model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json"]
    assert (model_dir / "config.json").read_text() == '{"model_type": "rwkv"}'


# --- Resume refused before anything is written ----------------------------------------------------------

@pytest.mark.parametrize("change, error, message", [
    ({"model.d_model": 64}, IncompatibleCheckpointError,  # was a list of 72 mismatched arrays, with no fix
     r"resume refused: checkpoint step 4 in .* holds a model of 2 layers x 32 .*, config.model is 2 layers x 64 "
     r".*: rerun with the run's config.model .* or use a new --workdir"),
    ({"model.scan_layers": True}, IncompatibleCheckpointError,  # was the layout listing of every array
     r"resume refused: the run's checkpoints hold its layers as a list \(model.scan_layers=False\), this config "
     r"asks for scan_layers=True: rerun with --config.model.scan_layers=False, or use a new --workdir"),
    ({"data.seed": 1}, ValueError, r"resume refused: the data setup differs .*: seed 0 -> 1"),
    ({"data.sp_vocab_size": 400}, ValueError, r"resume refused: .*tokenizer_sha256 .*vocab_size 512 -> "),
    ({"data.reset_at_eot": True}, ValueError, r"resume refused: the data setup differs .*: reset_at_eot False -> True"),
    ({"data.sampling": "streams", "train.allow_data_change": True}, ValueError,
     r"resume refused: checkpoint step 4 .* data.sampling='random', this run asks for 'streams'"),
], ids=["model", "scan_layers", "data_seed", "tokenizer", "reset_at_eot", "sampling"])
def test_a_refused_resume_leaves_the_workdir_byte_identical(env, tmp_path, change, error, message):
    workdir = copy_of_base(env, tmp_path)
    before = file_bytes(workdir)
    config = make_config(dict(env["overrides"], **{"train.num_steps": BASE_STEPS + 2}, **change))
    with pytest.raises(error, match=message):
        trainer.train(config, workdir)
    assert file_bytes(workdir) == before  # config.json, rwkv_config.json, tokenizer.model, metrics.jsonl
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


@pytest.mark.slow  # CI time: three train.py runs; the layout conversion itself has its own fast tests
def test_scan_layers_auto_resumes_the_layout_the_checkpoints_hold(env, tmp_path, capsys):
    """scan_layers='auto' is a list of layers on CPU; a run whose checkpoints hold them stacked (begun with
    scan_layers=True, or on a GPU/TPU) resumes stacked, and says so in its rwkv_config.json."""
    def config_with(scan_layers, num_steps):
        config = make_config(dict(env["overrides"], **{"train.num_steps": num_steps}))
        config.model = config_lib.model_config(**dict(config.model.to_dict(), scan_layers=scan_layers))
        return config

    assert ModelConfig.from_dict(config_with("auto", 2).model).scan_layers is False  # on this CPU
    workdir = tmp_path / "stacked"
    trainer.train(config_with(True, 2), workdir)
    capsys.readouterr()
    result = trainer.train(config_with("auto", 4), workdir)
    assert "resumed from the checkpoint of step 2" in capsys.readouterr().out
    assert result["step"] == 4 and math.isfinite(result["loss"])
    assert json.loads((workdir / "rwkv_config.json").read_text())["scan_layers"] is True
    stacked = nnx.state(nnx.eval_shape(lambda: RWKV(ModelConfig.from_dict(config_with(True, 4).model),
                                                    rngs=nnx.Rngs(0))))
    with Checkpointer(workdir / "checkpoints", read_only=True) as reader:
        params, _, step = reader.restore_params(stacked)
    assert step == 4
    assert params["blocks"]["att"]["key"]["kernel"].shape[0] == 2  # [n_layer, ...]: still stacked


def test_a_data_change_is_accepted_with_the_override(env, tmp_path, caplog):
    workdir = copy_of_base(env, tmp_path)
    caplog.set_level(logging.WARNING, logger="absl")
    config = make_config(dict(env["overrides"], **{"data.seed": 1, "train.allow_data_change": True,
                                                   "train.num_steps": BASE_STEPS + 1}))
    trainer.train(config, workdir)  # one more step: a finished run's rerun writes nothing (config.json neither)
    assert any("changed data setup" in r.getMessage() and "seed 0 -> 1" in r.getMessage() for r in caplog.records)
    assert json.loads((workdir / "config.json").read_text())["data"]["seed"] == 1


def test_checkpoints_from_before_the_data_setup_was_saved_compare_the_seed_only():
    current = {"source": "text", "seed": 0, "tokenizer_sha256": "abc"}
    resume.check_data_unchanged({"step": 2, "data_seed": 0}, current, 2, "ckpt", allow=False)
    with pytest.raises(ValueError, match=r"seed 1 -> 0"):
        resume.check_data_unchanged({"step": 2, "data_seed": 1}, current, 2, "ckpt", allow=False)


# --- Failed saves ---------------------------------------------------------------------------------------

# Runs train.py with the checkpoint step directories above RO_AFTER_STEP refused as a read-only directory
# refuses them (root ignores file permissions, so the refusal is injected at os.mkdir).
READ_ONLY_AFTER = """
import errno, os, re, runpy, sys
limit = int(os.environ["RO_AFTER_STEP"])
_mkdir = os.mkdir
def mkdir(path, *args, **kwargs):
    m = re.search(r"/checkpoints/(\\d+)\\.orbax-checkpoint-tmp", os.fspath(path))
    if m and int(m.group(1)) > limit:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
    return _mkdir(path, *args, **kwargs)
os.mkdir = mkdir
sys.argv = sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


# Runs train.py with every file write past 200 KB failing (EFBIG), as on a full disk: the checkpoint data
# files are larger, every other file of the run smaller. Python ignores SIGXFSZ, so writes raise instead.
FILE_SIZE_LIMIT = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, resource.RLIM_INFINITY))
sys.argv = sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def run_until_failure(workdir: Path, overrides: dict, *, env_extra=None, wrapper=None):
    """train.py resumed at BASE_STEPS to 40 steps, expected to fail: (rc, stderr, seconds from the log of
    step BASE_STEPS + 2, whose save fails, to the exit)."""
    overrides = dict(overrides, **{"train.num_steps": 40})
    args = [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items())]
    if wrapper:
        args = [sys.executable, "-c", wrapper, *args[1:]]
    err_path = workdir.parent / "stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                env=dict(subprocess_env(workdir.parent), **(env_extra or {})))
        deadline = time.time() + SUBPROCESS_TIMEOUT_S
        failing_step_logged = None
        while proc.poll() is None and time.time() < deadline:
            if failing_step_logged is None and any(r["step"] >= BASE_STEPS + 2 for r in read_records(workdir)):
                failing_step_logged = time.time()
            time.sleep(0.01)
        if proc.poll() is None:
            proc.kill()
            pytest.fail(f"train.py did not exit within {SUBPROCESS_TIMEOUT_S}s after a failed save")
    assert failing_step_logged is not None, err_path.read_text()[-3000:]
    return proc.returncode, err_path.read_text(), time.time() - failing_step_logged


def assert_last_good_checkpoint_intact(env, workdir: Path):
    steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert [s for s in steps if s.isdigit()] == ["2", str(BASE_STEPS)], steps
    _, extra, step = restore_latest(make_config(env["overrides"]), workdir)  # digests checked
    assert step == BASE_STEPS and extra["step"] == BASE_STEPS


def test_a_read_only_checkpoint_dir_fails_that_save_in_one_line_and_exits_at_once(env, tmp_path):
    workdir = copy_of_base(env, tmp_path)
    rc, stderr, seconds = run_until_failure(workdir, env["overrides"], wrapper=READ_ONLY_AFTER,
                                            env_extra={"RO_AFTER_STEP": str(BASE_STEPS)})
    assert rc == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and re.search(
        rf"could not save checkpoint step {BASE_STEPS + 2} in {workdir}/checkpoints: Permission denied .*"
        rf"The last good checkpoint there is step {BASE_STEPS}\.", errors[0]), stderr[-3000:]
    assert seconds < 30, seconds  # orbax alone waited 300 s for the step directory
    assert_last_good_checkpoint_intact(env, workdir)
    assert not (workdir / workdir_lock.LOCK_NAME).exists()


@pytest.mark.slow
def test_a_full_disk_during_an_async_write_is_reported_as_that_step_and_exits_at_once(env, tmp_path):
    """The write fails inside tensorstore's background threads, after the save has started."""
    workdir = copy_of_base(env, tmp_path)
    rc, stderr, seconds = run_until_failure(workdir, env["overrides"], wrapper=FILE_SIZE_LIMIT)
    assert rc == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and re.search(
        rf"could not save checkpoint step {BASE_STEPS + 2} in {workdir}/checkpoints: File too large \(errno 27\)",
        errors[0]), stderr[-3000:]
    assert seconds < 30, seconds
    assert_last_good_checkpoint_intact(env, workdir)


# --- The bad-step limit on every step -------------------------------------------------------------------

def test_the_bad_step_limit_is_checked_on_every_step_not_only_on_logging_steps(env, tmp_path):
    # lr 1e30: step 1 throws the weights to ~1e29, every later loss is NaN. Logging only every 10 steps.
    overrides = dict(env["overrides"], **{"train.num_steps": 30, "train.log_every": 10, "optim.lr_init": 1e30,
                                         "optim.max_consecutive_bad_steps": 3, "checkpoint.every_steps": 100})
    with pytest.raises(trainer.BadStepsError, match=r"^3 consecutive steps up to step 4 had a non-finite"):
        trainer.train(make_config(overrides), tmp_path)
    records = [r for r in read_records(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 4]  # the first step, then the window up to the streak


# --- Token ids outside the vocabulary -------------------------------------------------------------------

def binidx_config(env, prefix: str, tokenizer_path: str, **extra):
    return make_config(dict(env["overrides"], **{"data.source": "binidx", "data.binidx_prefix": prefix,
                                                 "data.tokenizer_path": tokenizer_path}, **extra)).data


def sp_model(env) -> str:
    return str(env["base"] / "tokenizer.model")  # the base run's copy


def test_a_binidx_file_with_ids_outside_the_vocabulary_is_refused_naming_it(env, tmp_path):
    prefix = str(tmp_path / "corpus")
    rng = np.random.default_rng(0)
    with binidx.BinIdxWriter(prefix, np.uint16) as writer:
        for _ in range(20):
            writer.add(rng.integers(0, 512, 100))
        writer.add([5, 6, 600, 7])  # 600 >= the model's 512
    with pytest.raises(ValueError, match=rf"binidx file '{re.escape(prefix)}\.bin': token id 600 at token 2002 "
                                         r"is outside the model's vocabulary \[0, 512\)"):
        data.make_datasets(binidx_config(env, prefix, sp_model(env)), seq_len=32, batch_size=4,
                           model_vocab_size=512)


def test_a_token_cache_with_a_bad_id_or_truncated_is_refused_naming_it(env, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(env["data_dir"], data_dir)
    config = make_config(dict(env["overrides"], **{"data.data_dir": str(data_dir)})).data
    fingerprint = tokenizer_lib.load_tokenizer("sentencepiece", sp_model(env)).fingerprint
    cache = next((data_dir / "token_cache").rglob(f"train.{fingerprint}.tokens"))  # the base run's cache
    tokens = np.fromfile(cache, np.uint16)
    tokens[1234] = 3000
    tokens.tofile(cache)
    with pytest.raises(ValueError, match=rf"token cache '{re.escape(str(cache))}': token id 3000 at token 1234"):
        data.make_datasets(config, seq_len=32, batch_size=4, model_vocab_size=512)
    with open(cache, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match=rf"token cache '{re.escape(str(cache))}' is 1000 bytes but its metadata "
                                         r"says \d+ uint16 tokens .*truncated"):
        data.make_datasets(config, seq_len=32, batch_size=4, model_vocab_size=512)
