"""End-to-end training on CPU with a tiny model (2 x 32, vocab 512, 4 x 32 tokens a step), against the
acceptance points of the training loop:

  * a run killed with SIGKILL at a random step and rerun gives bit-identical losses and final state (also
    with streamed training, data.sampling='streams', whose state carries each row's recurrent state);
  * SIGTERM saves at the current step, exits 0, and the same command resumes from there (bit exact);
  * a corrupt latest checkpoint is skipped with a warning and the run completes from the previous one;
  * non-finite steps are not applied, are logged, stop the run after N in a row; checkpoints stay finite;
  * metrics.jsonl / TensorBoard / loss.png / a console line with ETA; MFU and lr as documented;
  * config errors (unknown field, wrong type, indivisible batch, missing --workdir) are clear;
  * gradient accumulation equals one big batch (L2Wrap included); bf16 compute keeps fp32 master weights.

The corpus is the package's own source copied into a temporary folder, so nothing touches ~/.cache.
Subprocesses run `python train.py` where a test needs signals; the rest calls `trainer.train` in-process.
"""

import json
import logging
import math
import random
import re
import shutil
import signal
import struct
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rwkv_jax.io.checkpoint import Checkpointer
from rwkv_jax.model import ModelConfig
from rwkv_jax.train import optim, sharding, train_step, trainer
from rwkv_jax.train.metrics import flops_per_token
from tests.helpers import (
    Run,
    assert_same_train_records,
    by_step,
    make_config,
    read_records,
    restore_latest,
    run_cli,
    tiny_overrides,
)

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = 30          # the reference run
PEAK_FLOPS = 1e11       # set so that MFU is computed on CPU
# --- Configs, in-process and on the command line, from one dict of overrides -----------------------

def run_to_completion(workdir: Path, overrides: dict) -> Run:
    run = Run(workdir, overrides)
    rc = run.finish()
    assert rc == 0, f"train.py failed ({rc}):\n{run.stderr[-5000:]}"
    return run


def assert_bit_identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


# --- Fixtures ----------------------------------------------------------------------------------------

def reference_run(train_env, name: str, **extra) -> dict:
    """An uninterrupted subprocess run of NUM_STEPS steps: the records, final state and console output."""
    overrides = tiny_overrides(train_env, train__num_steps=NUM_STEPS, train__peak_flops_per_device=PEAK_FLOPS, **extra)
    workdir = train_env["root"] / name
    run = run_to_completion(workdir, overrides)
    config = make_config(overrides)
    return {"overrides": overrides, "config": config, "workdir": workdir, "run": run,
            "records": read_records(workdir), "final": restore_latest(config, workdir)}


@pytest.fixture(scope="module")
def reference(train_env):
    return reference_run(train_env, "reference")


@pytest.fixture(scope="module")
def streams_reference(train_env):
    """The reference run with data.sampling='streams': the carried state is part of the final state."""
    return reference_run(train_env, "streams_reference", data__sampling="streams")


