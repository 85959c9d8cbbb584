"""The training run behind `python train.py`: a linear story in sections.

  1. Setup: the config checked (every value, before any work), the device mesh, the workdir locked.
  2. Data: dataset, tokenizer and batches (rwkv_jax.data).
  3. State: parameters and optimizer state created sharded (or the parameters of `train.init_from`, a
     trained model), or restored from the latest good checkpoint; a resume whose model or data setup
     differs from the checkpoint's is refused. Only then is anything written into the workdir
     (config.json, rwkv_config.json, the tokenizer). State tuning (optim.trainable='state') adds the
     learned initial state, the only thing trained, also written to WORKDIR/state.npz at every checkpoint.
  4. Steps: the jitted train step, periodic logging, evaluation and async checkpoints; SIGTERM
     (preemption) saves and returns; too many non-finite steps in a row stop the run with an error.
  5. End: a final checkpoint and evaluation, and the loss curves as a PNG.

Batch n is a pure function of (data seed, n), so a run resumed from the checkpoint of step n sees
exactly the batches an uninterrupted run sees: the checkpointed step is the whole data position. With
config.data.sampling='streams' the recurrent state carried from step to step is part of the train state
and of its checkpoints, so a resumed stream goes on from the very state it had.
"""

import dataclasses
import math
import shutil
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from rwkv_jax import config as config_lib
from rwkv_jax import logs
from rwkv_jax import metrics as metrics_lib
from rwkv_jax import optim, sharding, state_file, state_tuning, train_step, weights, workdir_lock
from rwkv_jax.checkpoint import Checkpointer, IncompatibleCheckpointError
from rwkv_jax.data import make_datasets
from rwkv_jax.model import ModelConfig, with_scan_layers
from rwkv_jax.workdir import Workdir


