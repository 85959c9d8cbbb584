"""The jitted training and evaluation steps over a pure train state (the Flax NNX gemma pattern:
`jax.jit` over `nnx.split` state, not `nnx.jit` in the hot loop).

Parameters and optimizer state are created already sharded: the model is built abstractly, shardings
come from its logical axes, and a jitted initialiser with those out_shardings materialises each shard
on its own device.

LoRA (optim.trainable='lora', rwkv_jax/model/lora.py): `params` holds the model with adapters (nnx.LoRAParam
leaves beside the frozen base); the optimizer state covers the adapters alone, only they are differentiated
and updated, and the base passes through bit for bit.

Two optional fields of the train state:
  * `initial_state` (state tuning, optim.trainable='state'): the learned state every window starts from,
    the only thing differentiated and updated; the parameters pass through bit for bit.
  * `carry` (streamed training, config.data.sampling='streams'): the recurrent state of every row of the
    global batch after its last window. Step n starts each row from it and leaves the row's final state
    for step n+1; gradients stop at the window boundary (truncated backpropagation through time: the
    carry is a value, not a function of the parameters being differentiated).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from rwkv_jax.model import ModelConfig, family_of
from rwkv_jax.model import lora as lora_lib
from rwkv_jax.train import optim, sharding, state_tuning


class TrainState(NamedTuple):
    step: jax.Array      # int32 scalar: optimizer steps taken (bad steps included)
    params: Any          # nnx.State of the model's Params
    opt_state: Any
    initial_state: Any = None       # state tuning (optim.trainable='state'): the learned state; else None
    carry: Any = None               # streamed training: each row's state after its last window, else None


def _is_adapter(path, _) -> bool:
    return lora_lib.is_lora_path(path)


def split_adapters(params):
    """(adapters, base) of a LoRA model's state, or of a state of its shardings: the nnx.LoRAParam
    entries (told by their names, lora_a / lora_b) and the rest."""
    return nnx.split_state(params, _is_adapter, ...)


def _trained(state: "TrainState", trainable: str):
    """What the optimizer updates: the learned state, the adapters or every parameter."""
    if trainable == "state":
        return state.initial_state
    return split_adapters(state.params)[0] if trainable == "lora" else state.params


def _with_trained(state: "TrainState", trained, trainable: str) -> "TrainState":
    if trainable == "state":
        return state._replace(initial_state=trained)
    if trainable == "lora":
        return state._replace(params=nnx.merge_state(split_adapters(state.params)[1], trained))
    return state._replace(params=trained)


def train_state_factory(model_config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                        seed: int, *, trainable: str = "all", carry_rows: int = 0, lora=None):
    """(graphdef, init, abstract state, shardings). `init()` materialises the state shard by shard on
    the mesh; `init(params)` starts from given parameters (an nnx.State of the model's Params, e.g. a
    trained model's: `train.init_from`) with a fresh optimizer; a resumed run restores onto `abstract
    state` and `shardings` without calling it. With trainable='state' the optimizer covers the learned
    initial state (rwkv_jax/train/state_tuning.py) alone, and the parameters are only an input. `carry_rows` > 0
    (streamed training: the global batch size) adds the carried recurrent state, empty at init and split
    over the batch axes as the batch rows are.

    With trainable='lora' (`lora`: the model.lora.LoraSpec) the model carries adapters: `init(params)` takes
    the base's parameters alone (no adapters) and adds fresh adapters, or `init(params, adapters)` the
    given ones (an nnx.State of the adapters, `optim.lora_init`)."""
    if trainable not in optim.TRAINABLE:
        raise ValueError(f"trainable must be one of {optim.TRAINABLE}, got {trainable!r}")
    if (trainable == "lora") != (lora is not None):
        raise ValueError("trainable='lora' needs a LoraSpec (lora=...), and only it takes one")
    abstract_model = nnx.eval_shape(lambda: lora_lib.build(model_config, lora, seed))
    graphdef, abstract_params = nnx.split(abstract_model)
    param_shardings = sharding.state_shardings(abstract_params, mesh)

    def build(params):
        carry = family_of(model_config).init_state(model_config, carry_rows) if carry_rows else None
        if trainable == "state":
            learned = state_tuning.init(model_config)
            return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(learned), learned, carry)
        trained = split_adapters(params)[0] if trainable == "lora" else params
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(trained), None, carry)

    def fresh_params():
        return jax.lax.with_sharding_constraint(nnx.state(lora_lib.build(model_config, lora, seed)), param_shardings)

    def fresh():
        return build(fresh_params())

    abstract_state = jax.eval_shape(fresh)
    carry_sharding = sharding.recurrent_state_sharding(mesh, abstract_state.carry) if carry_rows else None
    if trainable == "state":  # the learned state and its optimizer state are small: replicated
        shardings = TrainState(sharding.replicated(mesh), param_shardings, sharding.replicated(mesh),
                               sharding.replicated(mesh), carry_sharding)
    else:
        # Optimizer moments mirror the parameters they belong to (LoRA: the adapters, split along the model
        # width as their base matrices are); counters are replicated.
        trained_shardings = split_adapters(param_shardings)[0] if trainable == "lora" else param_shardings
        opt_shardings = optax.tree_utils.tree_map_params(
            optimizer, lambda _, param_sharding: param_sharding, abstract_state.opt_state, trained_shardings,
            transform_non_params=lambda _: sharding.replicated(mesh),
            is_leaf=lambda x: isinstance(x, (nnx.Variable, jax.sharding.Sharding)))
        shardings = TrainState(sharding.replicated(mesh), param_shardings, opt_shardings, None, carry_sharding)
    init_fresh = jax.jit(fresh, out_shardings=shardings)
    if trainable != "lora":
        init_from = jax.jit(build, in_shardings=(param_shardings,), out_shardings=shardings, donate_argnums=0)
    else:
        adapter_shardings, base_shardings = split_adapters(param_shardings)

        def build_lora(base, adapters):
            if adapters is None:  # fresh adapters (what of the fresh base they need is dead code)
                adapters = split_adapters(fresh_params())[0]
            return build(nnx.merge_state(base, adapters))
        init_lora = jax.jit(build_lora, out_shardings=shardings, donate_argnums=0)

    def init(params=None, adapters=None):
        if params is None:
            return init_fresh()
        if trainable != "lora":
            return init_from(jax.device_put(params, param_shardings))
        return init_lora(jax.device_put(params, base_shardings),
                         None if adapters is None else jax.device_put(adapters, adapter_shardings))

    return graphdef, init, abstract_state, shardings


def _start_state(initial_state, batch_size: int):
    """The state every window starts from: the learned one (state tuning), else None (the empty state)."""
    return None if initial_state is None else state_tuning.to_rwkv_state(initial_state, batch_size)


def _loss(graphdef, params, initial_state, inputs_BT, targets_BT, l2wrap_factor, chunk_tokens, *,
          carry=None, reset_BT=None, windows: int = 1):
    """(mean token cross entropy (with L2Wrap), final state): the head applied chunk by chunk, no [B, T, V]
    logits.

    Each row starts from `carry` when given (streamed training; no gradient flows into it), else from the
    learned `initial_state` (state tuning), else from the empty state. `reset_BT` (config.data.reset_at_eot)
    resets the state to the start state (learned or empty) at end-of-text inputs.

    `windows` > 1 (train.bptt_windows): the T positions are that many consecutive windows, run one after
    the other by a lax.scan that passes the state on, each window rematerialised in the backward pass: the
    loss and gradient of one T-token pass (the gradient flows back across the windows) with the activation
    memory of one window plus a state per window."""
    start = _start_state(initial_state, inputs_BT.shape[0])
    reset_to = None if reset_BT is None else start

    def window(state, xs):
        inputs, targets, reset = xs
        model = nnx.merge(graphdef, params)
        hidden, state = model.hidden(inputs, state, reset_BT=reset, reset_to=reset_to)
        total, count = optim.chunked_token_losses(*model.head_operands(hidden), targets,
                                                  chunk_tokens=chunk_tokens, l2wrap_factor=l2wrap_factor)
        return state, (total, count)

    state = start if carry is None else jax.lax.stop_gradient(carry)
    if windows == 1:
        final, (total, count) = window(state, (inputs_BT, targets_BT, reset_BT))
        return total / count, final
    if state is None:
        state = nnx.merge(graphdef, params).init_state(inputs_BT.shape[0])
    split = lambda x: jnp.swapaxes(x.reshape(x.shape[0], windows, -1), 0, 1)  # [B, K*W] -> [K, B, W]
    body = jax.checkpoint(window, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    xs = (split(inputs_BT), split(targets_BT), None if reset_BT is None else split(reset_BT))
    final, (totals, counts) = jax.lax.scan(body, state, xs)
    # Sums over all windows, divided once: L2Wrap's per-position term is factor / (B * T) as for one pass.
    return totals.sum() / counts.sum(), final


def make_train_step(graphdef, optimizer, schedule, shardings: TrainState, mesh: Mesh, *,
                    microbatches: int = 1, l2wrap_factor: float = optim.L2WRAP_FACTOR,
                    loss_chunk_tokens: int = optim.LOSS_CHUNK_TOKENS,
                    trainable: str = "all", bptt_windows: int = 1, gradient_buffers: bool | None = None):
    """jit(step)(state, batch) -> (state, metrics). `batch` has 'inputs' and 'targets' [B, T] int32, and
    optionally 'reset' [B, T] (document resets); with microbatches > 1 the gradient is accumulated over
    B/microbatches rows at a time. With trainable='state' only `state.initial_state` is differentiated and
    updated: the parameters are returned as they came (bit for bit). With a carried state (`state.carry`),
    each row starts from it and the step leaves each row's final state there. `bptt_windows` > 1: each
    row's T tokens run as that many consecutive windows of T / bptt_windows with the gradient flowing
    across them, one window's activations in memory at a time (see `_loss`). `gradient_buffers` (default:
    on a CPU mesh): the gradients are written into buffers kept from step to step, see
    `_StepWithGradientBuffers`."""
    if trainable not in optim.TRAINABLE:
        raise ValueError(f"trainable must be one of {optim.TRAINABLE}, got {trainable!r}")

    def grads_of(state: TrainState, inputs, targets, reset, carry):
        def loss(trained):
            new = _with_trained(state, trained, trainable)
            params, learned = new.params, new.initial_state
            return _loss(graphdef, params, learned, inputs, targets, l2wrap_factor, loss_chunk_tokens,
                         carry=carry, reset_BT=reset, windows=bptt_windows)
        # State tuning differentiates the learned state alone, LoRA the adapters alone: no gradient of a
        # frozen weight is computed.
        (loss, final), grads = jax.value_and_grad(loss, has_aux=True)(_trained(state, trainable))
        return loss, grads, None if carry is None else final

    def step(state: TrainState, batch, gradient_buffers=None):
        trained = _trained(state, trainable)
        with sharding.activation_sharding(mesh):
            rows = (batch["inputs"], batch["targets"], batch.get("reset"))
            if microbatches == 1:
                loss, grads, final = grads_of(state, *rows, state.carry)
            else:
                split = lambda x: x.reshape(microbatches, -1, *x.shape[1:])
                # The state's batch axis is axis 1 ([n_layer, B, width]): microbatch m takes rows m*b..m*b+b-1
                # of it, as of the batch.
                split_state = lambda x: jnp.moveaxis(x.reshape(x.shape[0], microbatches, -1, *x.shape[2:]), 1, 0)
                join_state = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])

                def accumulate(sums, micro):
                    loss, grads, final = grads_of(state, *micro)
                    return jax.tree.map(jnp.add, sums, (loss, grads)), final

                zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trained))
                carry = None if state.carry is None else jax.tree.map(split_state, state.carry)
                (loss, grads), finals = jax.lax.scan(accumulate, zeros, (*jax.tree.map(split, rows), carry))
                loss, grads = jax.tree.map(lambda x: x / microbatches, (loss, grads))
                final = jax.tree.map(join_state, finals)
        # A non-finite loss must skip the step as a non-finite gradient does: poisoning one gradient leaf
        # makes the global norm NaN, which the optimizer (optim.skip_if_not_finite) acts on. One leaf, not
        # all: a select over every gradient would cost a pass over them, and the norm below is the same
        # reduction the optimizer's clip and skip compute, so XLA computes it once.
        leaves, treedef = jax.tree.flatten(grads)
        leaves[0] = jnp.where(jnp.isfinite(loss), leaves[0], jnp.nan)
        grads = jax.tree.unflatten(treedef, leaves)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, trained)
        trained = optax.apply_updates(trained, updates)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "finite": finite,
                   "bad_steps": optim.bad_step_count(opt_state)}
        carry = None
        if state.carry is not None:
            # A skipped (non-finite) step may leave a NaN state, which would poison every later window of
            # its row and cannot be checkpointed: the streams then go on from the empty state.
            empty = nnx.merge(graphdef, state.params).init_state(batch["inputs"].shape[0])
            carry = jax.tree.map(lambda new, e: jnp.where(finite, new, e), final, empty)
        new_state = _with_trained(state, trained, trainable)._replace(step=state.step + 1, opt_state=opt_state,
                                                                      carry=carry)
        if gradient_buffers is None:
            return new_state, metrics
        return new_state, metrics, grads

    in_shardings, out_shardings = (shardings, sharding.batch_sharding(mesh)), (shardings, sharding.replicated(mesh))
    options = compiler_options(mesh)
    if gradient_buffers is None:
        gradient_buffers = mesh.devices.flat[0].platform == "cpu"
    if not gradient_buffers:
        return jax.jit(step, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=0,
                       compiler_options=options)
    trained_shardings = _trained(shardings, trainable)
    return _StepWithGradientBuffers(
        jax.jit(step, in_shardings=(*in_shardings, trained_shardings),
                out_shardings=(*out_shardings, trained_shardings), donate_argnums=(0, 2),
                keep_unused=True,  # the buffers are not read: unused inputs are dropped unless kept
                compiler_options=options),
        jax.jit(lambda trained: jax.tree.map(jnp.zeros_like, trained), out_shardings=trained_shardings),
        lambda state: _trained(state, trainable))


class _StepWithGradientBuffers:
    """The train step on CPU: `step(state, batch) -> (state, metrics)` as on other platforms, but the
    gradients are written into buffers that live from step to step (donated in, returned, kept here).

    The gradients are the step's largest temporaries (677 of 684 MB at 169M B=1 T=128). XLA:CPU
    allocates its temporaries afresh on every call, and glibc maps a block that large anew from the kernel
    and unmaps it when freed, so every step paid a page fault per 4 KiB of it: 169K faults and about 15% of
    the step's time on this project's 2-core machine. An output that aliases a donated input is written
    where the input was, so the gradients now land in memory that stays mapped (temporaries fell to 119 MB,
    faults to 29K per step). Peak memory is unchanged, but the buffers stay allocated between steps (during
    evaluation too). On TPU and GPU temporaries come from a pool the runtime keeps, and buffers kept apart
    would only raise the peak (gradients could no longer share memory with activations): the plain step."""

    def __init__(self, jitted, zeros, trained_of):
        self._jitted, self._zeros, self._trained_of = jitted, zeros, trained_of
        self._buffers = None

    def __call__(self, state: TrainState, batch):
        if self._buffers is None:
            self._buffers = self._zeros(self._trained_of(state))
        try:
            state, metrics, self._buffers = self._jitted(state, batch, self._buffers)
        except BaseException:
            self._buffers = None  # a failed call may have consumed them: the next one starts from new ones
            raise
        return state, metrics

    def lower(self, state, batch):
        """The step's program for these (possibly abstract) arguments, with the gradient buffers."""
        return self._jitted.lower(state, batch, self._trained_of(state))


def make_eval_step(graphdef, param_shardings, mesh: Mesh, *, loss_chunk_tokens: int = optim.LOSS_CHUNK_TOKENS):
    """jit(step)(params, batch, initial_state) -> (sum of token losses in nats, token count); batch['mask']
    (1 = real target) leaves out padding; batch['reset'], when there, resets the state (document resets).
    `initial_state`: the learned state of a state-tuning run (TrainState.initial_state), or None for the
    empty state."""

    def step(params, batch, initial_state):
        with sharding.activation_sharding(mesh):
            model = nnx.merge(graphdef, params)
            start = _start_state(initial_state, batch["inputs"].shape[0])
            reset = batch.get("reset")
            hidden, _ = model.hidden(batch["inputs"], start, reset_BT=reset, reset_to=None if reset is None else start)
            return optim.chunked_token_losses(*model.head_operands(hidden), batch["targets"], batch["mask"],
                                              chunk_tokens=loss_chunk_tokens)

    return jax.jit(step, in_shardings=(param_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                   out_shardings=sharding.replicated(mesh), compiler_options=compiler_options(mesh))


# XLA:CPU allocates a call's temporaries afresh on every call, by default as one block. glibc maps a block
# over 32 MiB anew from the kernel each time (every 4 KiB page faults on first touch) and unmaps it when
# freed, while smaller freed blocks stay in malloc's free lists for the next call (its mapping threshold
# rises to the largest block freed, up to 32 MiB). In heaps of at most 4 MiB, XLA:CPU's temporaries are
# such blocks: at 169M B=1 T=128 the step's page faults fell from 29K to none (760 -> 721 ms), at the tiny
# config's B=16 T=128 from 52K to 19K (200 -> 166 ms). Single buffers over 32 MiB (large logits chunks,
# activations of long sequences) are still mapped per call: no change at 169M B=2 T=512.
CPU_COMPILER_OPTIONS = {"xla_multiheap_size_constraint_per_heap": 4 * 2**20}


# On TPU, XLA turns a matmul against weights sharded over fsdp into a windowed ("collective") matmul: a
# loop over the weight's shards, each trip computing the output's columns of two shards while the next
# arrive. Every trip reads the whole activation operand again, so a layer's activations are read 4 times
# on 8 chips (fsdp/2 trips, bidirectional), where the weights gathered whole (8 MB per 430M matmul) would
# be read once. 430M on v5e:2x4, batch 64: with the loops the step moved 3.36e11 bytes per chip counting
# each loop's trips (benchmarks/hlo_bytes.py; 2.41e11 by XLA's count, which counts a loop body once),
# without them 1.42e11 (compile_only: roofline MFU 32.1% -> 54.4%, peak memory 2.66 -> 2.46 GiB). The
# weights' all-gathers are then plain async collectives, which XLA's scheduler overlaps with other work.
TPU_COMPILER_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                        "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def compiler_options(mesh: Mesh) -> dict:
    """XLA options for the steps compiled for `mesh`'s platform: `CPU_COMPILER_OPTIONS` on CPU,
    `TPU_COMPILER_OPTIONS` on TPU, none on GPU (TPU and GPU runtimes allocate from a pool they keep)."""
    platform = mesh.devices.flat[0].platform
    return dict({"cpu": CPU_COMPILER_OPTIONS, "tpu": TPU_COMPILER_OPTIONS}.get(platform, {}))
