"""The training recipe of the paper and the official v4neo trainer, from optax pieces.

  * Adam, betas (0.9, 0.99), eps 1e-8, no weight decay by default (option: decoupled decay on matrices
    only), gradient clipping at global norm 1.0.
  * Learning rate: linear warmup from 0.2 * lr_init (as v4neo does), constant until `decay_start`, then
    exponential decay from lr_init to lr_final at the last step.
  * Optional layer-wise multipliers as in v4neo's `layerwise_lr`: time_decay x2, time_first x3.
  * Steps with a non-finite gradient are skipped (optax.apply_if_finite); the loop stops after too many.
  * L2Wrap, v4neo's auxiliary loss: the loss value is unchanged, and its gradient pushes the largest
    logit of every position towards 0 with weight 1e-4 / (B * T).
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import optax


def default_optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "lr_init": 6e-4, "lr_final": 1e-5, "warmup_steps": 50, "decay_start": 0,
        "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "grad_clip": 1.0,
        "weight_decay": 0.0,            # > 0: decoupled decay on 2-D parameters only
        "layerwise_lr": False,          # v4neo: time_decay x2, time_first x3
        "max_consecutive_bad_steps": 10,
        "l2wrap_factor": 1e-4,          # 0 disables L2Wrap
    })


def learning_rate(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Warmup (0.2 -> 1) x lr_init, constant until decay_start, exp decay to lr_final at total_steps."""
    lr_init, lr_final = config.lr_init, config.lr_final
    warmup, decay_start = config.warmup_steps, max(config.decay_start, config.warmup_steps)
    log_ratio = math.log(lr_final / lr_init) if lr_final > 0 and lr_init > 0 else 0.0

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - decay_start) / max(total_steps - 1 - decay_start, 1), 0.0, 1.0)
        lr = lr_init * jnp.exp(log_ratio * progress)
        return lr * jnp.where(step < warmup, 0.2 + 0.8 * step / max(warmup, 1), 1.0)

    return schedule


def _param_group(path, leaf) -> str:
    names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
    if "time_decay" in names:
        return "time_decay"
    if "time_first" in names:
        return "time_first"
    return "matrix" if jnp.ndim(leaf) == 2 else "vector"


def param_groups(params):
    """Label every parameter: 'time_decay', 'time_first', 'matrix' (2-D) or 'vector'."""
    return jax.tree_util.tree_map_with_path(_param_group, params)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate(config, total_steps)
    multipliers = {"time_decay": 2.0, "time_first": 3.0} if config.layerwise_lr else {}
    per_group = optax.partition(
        {group: optax.scale(multipliers.get(group, 1.0)) for group in
         ("time_decay", "time_first", "matrix", "vector")}, param_groups)
    steps = [optax.clip_by_global_norm(config.grad_clip),
             optax.scale_by_adam(b1=config.beta1, b2=config.beta2, eps=config.eps)]
    if config.weight_decay > 0:
        steps.append(optax.add_decayed_weights(
            config.weight_decay, mask=lambda p: jax.tree.map(lambda g: g == "matrix", param_groups(p))))
    steps += [per_group, optax.scale_by_learning_rate(schedule)]
    # Never apply a non-finite update: the training loop stops after max_consecutive_bad_steps instead.
    return optax.apply_if_finite(optax.chain(*steps), max_consecutive_errors=2**31 - 1)


def bad_step_count(opt_state) -> jax.Array:
    """Consecutive non-finite steps so far (from optax.apply_if_finite's state)."""
    return opt_state.notfinite_count


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def l2wrap(loss, logits_BTV, factor: float):
    """Returns `loss`; in the backward pass adds factor/(B*T) * max logit at each argmax (v4neo L2Wrap)."""
    return loss


def _l2wrap_fwd(loss, logits_BTV, factor):
    return loss, logits_BTV


def _l2wrap_bwd(factor, logits_BTV, g):
    B, T, V = logits_BTV.shape
    max_BT = logits_BTV.max(-1)
    # g is 1 for a plain loss; scaling by it keeps the term consistent under gradient accumulation.
    g_logits = jax.nn.one_hot(logits_BTV.argmax(-1), V, dtype=logits_BTV.dtype) * (max_BT * factor / (B * T) * g)[..., None]
    return g, g_logits


l2wrap.defvjp(_l2wrap_fwd, _l2wrap_bwd)


def cross_entropy(logits_BTV, targets_BT, l2wrap_factor: float = 1e-4):
    """Mean next-token cross entropy in nats (fp32), wrapped by L2Wrap when the factor is > 0."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()
    if l2wrap_factor > 0:
        loss = l2wrap(loss, logits_BTV, float(l2wrap_factor))
    return loss