# --- Exact resume --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", ["random", pytest.param("streams", marks=pytest.mark.slow)])
def test_sigkill_at_a_random_step_then_rerun_is_bit_exact(train_env, sampling, request):
    reference = request.getfixturevalue("reference" if sampling == "random" else "streams_reference")
    if sampling == "streams":  # the carry is in the state compared below, and it is not the empty state
        assert reference["final"][0].carry is not None and np.any(np.asarray(reference["final"][0].carry.wkv_a))
    kill_at = random.Random(20240611).randint(5, NUM_STEPS - 8)
    workdir = train_env["root"] / f"killed-{sampling}"
    run = Run(workdir, reference["overrides"])
    reached = run.wait_for_step(kill_at)
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_steps = [r["step"] for r in read_records(workdir) if r["kind"] == "train"]
    assert max(killed_steps) >= reached and max(killed_steps) < NUM_STEPS

    rerun = run_to_completion(workdir, reference["overrides"])
    resumed = re.search(r"resumed from the checkpoint of step (\d+)", rerun.stdout)
    assert resumed, rerun.stdout
    assert 0 < int(resumed.group(1)) <= max(killed_steps)

    records = read_records(workdir)
    ref_train = by_step(reference["records"])
    assert sorted(by_step(records)) == list(range(1, NUM_STEPS + 1))
    assert_same_train_records(records, ref_train)
    final_eval, ref_eval = by_step(records, "eval")[NUM_STEPS], by_step(reference["records"], "eval")[NUM_STEPS]
    assert final_eval["eval_loss"] == ref_eval["eval_loss"]

    state, extra, step = restore_latest(reference["config"], workdir)
    ref_state, ref_extra, ref_step = reference["final"]
    assert step == ref_step == NUM_STEPS and extra == ref_extra
    assert_bit_identical(state, ref_state)  # params, Adam moments, counters, the carried state


def test_sigterm_saves_the_current_step_exits_0_and_resumes_bit_exact(train_env, reference):
    workdir = train_env["root"] / "sigterm"
    run = Run(workdir, reference["overrides"])
    run.wait_for_step(random.Random(7).randint(5, NUM_STEPS - 10))
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.stderr[-5000:]
    stopped = re.search(r"Stopped by SIGTERM after step (\d+); the checkpoint is saved", run.stderr)
    assert stopped and "SIGTERM received" in run.stderr, run.stderr[-5000:]
    stop_step = int(stopped.group(1))
    assert stop_step < NUM_STEPS
    assert max(r["step"] for r in read_records(workdir) if r["kind"] == "train") == stop_step
    with Checkpointer(workdir / "checkpoints") as ckpt:
        assert ckpt.steps[-1] == stop_step  # committed, whether or not it is a multiple of every_steps

    rerun = run_to_completion(workdir, reference["overrides"])
    assert f"resumed from the checkpoint of step {stop_step}" in rerun.stdout
    first_step_line = re.search(r"^step (\d+)/", rerun.stdout, re.M)
    assert int(first_step_line.group(1)) == stop_step + 1
    records = read_records(workdir)
    assert sorted(by_step(records)) == list(range(1, NUM_STEPS + 1))
    assert_same_train_records(records, by_step(reference["records"]))
    state, _, step = restore_latest(reference["config"], workdir)
    assert step == NUM_STEPS
    assert_bit_identical(state, reference["final"][0])


# --- Corrupt checkpoint ------------------------------------------------------------------------------