class BadStepsError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class _Preemption:
    """Remembers a SIGTERM so the loop can checkpoint and return at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping after this step.")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train(config: ml_collections.ConfigDict, workdir) -> dict:
    """Train as `config` says, in `workdir` (resuming whatever it holds). Returns the last metrics."""
    # --- 1. Setup ---------------------------------------------------------------------------------
    run_dir = Workdir(workdir)
    workdir = run_dir.path
    is_main = jax.process_index() == 0
    model_config = ModelConfig.from_dict(config.model)
    mesh = sharding.make_mesh(config.mesh)
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"--workdir {workdir} is a file, not a directory")
    if workdir.is_dir() and not run_dir.checkpoints_dir.is_dir():  # every run makes checkpoints/ before these
        kept = [p.name for p in (run_dir.config_path, run_dir.model_config_path, run_dir.metrics_path) if p.exists()]
        if kept:
            raise FileExistsError(f"--workdir {workdir} holds {', '.join(kept)} but no checkpoints/: it is not a "
                                  "training run's workdir (a model directory?) and the run would overwrite them: use a "
                                  "new --workdir")
    resuming = bool(run_dir.steps())
    config_lib.validate(config, mesh, resuming=resuming)
    if resuming:
        model_config = layers_as_stored(run_dir, config.model.scan_layers, model_config)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = _lock_workdir(workdir, is_main)
    try:
        return _train(config, run_dir, model_config, mesh, is_main)
    finally:
        if lock is not None:
            workdir_lock.release(lock)


def _lock_workdir(workdir: Path, is_main: bool) -> Path | None:
    """Process 0 locks the workdir (the lock file's path); on a multi-host run the others learn whether
    it could, so that they stop too instead of waiting for it in a collective."""
    lock, error = None, None
    if is_main:
        try:
            lock = workdir_lock.acquire(workdir)
        except OSError as e:  # WorkdirLockedError included
            error = e
    if jax.process_count() > 1:
        locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not locked and not is_main:
            raise RuntimeError(f"process 0 could not lock the workdir {workdir}; see its error")
    if error is not None:
        raise error
    return lock


def _train(config, run_dir: Workdir, model_config: ModelConfig, mesh, is_main: bool) -> dict:
    t = config.train
    if is_main:
        print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} in {jax.process_count()} "
              f"process(es); mesh {dict(mesh.shape)}; model {model_config.n_layer} x {model_config.d_model}, "
              f"compute {model_config.dtype}, WKV form {model_config.wkv_form}, layers "
              f"{'stacked (scanned)' if model_config.scan_layers else 'a list'}", flush=True)

    # --- 2. Data ----------------------------------------------------------------------------------
    step_len = t.seq_len * t.bptt_windows  # tokens of each row per step
    tokenizer, train_batches, eval_batches = make_datasets(
        config.data, seq_len=step_len, batch_size=t.batch_size, model_vocab_size=model_config.vocab_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    data_setup = describe_data(config.data, tokenizer, train_batches)
    batch_sharding = sharding.batch_sharding(mesh)

    def global_batch(local):
        return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}

    # --- 3. State ---------------------------------------------------------------------------------
    optimizer = optim.make_optimizer(config.optim, t.num_steps)
    schedule = optim.learning_rate(config.optim, t.num_steps)
    trainable = config.optim.trainable
    carry_rows = t.batch_size if config.data.sampling == "streams" else 0
    graphdef, init, abstract_state, shardings = train_step.train_state_factory(
        model_config, optimizer, mesh, t.seed, trainable=trainable, carry_rows=carry_rows)
    checkpointer = Checkpointer(run_dir.checkpoints_dir, keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    if is_main:
        workdir_lock.check_writable(checkpointer.directory)
    newest = checkpointer.newest_extra()  # before reading any array: the state's layout depends on it
    if newest is not None:
        extra, saved_arrays, newest_step = newest
        check_sampling_unchanged(extra, data_setup, newest_step, checkpointer.directory)
        check_trainable_unchanged(saved_arrays, trainable, newest_step, checkpointer.directory)
        check_model_unchanged(run_dir, model_config, newest_step, checkpointer.directory)
    restored = checkpointer.restore_latest(abstract_state, shardings)
    if restored is None:
        state = init(load_init_params(t.init_from, model_config, abstract_state.params) if t.init_from else None)
        if is_main and t.init_from:
            print(f"parameters from {t.init_from}", flush=True)
        start_step = 0
    else:
        state, extra, start_step = restored
        check_data_unchanged(extra, data_setup, start_step, checkpointer.directory, t.allow_data_change)
        if is_main:
            print(f"resumed from the checkpoint of step {start_step}", flush=True)
    if is_main:  # the resume is valid: now the workdir may describe this run (eval.py needs only its path)
        logs.log_to_file(run_dir.log_path)  # what was logged so far was buffered
        run_dir.write_config(config)
        run_dir.write_model_config(model_config)
        shutil.copyfile(tokenizer.path, run_dir.tokenizer_copy_path(tokenizer.path))
        sample = train_batches.tokens_N[:10_000_000]  # a prefix is enough for the yardstick
        print(f"unigram entropy of the training tokens: {unigram_entropy(sample, tokenizer.vocab_size):.4f} "
              "nats/token (the loss of the best context-free model)", flush=True)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    if is_main:
        windows = f" ({t.bptt_windows} windows of {t.seq_len})" if t.bptt_windows > 1 else ""
        print(f"{n_params:,} parameters; {t.num_steps} steps of {t.batch_size} x {step_len} tokens{windows}"
              + (", streamed (state carried across steps)" if carry_rows else ""), flush=True)
        if trainable == "state":
            n_state = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.initial_state))
            print(f"state tuning: the model is frozen; {n_state:,} values of learned initial state are trained "
                  f"(written to {run_dir.state_path})", flush=True)

    # --- 4. Steps ---------------------------------------------------------------------------------
    step_fn = train_step.make_train_step(graphdef, optimizer, schedule, shardings, mesh,
                                         microbatches=t.microbatches, l2wrap_factor=config.optim.l2wrap_factor,
                                         loss_chunk_tokens=t.loss_chunk_tokens, trainable=trainable,
                                         bptt_windows=t.bptt_windows)
    eval_fn = train_step.make_eval_step(graphdef, shardings.params, mesh, loss_chunk_tokens=t.loss_chunk_tokens)
    writer = metrics_lib.MetricsWriter(
        run_dir, total_steps=t.num_steps, tokens_per_step=t.batch_size * step_len,
        flops_per_token=metrics_lib.flops_per_token(model_config.vocab_size, model_config.d_model,
                                                    model_config.n_layer),
        peak_flops=metrics_lib.peak_flops_per_device(t.peak_flops_per_device), num_devices=jax.device_count(),
        is_main=is_main)

    def evaluate(step):
        if eval_batches is None:
            return None
        loss, bpb, tokens = evaluate_loss(eval_fn, state.params, eval_batches, tokenizer, global_batch,
                                          max_batches=t.eval_batches, initial_state=state.initial_state)
        return writer.eval(step, loss, bpb, tokens)

    def save(step):
        checkpointer.save(step, state, {"step": step, "data_seed": config.data.seed, "data": data_setup})
        if state.initial_state is not None and is_main:
            state_tuning.save(run_dir.state_path, state.initial_state, model_config)

    if start_step == 0 and t.init_from and t.eval_every:  # the starting model's loss: what tuning improves on
        evaluate(0)

    preemption = _Preemption()
    last, pending, step = {}, [], start_step
    if is_main and start_step < t.num_steps:
        print(f"compiling the train step (first step {start_step + 1})...", flush=True)
    try:
        while step < t.num_steps:
            state, step_metrics = step_fn(state, global_batch(train_batches.batch_at(step)))
            step += 1
            pending.append((step, step_metrics))
            if len(pending) > 1:  # the previous step is done (or nearly): its streak costs no stall
                _check_streak(writer, pending, config.optim.max_consecutive_bad_steps)
            checkpointer.check()  # a failed async save stops the run now, not one save later
            stop = preemption.requested
            if jax.process_count() > 1 and (step % t.log_every == 0):
                stop = bool(multihost_utils.process_allgather(np.array(stop)).any())
            if step % t.log_every == 0 or step == t.num_steps or step == start_step + 1 or stop:
                last = _log_pending(writer, pending, config.optim.max_consecutive_bad_steps)
                pending = []
            if t.eval_every and step % t.eval_every == 0 and step < t.num_steps:
                evaluate(step)
            if step % config.checkpoint.every_steps == 0 or stop:
                save(step)
            if stop:
                logging.warning("Stopped by SIGTERM after step %d; the checkpoint is saved.", step)
                break
        else:
            if start_step < t.num_steps:
                save(step)
            final_eval = evaluate(step)
            if final_eval:
                last.update(final_eval)
    finally:
        preemption.restore()
        try:
            checkpointer.close()  # waits for the last save; CheckpointSaveError if it failed
        finally:
            writer.close()
    return last


def _log_pending(writer, pending, max_bad_steps: int) -> dict:
    """Write the metrics of the steps since the last log; raise after too many bad steps in a row."""
    fetched = jax.device_get([m for _, m in pending])
    for (step, _), values in zip(pending, fetched):
        if not values["finite"]:
            logging.warning("step %d: non-finite loss (%s) or gradient norm (%s); the update was skipped.",
                            step, values["loss"], values["grad_norm"])
    step, values = pending[-1][0], fetched[-1]
    record = writer.train(step, {k: v for k, v in values.items() if k in ("loss", "lr", "grad_norm")}
                          | {"bad_steps": values["bad_steps"]})
    # The streak may peak inside the window (bad steps, then a good one): check every step's count.
    worst = max(range(len(fetched)), key=lambda i: fetched[i]["bad_steps"])
    step, values = pending[worst][0], fetched[worst]
    if values["bad_steps"] >= max_bad_steps:
        raise BadStepsError(
            f"{int(values['bad_steps'])} consecutive steps up to step {step} had a non-finite loss or gradient; "
            "none of them was applied and the checkpoints hold finite parameters. Lower optim.lr_init, check "
            "the data, or raise optim.max_consecutive_bad_steps.")
    return record


def _check_streak(writer, pending, max_bad_steps: int) -> None:
    """Every step: the bad-step streak of the step before the newest one. That step has (nearly) finished
    while the newest runs, so fetching one scalar costs no pipeline stall; the run stops one step after the
    limit is reached, the steps up to it logged."""
    if int(jax.device_get(pending[-2][1]["bad_steps"])) >= max_bad_steps:
        _log_pending(writer, pending[:-1], max_bad_steps)  # logs the window and raises BadStepsError


def evaluate_loss(eval_fn, params, eval_batches, tokenizer, global_batch, max_batches: int = 0,
                  initial_state=None):
    """(mean loss in nats/token, bits per UTF-8 byte of the targets, token count) over the eval split,
    every window started from `initial_state` (a state-tuning run's learned state) or the empty state."""
    total_loss, total_tokens, total_bytes = 0.0, 0.0, 0
    for i, local in enumerate(eval_batches):
        if max_batches and i >= max_batches:
            break
        loss_sum, count = eval_fn(params, global_batch(local), initial_state)
        total_loss += float(loss_sum)
        total_tokens += float(count)
        for targets, mask in zip(local["targets"], local["mask"]):
            total_bytes += len(tokenizer.decode(targets[mask == 1].tolist()).encode("utf-8"))
    if jax.process_count() > 1:
        total_bytes = int(multihost_utils.process_allgather(np.array(total_bytes)).sum())
    mean = total_loss / max(total_tokens, 1.0)
    return mean, metrics_lib.bits_per_byte(total_loss, total_bytes), int(total_tokens)



def load_init_params(path, model_config: ModelConfig, abstract_params):
    """The parameters of the trained model at `path` (`train.init_from`: a workdir's latest checkpoint, a
    .pth, an HF or rwkv_jax directory) in the layout and dtypes of `abstract_params`, the training model's.
    ValueError (one line) when its shape is not `model_config`'s."""
    loaded = weights.load_model(path)
    have, want = state_file.model_shape(loaded.config), state_file.model_shape(model_config)
    if have != want:
        raise ValueError(f"train.init_from={path} is a model of {state_file.describe_shape(have)}, but config.model "
                         f"is {state_file.describe_shape(want)}: set config.model's n_layer, d_model, d_att, d_ffn and "
                         "vocab_size to the model's")
    loaded = with_scan_layers(loaded, model_config.scan_layers)
    values = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    like = nnx.to_pure_dict(abstract_params)
    params = jax.tree.map(lambda x: x, abstract_params)  # a copy to fill
    nnx.replace_by_pure_dict(params, jax.tree.map(lambda a, x: jnp.asarray(x, a.dtype), like, values))
    return params


def describe_data(data_config, tokenizer, train_batches) -> dict:
    """What a resumed run must share with the checkpoint for its batches to continue the same stream:
    the source and its options, the data seed, the tokenizer (kind and file hash), the token count, and
    whether windows reset the state at end-of-text (data.reset_at_eot)."""
    c = data_config
    options = {"stdlib": ("stdlib_root",), "text": ("text_files", "text_split"), "tfds": ("tfds_name",),
               "binidx": ("binidx_prefix",)}[c.source]
    return {"source": c.source, **{k: c[k] for k in options}, "validation_fraction": c.validation_fraction,
            "train_split": c.train_split, "seed": c.seed, "sampling": c.sampling, "tokenizer": c.tokenizer,
            "tokenizer_sha256": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
            "train_tokens": len(train_batches.tokens_N), "reset_at_eot": bool(c.get("reset_at_eot", False))}


def check_data_unchanged(extra: dict, current: dict, step: int, directory, allow: bool) -> None:
    """Refuse (ValueError) a resume whose data setup differs from the one saved with checkpoint `step`,
    unless `allow` (config.train.allow_data_change). Checkpoints from before the setup was saved only
    carry the data seed."""
    saved = dict(extra.get("data") or {"seed": extra.get("data_seed", current["seed"])})
    changed = [f"{k} {saved[k]!r} -> {current.get(k)!r}" for k in saved if saved[k] != current.get(k)]
    if not changed:
        return
    if allow:
        logging.warning("resuming from step %d on a changed data setup (config.train.allow_data_change): %s",
                        step, "; ".join(changed))
        return
    raise ValueError(
        f"resume refused: the data setup differs from the one of checkpoint step {step} in {directory}: "
        f"{'; '.join(changed)}. Rerun with the original data settings, use a new --workdir, or pass "
        "--config.train.allow_data_change=True to continue training on the new data.")


def layers_as_stored(run_dir: Workdir, requested, model_config: ModelConfig) -> ModelConfig:
    """A resumed run keeps the layout its checkpoints hold, layers stacked or a list: with
    scan_layers='auto' whichever platform resumes it (a run begun on CPU resumes with a list on TPU).
    An explicit True/False that differs is refused (IncompatibleCheckpointError, the fix named)."""
    if not run_dir.model_config_path.is_file() and run_dir.run_config() is None:
        return model_config
    stored = run_dir.model_config().scan_layers
    if stored == model_config.scan_layers:
        return model_config
    if str(requested).strip().lower() == "auto":
        return dataclasses.replace(model_config, scan_layers=stored)
    raise IncompatibleCheckpointError(
        f"resume refused: the run's checkpoints hold its layers {'stacked' if stored else 'as a list'} "
        f"(model.scan_layers={stored}), this config asks for scan_layers={model_config.scan_layers}: rerun with "
        f"--config.model.scan_layers={stored}, or use a new --workdir")


def check_model_unchanged(run_dir: Workdir, model_config: ModelConfig, step: int, directory) -> None:
    """Refuse (IncompatibleCheckpointError, both shapes and the fix named) a resume with another model shape
    than the run's (its rwkv_config.json, written by every run once its resume was accepted)."""
    if not run_dir.model_config_path.is_file():
        return
    have, want = state_file.model_shape(run_dir.model_config()), state_file.model_shape(model_config)
    if have != want:
        raise IncompatibleCheckpointError(
            f"resume refused: checkpoint step {step} in {directory} holds a model of "
            f"{state_file.describe_shape(have)}, config.model is {state_file.describe_shape(want)}: rerun with the "
            f"run's config.model (its {run_dir.model_config_path.name}) or use a new --workdir")


def check_sampling_unchanged(extra: dict, current: dict, step: int, directory) -> None:
    """Refuse (ValueError) a resume that changes config.data.sampling, even with allow_data_change: a
    streamed run's train state holds the carried recurrent state and a random-window run's does not.
    Checkpoints from before the option existed were written with 'random'."""
    saved = (extra.get("data") or {}).get("sampling", "random")
    if saved != current["sampling"]:
        raise ValueError(
            f"resume refused: checkpoint step {step} in {directory} was trained with data.sampling={saved!r}, "
            f"this run asks for {current['sampling']!r}, and the train state differs between them (streams "
            f"carry each row's recurrent state). Rerun with --config.data.sampling={saved}, or use a new "
            "--workdir.")


def check_trainable_unchanged(saved_arrays: list[str], trainable: str, step: int, directory) -> None:
    """Refuse (ValueError) a resume that changes config.optim.trainable: a state-tuning run's train state
    holds the learned initial state and an optimizer state for it alone, a full run's an optimizer state
    for every weight. Read from the checkpoint's array names (no arrays), so older checkpoints are told
    apart too."""
    saved = "state" if any(name.startswith("initial_state") for name in saved_arrays) else "all"
    if saved != trainable:
        raise ValueError(
            f"resume refused: checkpoint step {step} in {directory} was trained with optim.trainable={saved!r}, "
            f"this run asks for {trainable!r}, and their train states differ (what the optimizer updates). "
            f"Rerun with --config.optim.trainable={saved}, or use a new --workdir (with --config.train.init_from="
            f"{Path(directory).parent} to start from this run's model).")


def unigram_entropy(tokens_N: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the corpus's token frequencies: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(tokens_N, np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
