"""The training recipe of the paper and the official v4neo trainer, from optax pieces.

  * Adam, betas (0.9, 0.99), eps 1e-8, no weight decay by default (option: decoupled decay on matrices
    only), gradient clipping at global norm 1.0.
  * Learning rate: linear warmup from `warmup_from` x lr_init (0.2, as v4neo does), constant until
    `decay_start`, then exponential decay from lr_init to lr_final at the last step; or (schedule='cosine',
    RWKV-7's official train_temp trainer) a cosine from lr_init towards lr_final, warming up from 0.01.
  * Optional layer-wise multipliers as in v4neo's `layerwise_lr`: time_decay x2, time_first x3.
  * Steps with a non-finite gradient are skipped (optax.apply_if_finite); the loop stops after too many.
  * L2Wrap, v4neo's auxiliary loss: the loss value is unchanged, and its gradient pushes the largest
    logit of every position towards 0 with weight 1e-4 / (B * T).
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rwkv_jax import model as model_lib
from rwkv_jax.model import lora as lora_lib

# optim.trainable: every parameter, the learned initial state alone, or LoRA adapters (rwkv_jax/model/lora.py)
TRAINABLE = ("all", "state", "lora")
L2WRAP_FACTOR = 1e-4          # v4neo's
LOSS_CHUNK_TOKENS = 2048      # train.loss_chunk_tokens: positions the head and cross entropy take at a time
SCHEDULES = ("exponential", "cosine")  # optim.schedule: v4neo's decay, or RWKV-7 train_temp's


def default_optim_config() -> ml_collections.ConfigDict:
    """The `config.optim` section's defaults."""
    return ml_collections.ConfigDict({
        "lr_init": 6e-4, "lr_final": 1e-5, "warmup_steps": 50, "decay_start": 0,
        "schedule": "exponential",     # SCHEDULES: the decay after warmup (see `learning_rate`)
        "warmup_from": 0.2,            # the warmup's first learning rate, a fraction of lr_init
        "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "grad_clip": 1.0,
        "weight_decay": 0.0,            # > 0: decoupled decay on 2-D parameters only
        "layerwise_lr": False,          # v4neo: time_decay x2, time_first x3
        "max_consecutive_bad_steps": 10,
        "l2wrap_factor": L2WRAP_FACTOR,  # 0 disables L2Wrap
        "trainable": "all",             # TRAINABLE; 'state': state tuning, the model frozen (state_tuning.py)
        # trainable='lora': adapters of this rank on these projections, scaled by alpha / rank (model/lora.py);
        # lora_init: an adapters file (`rwkv-convert WORKDIR OUT.npz --adapters_only`) to start from
        "lora_rank": 16, "lora_alpha": 32.0, "lora_targets": ",".join(lora_lib.DEFAULT_TARGETS), "lora_init": "",
    })


def lora_spec(config: ml_collections.ConfigDict) -> "lora_lib.LoraSpec | None":
    """The LoraSpec of a `config.optim` section with trainable='lora', else None."""
    if config.trainable != "lora":
        return None
    return lora_lib.LoraSpec(int(config.lora_rank), float(config.lora_alpha),
                             lora_lib.parse_targets(config.lora_targets))


