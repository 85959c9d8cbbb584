"""The training run behind `python train.py`: a linear story in sections.

  1. Setup: the config checked (every value, before any work), the device mesh, the workdir locked.
  2. Data: dataset, tokenizer and batches (rwkv_jax.data).
  3. State: parameters and optimizer state created sharded (or the parameters of `train.init_from`, a
     trained model), or restored from the latest good checkpoint; a resume whose model or data setup
     differs from the checkpoint's is refused. Only then is anything written into the workdir
     (config.json, rwkv_config.json, the tokenizer). State tuning (optim.trainable='state') adds the
     learned initial state, the only thing trained, also written to WORKDIR/state.npz at every checkpoint.
     LoRA (optim.trainable='lora') adds adapters to the model; the checkpoints hold them beside the frozen
     base (so the workdir stands alone), the optimizer state covers them alone.
  4. Steps: the jitted train step, periodic logging, evaluation and async checkpoints; SIGTERM
     (preemption) saves and returns; Ctrl-C saves and raises KeyboardInterrupt (a second one at once);
     too many non-finite steps in a row stop the run with an error.
  5. End: a final checkpoint and evaluation, and the loss curves as a PNG.

Batch n is a pure function of (data seed, n), so a run resumed from the checkpoint of step n sees
exactly the batches an uninterrupted run sees: the checkpointed step is the whole data position. With
config.data.sampling='streams' the recurrent state carried from step to step is part of the train state
and of its checkpoints, so a resumed stream goes on from the very state it had.
"""

import dataclasses
import math
import os
import shutil
import signal
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from rwkv_jax.data import make_datasets
from rwkv_jax.io import logs, weights, workdir_lock
from rwkv_jax.io.checkpoint import Checkpointer
from rwkv_jax.io.workdir import Workdir
from rwkv_jax.model import ModelConfig, family_of, state_file, with_scan_layers
from rwkv_jax.model import lora as lora_lib
from rwkv_jax.train import metrics as metrics_lib
from rwkv_jax.train import optim as optim_lib
from rwkv_jax.train import program as program_lib
from rwkv_jax.train import resume, sharding, state_tuning
from rwkv_jax.train import train_config as config_lib
from rwkv_jax.train import train_step as train_step_lib


class BadStepsError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class _Preemption:
    """Remembers a SIGTERM (preemption) or a first Ctrl-C (SIGINT) so the loop can checkpoint and stop at the
    next step boundary; a second Ctrl-C raises KeyboardInterrupt at once. Only in the main thread (signal
    handlers cannot be set elsewhere): a trainer run from another thread keeps the process's handlers."""

    def __init__(self):
        self.requested = None  # the signal's name once one came
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested == "Ctrl-C":
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            logging.warning("Ctrl-C: saving a checkpoint and stopping after this step (Ctrl-C again to stop at "
                            "once, unsaved).")
            self.requested = "Ctrl-C"
        elif not self.requested:
            logging.warning("SIGTERM received: saving a checkpoint and stopping after this step.")
            self.requested = "SIGTERM"

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def train(config: ml_collections.ConfigDict, workdir) -> dict:
    """Train as `config` says, in `workdir` (resuming whatever it holds). Returns the last metrics."""
    # --- 1. Setup ---------------------------------------------------------------------------------
    run_dir = Workdir(workdir)
    workdir = run_dir.path
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    model_config = program_lib.resolve(config, jax.default_backend())
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
        model_config = resume.layers_as_stored(run_dir, config.model.scan_layers, model_config)
    created = [path for path in (workdir, run_dir.checkpoints_dir) if not path.exists()]
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        lock = _lock_workdir(workdir, is_main)
        try:
            return _train(config, run_dir, model_config, mesh, is_main)
        finally:
            if lock is not None:
                workdir_lock.release(lock)
    except BaseException:
        # A refused run (missing data, a bad init_from, ...) leaves no empty directories behind; once the run
        # has described itself (config.json) its workdir keeps its layout, checkpoints/ included.
        if is_main and not run_dir.config_path.exists():
            _remove_if_empty(reversed(created))
        raise