def flip_a_bit_in_the_largest_data_file(step_dir: Path):
    data = max((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"
                and p.relative_to(step_dir).parts[0] != "meta"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    data.write_bytes(bytes(raw))


def test_corrupt_latest_checkpoint_falls_back_with_a_warning_and_completes(train_env, reference, caplog, capsys):
    workdir = train_env["root"] / "corrupt"
    shutil.copytree(reference["workdir"], workdir)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == NUM_STEPS and len(steps) >= 2
    flip_a_bit_in_the_largest_data_file(workdir / "checkpoints" / str(NUM_STEPS))

    caplog.set_level(logging.WARNING, logger="absl")
    more = NUM_STEPS + 4
    result = trainer.train(make_config(dict(reference["overrides"], **{"train.num_steps": more})), workdir)
    assert result["step"] == more and math.isfinite(result["loss"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"checkpoint step {NUM_STEPS}" in w and "corrupt or unreadable" in w for w in warnings), warnings
    assert f"resumed from the checkpoint of step {steps[-2]}" in capsys.readouterr().out
    assert (workdir / "checkpoints" / f"{NUM_STEPS}.corrupt").is_dir()
    with Checkpointer(workdir / "checkpoints") as ckpt:
        assert ckpt.steps[-1] == more


# --- Non-finite steps ----------------------------------------------------------------------------------

def test_non_finite_steps_are_skipped_logged_and_stop_the_run(train_env, caplog, tmp_path):
    # lr 1e30: the first (finite) step throws the weights to ~1e29, after which every loss is NaN.
    overrides = tiny_overrides(train_env, train__num_steps=50, optim__lr_init=1e30, optim__max_consecutive_bad_steps=3,
                               checkpoint__every_steps=1, checkpoint__keep=10, train__eval_every=0)
    workdir = tmp_path / "bad"
    caplog.set_level(logging.WARNING, logger="absl")
    with pytest.raises(trainer.BadStepsError, match=r"^3 consecutive steps up to step 4 had a non-finite loss "
                       r"or gradient; none of them was applied"):
        trainer.train(make_config(overrides), workdir)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for step in (2, 3, 4):
        assert any(f"step {step}: non-finite loss" in w and "skipped" in w for w in warnings), warnings
    records = by_step(read_records(workdir))
    assert sorted(records) == [1, 2, 3, 4]
    assert math.isfinite(records[1]["loss"]) and records[1]["bad_steps"] == 0
    assert [records[s]["bad_steps"] for s in (2, 3, 4)] == [1, 2, 3]
    assert all(math.isnan(records[s]["loss"]) for s in (2, 3, 4))

    # Every checkpoint written holds only finite values, and the skipped steps changed no parameter.
    manager = ocp.CheckpointManager(workdir / "checkpoints")
    assert manager.all_steps() == [1, 2, 3]
    params = {}
    for step in manager.all_steps():
        items = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                              opt_state=ocp.args.StandardRestore()))
        state = {"params": items.params, **items.opt_state}  # the checkpoint's two array items
        for leaf in jax.tree.leaves(state):
            leaf = np.asarray(leaf)
            assert not np.issubdtype(leaf.dtype, np.inexact) or np.isfinite(leaf).all(), step
        params[step] = jax.tree.map(np.asarray, state["params"])
    manager.close()
    assert_bit_identical(params[1], params[2])
    assert_bit_identical(params[1], params[3])


# --- Observability -------------------------------------------------------------------------------------

def tensorboard_tags(directory: Path) -> set[str]:
    """Scalar tags of the TFRecord event files (length, crc, Event proto, crc)."""
    from tensorboardX.proto import event_pb2
    tags = set()
    for path in directory.glob("events.out.tfevents.*"):
        raw, pos = path.read_bytes(), 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos:pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            pos += 12 + length + 4
    return tags


def test_metrics_jsonl_tensorboard_png_and_console(reference):
    records, workdir, config = reference["records"], reference["workdir"], reference["config"]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, NUM_STEPS + 1))  # one record per logged step
    for r in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "elapsed_sec"} <= set(r)
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["lr"] > 0
    assert train[0]["tokens_per_sec"] is None and train[0]["mfu"] is None  # the compiling step
    fpt = flops_per_token(config.model.vocab_size, config.model.d_model, config.model.n_layer)
    assert fpt == 6 * (512 * 32 + 13 * 32 ** 2 * 2)
    for r in train[1:]:
        assert r["tokens_per_sec"] > 0
        assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * fpt / (PEAK_FLOPS * jax.device_count()), rel=1e-12)
    elapsed = [r["elapsed_sec"] for r in train]
    assert elapsed == sorted(elapsed)
    assert train[-1]["loss"] < train[0]["loss"]

    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30]
    for r in evals:
        assert math.isfinite(r["eval_loss"]) and 0 < r["eval_bits_per_byte"] < 16 and r["eval_tokens"] > 0

    assert {"train/loss", "train/lr", "train/grad_norm", "eval/eval_loss"} <= tensorboard_tags(workdir / "tensorboard")

    png = (workdir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR" and png[-8:-4] == b"IEND"
    from PIL import Image
    with Image.open(workdir / "loss.png") as image:
        image.verify()

    progress = re.compile(r"^step (\d+)/30 loss \d+\.\d+ lr \S+ gnorm \S+ [\d,]+ tok/s mfu \d+\.\d% "
                          r"elapsed \d+:\d\d:\d\d eta \d+:\d\d:\d\d$", re.M)
    assert len(progress.findall(reference["run"].stdout)) == NUM_STEPS - 1, reference["run"].stdout


def test_logged_lr_is_the_schedule_at_the_step_count_before_the_update(reference):
    config = reference["config"]
    schedule = optim.learning_rate(config.optim, NUM_STEPS)
    train = by_step(reference["records"])
    assert train[1]["lr"] == pytest.approx(0.2 * config.optim.lr_init, rel=1e-6)  # warmup starts at 0.2
    for step, r in train.items():
        assert r["lr"] == pytest.approx(float(schedule(step - 1)), rel=1e-6), step
    assert float(schedule(1)) != pytest.approx(float(schedule(0)), rel=1e-3)  # the check can tell


# --- Config errors -------------------------------------------------------------------------------------

def test_unknown_config_field_is_a_one_line_error(tmp_path):
    result = run_cli(["--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.train.num_stepz=3"])
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "num_stepz" in lines[0] and "num_steps" in lines[0], result.stderr


@pytest.mark.parametrize("args, message", [
    (["--config.train.num_steps=abc"], r"--config\.train\.num_steps=abc: invalid literal for int\(\)"),
    ([], r"--workdir must have a value"),
], ids=["wrong_type", "missing_workdir"])
def test_bad_flags_exit_non_zero_with_a_clear_message(tmp_path, args, message):
    workdir = [] if not args else [f"--workdir={tmp_path}"]
    result = run_cli(["--config=configs/tiny.py", *workdir, *args])
    assert result.returncode != 0
    assert re.search(message, result.stderr.strip().splitlines()[0]), result.stderr


@pytest.mark.parametrize("args", [["--config.train.num_steps=abc"], []], ids=["wrong_type", "missing_workdir"])
def test_bad_flags_print_no_traceback(tmp_path, args):
    workdir = [] if not args else [f"--workdir={tmp_path}"]
    result = run_cli(["--config=configs/tiny.py", *workdir, *args])
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr


def test_a_bad_step_streak_inside_one_logging_window_stops_the_run():
    """Three bad steps then a good one, all logged together: the streak of 3 must still stop the run."""
    from rwkv_jax.train import trainer

    class Writer:
        def train(self, step, values):
            return values

    pending = [(s + 1, {"loss": np.float32(np.nan if bad else 2.0), "grad_norm": np.float32(np.nan if bad else 1.0),
                        "lr": np.float32(1e-3), "finite": np.bool_(not bad), "bad_steps": np.int32(bad)})
               for s, bad in enumerate([1, 2, 3, 0])]
    with pytest.raises(trainer.BadStepsError, match="3 consecutive steps up to step 3"):
        trainer._log_pending(Writer(), pending, max_bad_steps=3)


def test_batch_not_divisible_by_microbatches_is_a_value_error(train_env, tmp_path):
    config = make_config(tiny_overrides(train_env, train__num_steps=2, train__microbatches=3))
    with pytest.raises(ValueError, match=r"train\.batch_size=4 is not a multiple of train\.microbatches=3"):
        trainer.train(config, tmp_path)


# --- Gradient accumulation -----------------------------------------------------------------------------

def step_setup(train_env, **overrides):
    """(config, mesh, optimizer, train_state_factory's four results, one batch of 4 x 32 tokens) for the
    tiny config: what the tests that call the train step directly share."""
    config = make_config(tiny_overrides(train_env, **overrides))
    mesh = sharding.make_mesh(config.mesh)
    optimizer = optim.make_optimizer(config.optim, 10)
    factory = train_step.train_state_factory(ModelConfig.from_dict(config.model), optimizer, mesh, 0)
    tokens = np.random.default_rng(0).integers(0, 512, size=(4, 33), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    return config, mesh, optimizer, factory, batch


@pytest.mark.parametrize("l2wrap_factor", [0.0, pytest.param(0.5, marks=pytest.mark.slow)],
                         ids=["l2wrap_off", "l2wrap_on"])
def test_gradient_accumulation_equals_one_big_batch(train_env, l2wrap_factor):
    # emb_init_scale 1: logits large enough at init that a large L2Wrap factor visibly moves the gradient.
    config, mesh, optimizer, (graphdef, init, _, shardings), batch = step_setup(train_env, model__emb_init_scale=1.0)

    def two_steps(microbatches, factor):
        step_fn = train_step.make_train_step(graphdef, optimizer, optim.learning_rate(config.optim, 10), shardings,
                                             mesh, microbatches=microbatches, l2wrap_factor=factor)
        state, losses, norms = init(), [], []
        for _ in range(2):
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        return jax.device_get(state.params), losses, norms

    full = two_steps(1, l2wrap_factor)
    accumulated = two_steps(2, l2wrap_factor)
    np.testing.assert_allclose(accumulated[1], full[1], rtol=1e-5)  # losses of both steps
    np.testing.assert_allclose(accumulated[2], full[2], rtol=1e-5)  # gradient norms
    # Adam's first updates are ~lr * g / (|g| + eps): an element whose gradient is ~eps amplifies fp32
    # summation-order noise, so the absolute tolerance is 1e-6 (~0.1% of one update at lr 4e-4).
    for a, b in zip(jax.tree.leaves(accumulated[0]), jax.tree.leaves(full[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if l2wrap_factor:  # the L2Wrap term really is in the gradients compared above
        without = two_steps(1, 0.0)
        assert abs(without[2][0] - full[2][0]) > 1e-3 * full[2][0]


@pytest.mark.parametrize("microbatches", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_gradient_buffers_give_the_plain_steps_results_and_hold_the_gradients(train_env, microbatches):
    """On CPU the step writes its gradients into donated buffers kept between steps
    (train_step._StepWithGradientBuffers): the same states as the plain step, and the gradients are no
    longer temporaries of the compiled program."""
    config, mesh, optimizer, (graphdef, init, abstract, shardings), batch = step_setup(train_env)
    steps = {kept: train_step.make_train_step(graphdef, optimizer, optim.learning_rate(config.optim, 10),
                                              shardings, mesh, microbatches=microbatches, gradient_buffers=kept)
             for kept in (False, True)}
    assert isinstance(steps[True], train_step._StepWithGradientBuffers)
    assert isinstance(train_step.make_train_step(graphdef, optimizer, optim.learning_rate(config.optim, 10),
                                                 shardings, mesh), train_step._StepWithGradientBuffers)  # CPU default
    results = {}
    for kept, step_fn in steps.items():
        state, losses = init(), []
        for _ in range(3):
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["loss"]))
        results[kept] = (jax.device_get(state), losses)
    assert results[True][1] == results[False][1]
    for a, b in zip(jax.tree.leaves(results[True][0]), jax.tree.leaves(results[False][0])):
        np.testing.assert_array_equal(a, b)

    gradient_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.params))
    memory = {kept: step_fn.lower(abstract, batch).compile().memory_analysis() for kept, step_fn in steps.items()}
    assert memory[True].alias_size_in_bytes >= memory[False].alias_size_in_bytes + gradient_bytes
    # The accumulation's per-microbatch gradients stay temporaries; the final ones leave them.
    saved = gradient_bytes // 2 if microbatches == 1 else 1
    assert memory[True].temp_size_in_bytes <= memory[False].temp_size_in_bytes - saved


def test_cpu_steps_are_compiled_with_temporaries_in_small_heaps(train_env, monkeypatch):
    """On CPU the train and eval steps are compiled with train_step.CPU_COMPILER_OPTIONS (temporaries in
    heaps malloc reuses, not one block mapped anew per call); for TPU (ahead of time) with
    TPU_COMPILER_OPTIONS (no windowed matmuls). Its effect on page faults and time is
    benchmarks/profile_step.py's; on TPU bytes, benchmarks/hlo_bytes.py's."""
    config, mesh, optimizer, (graphdef, init, abstract, shardings), batch = step_setup(train_env)
    seen, jit = [], jax.jit
    monkeypatch.setattr(jax, "jit",
                        lambda fn, **kwargs: seen.append(kwargs.get("compiler_options")) or jit(fn, **kwargs))
    for buffers in (True, False):
        train_step.make_train_step(graphdef, optimizer, optim.learning_rate(config.optim, 10), shardings, mesh,
                                   gradient_buffers=buffers)
    train_step.make_eval_step(graphdef, shardings.params, mesh)
    assert train_step.CPU_COMPILER_OPTIONS == {"xla_multiheap_size_constraint_per_heap": 4 * 2**20}
    assert seen.count(train_step.CPU_COMPILER_OPTIONS) == 3, seen
    tpu_mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="tpu")]))
    assert train_step.compiler_options(tpu_mesh) == train_step.TPU_COMPILER_OPTIONS
    assert train_step.compiler_options(types.SimpleNamespace(
        devices=np.array([types.SimpleNamespace(platform="gpu")]))) == {}