def check_section(checks) -> None:
    """Add the problems of `checks.config.optim` alone to `checks` (config_checks.Checks)."""
    o = checks.config.optim
    checks.positive("optim", "lr_init")
    checks.positive("optim", "lr_final", " (the decay goes from lr_init to lr_final)")
    checks.one_of("optim", "schedule", SCHEDULES)
    checks.need(isinstance(o.warmup_from, (int, float)) and 0 < o.warmup_from <= 1,
                f"optim.warmup_from must be in (0, 1] (a fraction of lr_init), got {o.warmup_from!r}")
    for field in ("warmup_steps", "decay_start", "weight_decay", "l2wrap_factor"):
        checks.at_least("optim", field, 0)
    for field in ("beta1", "beta2"):
        checks.need(0 <= o[field] < 1, f"optim.{field} must be in [0, 1), got {o[field]!r}")
    checks.positive("optim", "eps")
    checks.positive("optim", "grad_clip")
    checks.at_least("optim", "max_consecutive_bad_steps", 1)
    checks.one_of("optim", "trainable", TRAINABLE)
    if o.trainable == "lora":
        checks.need(isinstance(o.lora_rank, int) and o.lora_rank > 0,
                    f"optim.lora_rank must be a positive integer, got {o.lora_rank!r}")
        checks.positive("optim", "lora_alpha", " (the adapters' product is scaled by lora_alpha / lora_rank)")
        checks.need(not o.lora_init or os.path.isfile(os.path.expanduser(o.lora_init)),
                    f"optim.lora_init={o.lora_init!r} does not exist: give an adapters file of `rwkv-convert WORKDIR "
                    "OUT.npz --adapters_only`, or leave it empty for fresh adapters")