def _remove_if_empty(directories) -> None:
    for directory in directories:
        try:
            directory.rmdir()  # only if empty: anything written stays
        except OSError:
            pass


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
    data_setup = resume.describe_data(config.data, t, tokenizer, train_batches)
    batch_sharding = sharding.batch_sharding(mesh)

    def global_batch(local):
        return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}

    # --- 3. State ---------------------------------------------------------------------------------
    trainable = config.optim.trainable
    program = program_lib.build(config, mesh, jax.default_backend(), model_config=model_config)
    init, abstract_state, shardings = program.init, program.abstract_state, program.shardings
    carry_rows = program_lib.carry_rows(config)
    checkpointer = Checkpointer(run_dir.checkpoints_dir, keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    if is_main:
        workdir_lock.check_writable(checkpointer.directory)
    newest = checkpointer.newest_extra()  # before reading any array: the state's layout depends on it
    if newest is not None:
        extra, saved_arrays, newest_step = newest
        resume.check_sampling_unchanged(extra, data_setup, newest_step, checkpointer.directory)
        resume.check_trainable_unchanged(saved_arrays, trainable, newest_step, checkpointer.directory)
        resume.check_model_unchanged(run_dir, model_config, newest_step, checkpointer.directory)
    restored = checkpointer.restore_latest(abstract_state, shardings)
    if restored is None:
        state = start_state(config, model_config, init, abstract_state, is_main)
        start_step = 0
    else:
        state, extra, start_step = restored
        resume.check_data_unchanged(extra, data_setup, start_step, checkpointer.directory, t.allow_data_change)
        if start_step >= t.num_steps:  # a finished run: this config describes none of its checkpoints
            return _finished(checkpointer, start_step, t.num_steps, is_main)
        if is_main:
            print(f"resumed from the checkpoint of step {start_step}", flush=True)
    if is_main:  # the resume is valid: now the workdir may describe this run (eval.py needs only its path)
        logs.log_to_file(run_dir.log_path)  # what was logged so far was buffered
        metrics_lib.drop_records_after(run_dir.metrics_path, start_step)  # the steps after it come again
        run_dir.write_config(config)
        # 'auto' WKV form stays 'auto' in the workdir: another platform reading the run picks its own
        run_dir.write_model_config(dataclasses.replace(model_config, wkv_form=config.model.wkv_form))
        shutil.copyfile(tokenizer.path, run_dir.tokenizer_copy_path(tokenizer.path))
        sample = train_batches.tokens_N[:10_000_000]  # a prefix is enough for the yardstick
        print(f"unigram entropy of the training tokens: {unigram_entropy(sample, tokenizer.vocab_size):.4f} "
              "nats/token (the loss of the best context-free model)", flush=True)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    if is_main:
        windows = f" ({t.bptt_windows} windows of {t.seq_len})" if t.bptt_windows > 1 else ""
        print(f"{n_params:,} parameters; {t.num_steps} steps of {t.batch_size} x {step_len} tokens{windows}"
              + (", streamed (state carried across steps)" if carry_rows else ""), flush=True)
        if trainable == "lora":
            _print_lora(config.optim, program, abstract_state)
        if trainable == "state":
            n_state = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.initial_state))
            print(f"state tuning: the model is frozen; {n_state:,} values of learned initial state are trained "
                  f"(written to {run_dir.state_path})", flush=True)

    # --- 4. Steps ---------------------------------------------------------------------------------
    step_fn, eval_fn = program.train_step, program.eval_step
    writer = metrics_lib.MetricsWriter(
        run_dir, total_steps=t.num_steps, tokens_per_step=t.batch_size * step_len,
        flops_per_token=family_of(model_config).flops_per_token(model_config),
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
            stop = bool(preemption.requested)
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
                logging.warning("Stopped by %s after step %d; the checkpoint is saved: rerun the same command to "
                                "resume.", preemption.requested or "another process's SIGTERM", step)
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
    if preemption.requested == "Ctrl-C":
        raise KeyboardInterrupt  # saved: the command still reports the interruption (exit code 130)
    return last


def start_state(config, model_config: ModelConfig, init, abstract_state, is_main: bool):
    """The train state at step 0: fresh, or from `train.init_from`'s parameters; a LoRA run adds fresh
    adapters to them, or those of `optim.lora_init`."""
    t, o = config.train, config.optim
    if not t.init_from:
        if is_main and o.trainable == "lora":
            logging.warning("optim.trainable='lora' without train.init_from: adapting a randomly initialised model")
        return init()
    abstract_params = abstract_state.params
    if o.trainable == "lora":
        abstract_adapters, abstract_params = train_step_lib.split_adapters(abstract_params)
    params = load_init_params(t.init_from, model_config, abstract_params)
    if is_main:
        print(f"parameters from {t.init_from}", flush=True)
    if o.trainable != "lora" or not o.lora_init:
        return init(params)
    spec = optim_lib.lora_spec(o)
    arrays = lora_lib.load_adapters(os.path.expanduser(o.lora_init), model_config, spec)
    if is_main:
        print(f"LoRA adapters from {o.lora_init}", flush=True)
    return init(params, lora_lib.adapters_state(arrays, abstract_adapters, model_config.scan_layers))


def _print_lora(optim_config, program, abstract_state) -> None:
    """What a LoRA run trains, and its optimizer state beside full fine-tuning's (from shapes alone)."""
    spec = optim_lib.lora_spec(optim_config)
    adapters, base = train_step_lib.split_adapters(abstract_state.params)
    n_adapters = sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))
    lora_bytes = tree_bytes(abstract_state.opt_state)
    full_bytes = tree_bytes(jax.eval_shape(program.optimizer.init, base))
    print(f"LoRA: rank {spec.rank}, alpha {spec.alpha:g}, targets {','.join(spec.targets)}; {n_adapters:,} adapter "
          f"values trained, the base frozen", flush=True)
    print(f"optimizer state: {lora_bytes / 2**20:,.2f} MiB for the adapters; full fine-tuning's would be "
          f"{full_bytes / 2**20:,.2f} MiB ({100 * lora_bytes / full_bytes:.2f}%)", flush=True)


def tree_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) in `tree`."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _finished(checkpointer, step: int, num_steps: int, is_main: bool) -> dict:
    """Nothing to train: the workdir is left as it is (its config.json describes its checkpoints)."""
    checkpointer.close()
    if is_main:
        print(f"the run is finished: checkpoint step {step} is {'past ' if step > num_steps else ''}"
              f"train.num_steps={num_steps}, nothing to train; the workdir is unchanged (raise "
              "--config.train.num_steps to train further, evaluate with eval.py)", flush=True)
    return {"step": step}


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


def unigram_entropy(tokens_N: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the corpus's token frequencies: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(tokens_N, np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
