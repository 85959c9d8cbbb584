"""The jitted training and evaluation steps over a pure train state (the Flax NNX gemma pattern:
`jax.jit` over `nnx.split` state, not `nnx.jit` in the hot loop).

Parameters and optimizer state are created already sharded: the model is built abstractly, shardings
come from its logical axes, and a jitted initialiser with those out_shardings materialises each shard
on its own device.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from rwkv_jax import optim, sharding
from rwkv_jax.model import RWKV, ModelConfig


class TrainState(NamedTuple):
    step: jax.Array      # int32 scalar: optimizer steps taken (bad steps included)
    params: Any          # nnx.State of the model's Params
    opt_state: Any


def train_state_factory(model_config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                        seed: int):
    """(graphdef, init, abstract state, shardings). `init()` materialises the state shard by shard on
    the mesh; a resumed run restores onto `abstract state` and `shardings` without calling it."""
    abstract_model = nnx.eval_shape(lambda: RWKV(model_config, rngs=nnx.Rngs(seed)))
    graphdef, abstract_params = nnx.split(abstract_model)
    param_shardings = sharding.state_shardings(abstract_params, mesh)

    def init():
        params = nnx.state(RWKV(model_config, rngs=nnx.Rngs(seed)))
        params = jax.lax.with_sharding_constraint(params, param_shardings)
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    abstract_state = jax.eval_shape(init)
    # Optimizer moments mirror the parameters they belong to; counters are replicated.
    opt_shardings = optax.tree_utils.tree_map_params(
        optimizer, lambda _, param_sharding: param_sharding, abstract_state.opt_state, param_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh),
        is_leaf=lambda x: isinstance(x, (nnx.Variable, jax.sharding.Sharding)))
    shardings = TrainState(sharding.replicated(mesh), param_shardings, opt_shardings)
    return graphdef, jax.jit(init, out_shardings=shardings), abstract_state, shardings


def _loss(graphdef, params, inputs_BT, targets_BT, l2wrap_factor, chunk_tokens, reset_BT=None):
    """Mean token cross entropy (with L2Wrap), the head applied chunk by chunk: no [B, T, V] logits.
    `reset_BT`: document resets (config.data.reset_at_eot)."""
    model = nnx.merge(graphdef, params)
    hidden, _ = model.hidden(inputs_BT, reset_BT=reset_BT)
    total, count = optim.chunked_token_losses(model.logits, hidden, targets_BT, chunk_tokens=chunk_tokens,
                                              l2wrap_factor=l2wrap_factor)
    return total / count


def make_train_step(graphdef, optimizer, schedule, shardings: TrainState, mesh: Mesh, *,
                    microbatches: int = 1, l2wrap_factor: float = 1e-4, loss_chunk_tokens: int = 2048):
    """jit(step)(state, batch) -> (state, metrics). `batch` has 'inputs' and 'targets' [B, T] int32, and
    optionally 'reset' [B, T] (document resets); with microbatches > 1 the gradient is accumulated over
    B/microbatches rows at a time."""

    def grads_of(params, inputs, targets, reset=None):
        return jax.value_and_grad(
            lambda p: _loss(graphdef, p, inputs, targets, l2wrap_factor, loss_chunk_tokens, reset))(params)

    def step(state: TrainState, batch):
        with sharding.activation_sharding(mesh):
            rows = (batch["inputs"], batch["targets"], *([batch["reset"]] if "reset" in batch else []))
            if microbatches == 1:
                loss, grads = grads_of(state.params, *rows)
            else:
                split = lambda x: x.reshape(microbatches, -1, *x.shape[1:])

                def accumulate(carry, micro):
                    loss, grads = grads_of(state.params, *micro)
                    return jax.tree.map(jnp.add, carry, (loss, grads)), None

                zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
                (loss, grads), _ = jax.lax.scan(accumulate, zeros, tuple(map(split, rows)))
                loss, grads = jax.tree.map(lambda x: x / microbatches, (loss, grads))
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
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(graphdef, param_shardings, mesh: Mesh, *, loss_chunk_tokens: int = 2048):
    """jit(step)(params, batch) -> (sum of token losses in nats, token count); batch['mask'] (1 = real
    target) leaves out padding; batch['reset'], when there, resets the state (document resets)."""

    def step(params, batch):
        with sharding.activation_sharding(mesh):
            model = nnx.merge(graphdef, params)
            hidden, _ = model.hidden(batch["inputs"], reset_BT=batch.get("reset"))
            return optim.chunked_token_losses(model.logits, hidden, batch["targets"], batch["mask"],
                                              chunk_tokens=loss_chunk_tokens)

    return jax.jit(step, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))
