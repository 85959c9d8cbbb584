"""The jitted training and evaluation steps over a pure train state (the Flax NNX gemma pattern:
`jax.jit` over `nnx.split` state, not `nnx.jit` in the hot loop).

Parameters and optimizer state are created already sharded: the model is built abstractly, shardings
come from its logical axes, and a jitted initialiser with those out_shardings materialises each shard
on its own device.

Streamed training (config.data.sampling='streams'): the state also holds `carry`, the recurrent state
of every row of the global batch after its last window. Step n starts each row from it and leaves the
row's final state for step n+1; gradients stop at the window boundary (truncated backpropagation through
time: the carry is a value, not a function of the parameters being differentiated).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from rwkv_jax import optim, sharding
from rwkv_jax.model import RWKV, ModelConfig, RWKVState, init_state


class TrainState(NamedTuple):
    step: jax.Array      # int32 scalar: optimizer steps taken (bad steps included)
    params: Any          # nnx.State of the model's Params
    opt_state: Any
    carry: RWKVState | None = None  # streamed training: each row's state after its last window, else None


def train_state_factory(model_config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                        seed: int, *, carry_rows: int = 0):
    """(graphdef, init, abstract state, shardings). `init()` materialises the state shard by shard on
    the mesh; a resumed run restores onto `abstract state` and `shardings` without calling it.
    `carry_rows` > 0 (streamed training: the global batch size) adds the carried recurrent state, empty
    at init and split over the batch axes as the batch rows are."""
    abstract_model = nnx.eval_shape(lambda: RWKV(model_config, rngs=nnx.Rngs(seed)))
    graphdef, abstract_params = nnx.split(abstract_model)
    param_shardings = sharding.state_shardings(abstract_params, mesh)

    def init():
        params = nnx.state(RWKV(model_config, rngs=nnx.Rngs(seed)))
        params = jax.lax.with_sharding_constraint(params, param_shardings)
        carry = init_state(model_config, carry_rows) if carry_rows else None
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), carry)

    abstract_state = jax.eval_shape(init)
    # Optimizer moments mirror the parameters they belong to; counters are replicated.
    opt_shardings = optax.tree_utils.tree_map_params(
        optimizer, lambda _, param_sharding: param_sharding, abstract_state.opt_state, param_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh),
        is_leaf=lambda x: isinstance(x, (nnx.Variable, jax.sharding.Sharding)))
    shardings = TrainState(sharding.replicated(mesh), param_shardings, opt_shardings,
                           sharding.recurrent_state_sharding(mesh) if carry_rows else None)
    return graphdef, jax.jit(init, out_shardings=shardings), abstract_state, shardings


def _loss(graphdef, params, inputs_BT, targets_BT, carry, l2wrap_factor, chunk_tokens, windows=1):
    """(mean token cross entropy (with L2Wrap), final state): the head applied chunk by chunk, no [B, T, V]
    logits. `carry` (None: the empty state) is where each row starts; no gradient flows into it.

    `windows` > 1 (train.bptt_windows): the T positions are that many consecutive windows, run one after
    the other by a lax.scan that passes the state on, each window rematerialised in the backward pass: the
    loss and gradient of one T-token pass (the gradient flows back across the windows) with the activation
    memory of one window plus a state per window."""
    def window(state, xs):
        model = nnx.merge(graphdef, params)
        hidden, state = model.hidden(xs[0], state)
        total, count = optim.chunked_token_losses(model.logits, hidden, xs[1], chunk_tokens=chunk_tokens,
                                                  l2wrap_factor=l2wrap_factor)
        return state, (total, count)

    state = None if carry is None else jax.lax.stop_gradient(carry)
    if windows == 1:
        final, (total, count) = window(state, (inputs_BT, targets_BT))
        return total / count, final
    if state is None:
        state = init_state(nnx.merge(graphdef, params).config, inputs_BT.shape[0])
    split = lambda x: jnp.swapaxes(x.reshape(x.shape[0], windows, -1), 0, 1)  # [B, K*W] -> [K, B, W]
    body = jax.checkpoint(window, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    final, (totals, counts) = jax.lax.scan(body, state, (split(inputs_BT), split(targets_BT)))
    # Sums over all windows, divided once: L2Wrap's per-position term is factor / (B * T) as for one pass.
    return totals.sum() / counts.sum(), final


def make_train_step(graphdef, optimizer, schedule, shardings: TrainState, mesh: Mesh, *,
                    microbatches: int = 1, l2wrap_factor: float = 1e-4, loss_chunk_tokens: int = 2048,
                    bptt_windows: int = 1):
    """jit(step)(state, batch) -> (state, metrics). `batch` has 'inputs' and 'targets' [B, T] int32;
    with microbatches > 1 the gradient is accumulated over B/microbatches rows at a time. With a carried
    state (`state.carry`), each row starts from it and the step leaves each row's final state there.
    `bptt_windows` > 1: each row's T tokens run as that many consecutive windows of T / bptt_windows with
    the gradient flowing across them, one window's activations in memory at a time (see `_loss`)."""

    def grads_of(params, inputs, targets, carry):
        (loss, final), grads = jax.value_and_grad(
            lambda p: _loss(graphdef, p, inputs, targets, carry, l2wrap_factor, loss_chunk_tokens, bptt_windows),
            has_aux=True)(params)
        return loss, grads, None if carry is None else final

    def step(state: TrainState, batch):
        with sharding.activation_sharding(mesh):
            inputs, targets = batch["inputs"], batch["targets"]
            if microbatches == 1:
                loss, grads, final = grads_of(state.params, inputs, targets, state.carry)
            else:
                split = lambda x: x.reshape(microbatches, -1, *x.shape[1:])
                # The state's batch axis is axis 1 ([n_layer, B, width]): microbatch m takes rows m*b..m*b+b-1
                # of it, as of the batch.
                split_state = lambda x: jnp.moveaxis(x.reshape(x.shape[0], microbatches, -1, *x.shape[2:]), 1, 0)
                join_state = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])

                def accumulate(sums, micro):
                    loss, grads, final = grads_of(state.params, *micro)
                    return jax.tree.map(jnp.add, sums, (loss, grads)), final

                zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
                carry = None if state.carry is None else jax.tree.map(split_state, state.carry)
                (loss, grads), finals = jax.lax.scan(accumulate, zeros, (split(inputs), split(targets), carry))
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
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "finite": finite,
                   "bad_steps": optim.bad_step_count(opt_state)}
        carry = None
        if state.carry is not None:
            # A skipped (non-finite) step may leave a NaN state, which would poison every later window of
            # its row and cannot be checkpointed: the streams then go on from the empty state.
            empty = init_state(nnx.merge(graphdef, params).config, inputs.shape[0])
            carry = jax.tree.map(lambda new, e: jnp.where(finite, new, e), final, empty)
        return TrainState(state.step + 1, params, opt_state, carry), metrics

    return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(graphdef, param_shardings, mesh: Mesh, *, loss_chunk_tokens: int = 2048):
    """jit(step)(params, batch) -> (sum of token losses in nats, token count); batch['mask'] (1 = real
    target) leaves out padding."""

    def step(params, batch):
        with sharding.activation_sharding(mesh):
            model = nnx.merge(graphdef, params)
            hidden, _ = model.hidden(batch["inputs"])
            return optim.chunked_token_losses(model.logits, hidden, batch["targets"], batch["mask"],
                                              chunk_tokens=loss_chunk_tokens)

    return jax.jit(step, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))