def test_l2wrap_under_accumulation_scales_with_the_upstream_gradient():
    """Documents our L2Wrap: its gradient is factor / (B_micro * T) * max logit, times the upstream
    gradient g. Averaging M micro-batch losses gives g = 1/M, so the term is factor / (B * T) per position,
    exactly as for the whole batch at once. (Official v4neo ignores g: under Lightning's gradient
    accumulation its term is M times larger than for one big batch.)"""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 8, 16)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 16, size=(4, 8)), jnp.int32)
    factor = 0.3
    ce = optim.cross_entropy
    whole = jax.grad(lambda x: ce(x, targets, factor))(logits)
    plain = jax.grad(lambda x: ce(x, targets, 0.0))(logits)
    expected_term = jax.nn.one_hot(logits.argmax(-1), 16) * (logits.max(-1) * factor / (4 * 8))[..., None]
    np.testing.assert_allclose(whole - plain, expected_term, atol=1e-7)
    halves = jax.grad(lambda x: 0.5 * (ce(x[:2], targets[:2], factor) + ce(x[2:], targets[2:], factor)))(logits)
    np.testing.assert_allclose(halves, whole, rtol=1e-6, atol=1e-8)


# --- Precision -----------------------------------------------------------------------------------------

def test_bfloat16_compute_trains_with_float32_master_weights(train_env, tmp_path, capsys):
    overrides = tiny_overrides(train_env, model__dtype="bfloat16", train__num_steps=12, train__eval_every=0,
                               optim__lr_init=1e-2, optim__lr_final=1e-3, optim__warmup_steps=2,
                               checkpoint__every_steps=100)
    config = make_config(overrides)
    result = trainer.train(config, tmp_path)
    assert "compute bfloat16" in capsys.readouterr().out
    losses = [r["loss"] for r in read_records(tmp_path) if r["kind"] == "train"]
    assert len(losses) == 12 and all(map(math.isfinite, losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    assert math.isfinite(result["eval_loss"])

    state, _, step = restore_latest(config, tmp_path)  # the target is float32: a bf16 array would not match
    assert step == 12
    for leaf in jax.tree.leaves(state.params):
        assert leaf.dtype == jnp.float32 and bool(jnp.isfinite(leaf).all())
    meta = json.loads((tmp_path / "checkpoints" / "12" / "meta" / "metadata").read_text())
    assert {a["dtype"] for name, a in meta["arrays"].items() if name.startswith("params/")} == {"float32"}