def learning_rate(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The learning rate of the update at `step` (0 for the first): lr_init x decay(step) x warmup(step), with

        warmup(step) = warmup_from + (1 - warmup_from) step / warmup_steps   for step < warmup_steps, else 1
        p = clip((step - s) / (N - s), 0, 1),  s = max(decay_start, warmup_steps)
        exponential:  decay = (lr_final / lr_init) ** p,              N = total_steps - 1 (lr_final at the last step)
        cosine:       decay = (1 + f) / 2 + (1 - f) / 2 * cos(pi p),  N = total_steps, f = lr_final / lr_init

    'exponential' with warmup_from 0.2 is v4neo's schedule (RWKV-4). 'cosine' with warmup_from 0.01 is
    RWKV-7's: RWKV-v7/train_temp/src/trainer.py decays by a cosine from the end of warmup (decay_start 0)
    to reach lr_final at my_exit_tokens (here total_steps), and multiplies the first warmup_steps by
    0.01 + 0.99 step / warmup_steps."""
    lr_init, lr_final = config.lr_init, config.lr_final
    warmup, decay_start = config.warmup_steps, max(config.decay_start, config.warmup_steps)
    warmup_from = config.get("warmup_from", 0.2)  # configs saved before the field existed
    cosine = config.get("schedule", "exponential") == "cosine"
    log_ratio = math.log(lr_final / lr_init) if lr_final > 0 and lr_init > 0 else 0.0
    final_factor = lr_final / lr_init if lr_init > 0 else 1.0
    span = max(total_steps - decay_start - (0 if cosine else 1), 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - decay_start) / span, 0.0, 1.0)
        if cosine:
            lr = lr_init * ((0.5 + final_factor / 2) + (0.5 - final_factor / 2) * jnp.cos(jnp.pi * progress))
        else:
            lr = lr_init * jnp.exp(log_ratio * progress)
        return lr * jnp.where(step < warmup, warmup_from + (1 - warmup_from) * step / max(warmup, 1), 1.0)

    return schedule


def _param_group(path, leaf) -> str:
    names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
    special = [n for n in names if n in model_lib.all_lr_multipliers()]  # the model families' own groups
    if special:
        return special[-1]
    # Matrices by name, not rank: with scan_layers a block's matrices are [L, in, out] and its vectors [L, C].
    return "matrix" if ("kernel" in names or "embedding" in names or lora_lib.is_lora_path(names)) else "vector"


def param_groups(params):
    """Label every parameter: a name with its own learning-rate multiplier in its model family (RWKV-4's
    'time_decay', 'time_first'), 'matrix' (projections, embedding) or 'vector'."""
    return jax.tree_util.tree_map_with_path(_param_group, params)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Clip, Adam, optional decay, layer-wise multipliers and the schedule, with non-finite steps skipped:
    `reference_optimizer`'s state and updates (to rounding), computed by `_fused_update` in passes that
    XLA runs in place over the donated state (see there)."""
    reference = reference_optimizer(config, total_steps)
    return optax.GradientTransformation(
        reference.init, functools.partial(_fused_update, config, learning_rate(config, total_steps)))


def reference_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """The recipe as an optax chain: the definition `make_optimizer` follows, and its state's layout."""
    schedule = learning_rate(config, total_steps)
    steps = [optax.clip_by_global_norm(config.grad_clip),
             optax.scale_by_adam(b1=config.beta1, b2=config.beta2, eps=config.eps)]
    if config.weight_decay > 0:
        steps.append(optax.add_decayed_weights(
            config.weight_decay, mask=lambda p: jax.tree.map(lambda g: g == "matrix", param_groups(p))))
    if config.layerwise_lr:  # v4neo's layerwise_lr: time_decay x2, time_first x3
        steps.append(_scale_by_group(model_lib.all_lr_multipliers()))
    steps.append(optax.scale_by_learning_rate(schedule))
    # Never apply a non-finite update: the training loop stops after max_consecutive_bad_steps instead.
    return skip_if_not_finite(optax.chain(*steps))


def _materialised_on_cpu(x):
    """`x` as it is, computed before anything that uses it on CPU: XLA:CPU fuses no pass with several
    outputs, so without the barrier it recomputes the new moments inside the update pass (see
    `_fused_update`). XLA on TPU and GPU fuses the three outputs into one pass by itself, which a barrier
    would split (the 169M step's bytes per chip on v5e rose by 1.2e9 with it)."""
    return jax.lax.platform_dependent(x, cpu=jax.lax.optimization_barrier, default=lambda x: x)


def _fused_update(config: ml_collections.ConfigDict, schedule: optax.Schedule, grads, state, params=None):
    """`reference_optimizer`'s update, written so the whole optimizer costs one reduction over the gradients
    (their global norm) and three in-place passes per parameter: the new first moment (reads it and the
    gradient), the new second moment (the same), then the update, which reads the parameter and the two
    new moments; `optax.apply_updates` in the train step fuses into the last. On CPU an optimization barrier
    keeps XLA from recomputing the moments inside the update pass: with the chain, it did, so every pass read
    the old moments, and with the state donated XLA first copied the parameter and both moments to keep
    them, and wrote the clipped gradient out. Per element the arithmetic is the chain's, in the same order,
    but for the clip factor."""
    b1, b2, eps, eps_root = config.beta1, config.beta2, config.eps, 0.0
    adam, lr_state = state.inner_state[1], state.inner_state[-1]
    norm = optax.global_norm(grads)
    finite = jnp.isfinite(norm)
    # optax.clip_by_global_norm computes (g / norm) * grad_clip per element; one factor per step instead
    # (equal to rounding) lets XLA fuse the clip into both moment passes rather than write the clipped
    # gradients out.
    clip = jnp.where(norm < config.grad_clip, 1.0, config.grad_clip / norm)
    count = optax.safe_increment(adam.count)
    step_size = -schedule(lr_state.count)
    multipliers = model_lib.all_lr_multipliers()
    groups = param_groups(grads)  # the parameters' labels: the same tree paths
    if params is None and config.weight_decay > 0:
        raise ValueError("weight decay needs the parameters: call update(grads, state, params)")
    params = grads if params is None else params  # read only by weight decay

    def one(g, mu, nu, p, group):
        g = g * clip.astype(g.dtype)
        mu_new = jnp.where(finite, (1 - b1) * g + b1 * mu, mu)
        nu_new = jnp.where(finite, (1 - b2) * (g ** 2) + b2 * nu, nu)
        mu_new, nu_new = _materialised_on_cpu((mu_new, nu_new))
        mu_hat = mu_new / (1 - b1 ** count).astype(mu.dtype)
        nu_hat = nu_new / (1 - b2 ** count).astype(nu.dtype)
        u = mu_hat / (jnp.sqrt(nu_hat + eps_root) + eps)
        if config.weight_decay > 0 and group == "matrix":
            u = u + config.weight_decay * p
        if config.layerwise_lr and group in multipliers:
            u = u * multipliers[group]
        u = jnp.array(step_size, dtype=u.dtype) * u
        return jnp.where(finite, u, jnp.zeros_like(u)), mu_new, nu_new

    treedef = jax.tree.structure(grads)
    columns = zip(*map(one, *(jax.tree.leaves(t) for t in (grads, adam.mu, adam.nu, params, groups))))
    updates, mu, nu = (treedef.unflatten(column) for column in columns)
    inner = list(state.inner_state)
    inner[1] = optax.ScaleByAdamState(count=jnp.where(finite, count, adam.count), mu=mu, nu=nu)
    inner[-1] = lr_state._replace(count=jnp.where(finite, optax.safe_increment(lr_state.count), lr_state.count))
    bad = jnp.logical_not(finite).astype(jnp.int32)
    return updates, optax.ApplyIfFiniteState(
        notfinite_count=jnp.where(finite, 0, state.notfinite_count + 1), last_finite=finite,
        total_notfinite=state.total_notfinite + bad, inner_state=tuple(inner))


def _scale_by_group(multipliers: dict[str, float]) -> optax.GradientTransformation:
    """Multiply each parameter's update by its group's factor (stateless, elementwise)."""
    def update(updates, state, params=None):
        groups = param_groups(updates)
        return jax.tree.map(lambda u, g: u * multipliers.get(g, 1.0) if g in multipliers else u,
                            updates, groups), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def skip_if_not_finite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """optax.apply_if_finite's contract and state (optax.ApplyIfFiniteState), deciding on the gradients
    instead of the updates: a step whose gradients hold a NaN or Inf leaves the parameters and the inner
    state unchanged (zero updates) and is counted. Deciding on the input lets the selection fuse into the
    update pass; apply_if_finite's reduction over the finished updates forces them through memory first."""
    def init(params):
        return optax.ApplyIfFiniteState(notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True),
                                        total_notfinite=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update(updates, state, params=None):
        finite = jnp.isfinite(optax.global_norm(updates))
        new_updates, new_inner = inner.update(updates, state.inner_state, params)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
        new_inner = jax.tree.map(keep, new_inner, state.inner_state)
        bad = jnp.logical_not(finite).astype(jnp.int32)
        return new_updates, optax.ApplyIfFiniteState(
            notfinite_count=jnp.where(finite, 0, state.notfinite_count + 1), last_finite=finite,
            total_notfinite=state.total_notfinite + bad, inner_state=new_inner)

    return optax.GradientTransformation(init, update)


def bad_step_count(opt_state) -> jax.Array:
    """Consecutive non-finite steps so far (from optax.apply_if_finite's state)."""
    return opt_state.notfinite_count


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def l2wrap(loss, logits, scale: float):
    """Returns `loss`; in the backward pass adds scale * max logit at each position's argmax (v4neo
    L2Wrap, whose scale is 1e-4 / (B * T) for a mean loss over B x T positions)."""
    return loss


def _l2wrap_fwd(loss, logits, scale):
    return loss, logits


def _l2wrap_bwd(scale, logits, g):
    # g is 1 for a plain loss; scaling by it keeps the term consistent under gradient accumulation and
    # when the loss is a chunk's sum inside a mean (chunked_cross_entropy).
    max_logit = logits.max(-1)
    one_hot = jax.nn.one_hot(logits.argmax(-1), logits.shape[-1], dtype=logits.dtype)
    g_logits = one_hot * (max_logit * scale * g)[..., None]
    return g, g_logits


l2wrap.defvjp(_l2wrap_fwd, _l2wrap_bwd)


def cross_entropy(logits_BTV, targets_BT, l2wrap_factor: float = L2WRAP_FACTOR):
    """Mean next-token cross entropy in nats (fp32), wrapped by L2Wrap when the factor is > 0."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()
    if l2wrap_factor > 0:
        B, T = targets_BT.shape
        loss = l2wrap(loss, logits_BTV, float(l2wrap_factor) / (B * T))
    return loss


def chunked_token_losses(normed_BTD, kernel_DV, targets_BT, weights_BT=None, *, chunk_tokens: int = LOSS_CHUNK_TOKENS,
                         l2wrap_factor: float = 0.0):
    """(sum of weighted token cross entropies in nats, sum of weights) of the logits normed @ kernel: the
    head's input in the compute dtype and its kernel as stored (`RWKV.head_operands`), multiplied in the
    compute dtype as nnx.Linear does. About `chunk_tokens` positions at a time, so no [B, T, V] logits
    exist; chunks are spans of T for all B rows at once, so a batch sharded over devices stays sharded.
    Each chunk is `_chunk_loss`: its logits are made once in the forward and once in the backward pass,
    stay in the compute dtype, and no fp32 [N, V] array is formed. With l2wrap_factor > 0, each position
    gets v4neo's L2Wrap gradient (see `l2wrap`); divided by the token count, the sum's gradient equals
    `cross_entropy`'s. Zero-weight positions (masked or padding) get no L2Wrap term."""
    B, T, D = normed_BTD.shape
    weights = jnp.ones((B, T), jnp.float32) if weights_BT is None else weights_BT.astype(jnp.float32)
    span = max(1, min(chunk_tokens // max(B, 1), T))
    n_chunks = -(-T // span)
    pad = n_chunks * span - T

    def to_chunks(x):  # [B, T, ...] -> [n_chunks, B, span, ...], padded with zeros (zero weight)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(B, n_chunks, span, *x.shape[2:]).swapaxes(0, 1)

    # L2Wrap's gradient is scale * g per position, g the upstream gradient of the chunk's sum: 1 / (B * T)
    # once the caller divides the sum by the token count, which gives `cross_entropy`'s factor / (B * T).
    scale = float(l2wrap_factor)

    def body(total, xs):
        return total + _chunk_loss(*xs, kernel_DV, scale), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (to_chunks(normed_BTD), to_chunks(targets_BT), to_chunks(weights)))
    return total, weights.sum()


def _logits(normed_BSD, kernel_DV):
    """The head's matmul as the model's linears compute it: [B, S, V] in the compute dtype."""
    return _product(normed_BSD, kernel_DV.astype(normed_BSD.dtype), (((2,), (0,)), ((), ())))


def _product(a, b, dimension_numbers):
    """a . b in a's dtype. On CPU accumulated in fp32 and rounded once, the product XLA:CPU runs on its fast
    bf16 path for bf16 operands (as model._dot_fp32_accumulate); elsewhere the plain product."""
    def cpu(a, b):
        return jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=jnp.float32).astype(a.dtype)

    def plain(a, b):
        return jax.lax.dot_general(a, b, dimension_numbers)
    return jax.lax.platform_dependent(a, b, cpu=cpu, default=plain)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunk_loss(normed_BSD, targets_BS, weights_BS, kernel_DV, l2wrap_scale: float):
    """sum over positions of weight * cross entropy of the logits normed @ kernel; with l2wrap_scale > 0
    the gradient also has L2Wrap's term, scale * g * max logit at each nonzero-weight position's argmax."""
    return _chunk_loss_fwd(normed_BSD, targets_BS, weights_BS, kernel_DV, l2wrap_scale)[0]


def _chunk_loss_fwd(normed_BSD, targets_BS, weights_BS, kernel_DV, l2wrap_scale):
    logits_BSV = _logits(normed_BSD, kernel_DV)  # compute dtype: the one reduction converts as it reads
    max_BS, sum_BS, argmax_BS = _softmax_statistics(logits_BSV, with_argmax=l2wrap_scale > 0)
    log_sum_BS = jnp.log(sum_BS)  # cross entropy = log_sum - (logit[target] - max), in optax's order
    # The target's logit from its head column, not from a gather over [B, S, V]: fp32 products and sum,
    # rounded to the compute dtype as the matmul rounds its output.
    columns_BSD = jnp.take(kernel_DV.astype(normed_BSD.dtype), targets_BS, axis=1, mode="clip").transpose(1, 2, 0)
    target_BS = (normed_BSD.astype(jnp.float32) * columns_BSD.astype(jnp.float32)).sum(-1)
    losses_BS = log_sum_BS - (target_BS.astype(normed_BSD.dtype).astype(jnp.float32) - max_BS)
    # No logits saved: [B, S] statistics, the chunk's input and the (loop-invariant) kernel.
    residuals = (normed_BSD, targets_BS, weights_BS, kernel_DV, log_sum_BS, losses_BS, max_BS, argmax_BS)
    return (losses_BS * weights_BS).sum(), residuals


def _softmax_statistics(logits_BSV, *, with_argmax: bool):
    """(max, sum of exp(logit - max), first argmax or None) over V, in fp32, from ONE pass over the logits:
    a reduction whose partial results are (running max, sum rescaled to it, index), as in an online
    softmax. (Max first and the sum after would read [B, S, V] twice.) L2Wrap's argmax and max come from
    here, so its backward needs no reduction over [B, S, V]."""
    def combine(a, b):
        top = jnp.maximum(a[0], b[0])
        rescale = jnp.exp(jnp.minimum(a[0], b[0]) - top)  # the smaller max's sum, rescaled to the larger
        total = jnp.where(a[0] >= b[0], a[1] + b[1] * rescale, b[1] + a[1] * rescale)
        if not with_argmax:
            return top, total
        first = jnp.where(a[0] > b[0], a[2], jnp.where(b[0] > a[0], b[2], jnp.minimum(a[2], b[2])))
        return top, total, first

    x_BSV = logits_BSV.astype(jnp.float32)
    # The empty partial result: a finite lowest max (never -inf, whose difference with itself is NaN), sum 0.
    operands, inits = (x_BSV, jnp.ones_like(x_BSV)), (jnp.finfo(jnp.float32).min, jnp.float32(0))
    if with_argmax:
        operands, inits = operands + (jax.lax.broadcasted_iota(jnp.int32, x_BSV.shape, 2),), inits + (jnp.int32(0),)
    stats = jax.lax.reduce(operands, inits, combine, (2,))
    return stats if with_argmax else (*stats, None)


def _chunk_loss_bwd(l2wrap_scale, residuals, g):
    normed_BSD, targets_BS, weights_BS, kernel_DV, log_sum_BS, losses_BS, max_BS, argmax_BS = residuals
    logits_BSV = _logits(normed_BSD, kernel_DV).astype(jnp.float32)
    vocab_BSV = jax.lax.broadcasted_iota(jnp.int32, logits_BSV.shape, 2)
    # d(weight * cross entropy) / d logits = weight * (softmax - onehot(target)), times g.
    softmax_BSV = jnp.exp((logits_BSV - max_BS[..., None]) - log_sum_BS[..., None])
    d_logits_BSV = (softmax_BSV - (vocab_BSV == targets_BS[..., None])) * (weights_BS * g)[..., None]
    if l2wrap_scale > 0:  # v4neo's L2Wrap: scale * g * max logit at the argmax of each position
        l2wrap_BS = jnp.where(weights_BS > 0, max_BS * (l2wrap_scale * g), 0.0)
        d_logits_BSV = d_logits_BSV + jnp.where(vocab_BSV == argmax_BS[..., None], l2wrap_BS[..., None], 0.0)
    # One elementwise expression in the compute dtype feeds both matmuls (as autodiff of the matmul would).
    d_logits_BSV = d_logits_BSV.astype(normed_BSD.dtype)
    d_normed = _product(d_logits_BSV, kernel_DV.astype(normed_BSD.dtype), (((2,), (1,)), ((), ())))
    # The kernel's gradient in the compute dtype, as autodiff of the head gives it (and a data-parallel
    # all-reduce moves it), then in the kernel's dtype: chunks add up in fp32.
    d_kernel = _product(normed_BSD, d_logits_BSV, (((0, 1), (0, 1)), ((), ()))).astype(kernel_DV.dtype)
    return d_normed, None, losses_BS * g, d_kernel  # targets: integers; weights: d sum / d weight = loss


_chunk_loss.defvjp(_chunk_loss_fwd, _chunk_loss_bwd)
