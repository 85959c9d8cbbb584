"""The RWKV-4 language model in Flax NNX.

    logits_BTV, state = model(tokens_BT, state=None)   # parallel ("GPT") mode over a sequence
    logits_BTV, state = model(tokens_BT, reset_BT=...)  # documents packed in a row, each from the empty state
    logits_BV, state = model.step(tokens_B, state)      # RNN mode, one token
    hidden_BTD, state = model.hidden(tokens_BT, state)  # the residual stream after the last block (no head)
    state = model.init_state(batch_size)

Module and parameter names mirror the official RWKV-LM checkpoint (`blocks.0.att.time_decay`, ...), so the
weight mapping in `rwkv_jax/io/weights.py` is mechanical. Parameters carry `logical_axes` metadata that
`rwkv_jax/train/sharding.py` maps onto a device mesh.
"""

import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.model import initializers as init
from rwkv_jax.model.family import Family, LearnedState
from rwkv_jax.model.layers import (
    check_token_ids,
    layer_norm,
    linear,
    mix,
    param,
    remat_policy,
    stack_layers,
    target_logprobs,
    token_shift,
)
from rwkv_jax.model.model_config import ModelConfig
from rwkv_jax.ops import wkv4 as wkv_ops
from rwkv_jax.train import sharding


class RWKVState(NamedTuple):
    """Recurrent state of all layers, each [n_layer, B, width], fp32. The previous inputs are the
    LayerNorm'd values the token shift needs; (wkv_a, wkv_b, wkv_p) are the WKV sums."""
    att_x: jax.Array
    wkv_a: jax.Array
    wkv_b: jax.Array
    wkv_p: jax.Array
    ffn_x: jax.Array


class LayerState(NamedTuple):
    att_x: jax.Array  # [B, D]
    wkv: wkv_ops.WKVState  # each [B, A]
    ffn_x: jax.Array  # [B, D]


def init_state(config: ModelConfig, batch_size: int) -> RWKVState:
    """The empty state: zero previous inputs and sums, exponent at the finite EMPTY_EXPONENT."""
    L, B, D, A = config.n_layer, batch_size, config.d_model, config.att_width
    zeros_D = jnp.zeros((L, B, D), jnp.float32)
    zeros_A = jnp.zeros((L, B, A), jnp.float32)
    return RWKVState(zeros_D, zeros_A, zeros_A, jnp.full((L, B, A), wkv_ops.EMPTY_EXPONENT, jnp.float32),
                     zeros_D)


class TimeMix(nnx.Module):
    """The attention-like sublayer: token shift, k/v/r projections, WKV, receptance gate."""

    def __init__(self, config: ModelConfig, layer_id: int, *, rngs: nnx.Rngs):
        D, A, L = config.d_model, config.att_width, config.n_layer
        self.config = config
        self.time_decay = param(init.time_decay(layer_id, L, A), ("attn",))
        self.time_first = param(init.time_first(A), ("attn",))
        mixes = init.time_mix_att(layer_id, L, D)
        self.time_mix_k = param(mixes["k"], ("embed",))
        self.time_mix_v = param(mixes["v"], ("embed",))
        self.time_mix_r = param(mixes["r"], ("embed",))
        zeros = nnx.initializers.zeros_init()
        self.key = linear(D, A, ("embed", "attn"), zeros, config, rngs)
        self.value = linear(D, A, ("embed", "attn"), init.orthogonal(), config, rngs)
        self.receptance = linear(D, A, ("embed", "attn"), zeros, config, rngs)
        self.output = linear(A, D, ("attn", "embed"), zeros, config, rngs)

    def __call__(self, x_BTD, prev_x_BD, wkv_state: wkv_ops.WKVState, reset_BT=None,
                 reset_to: "LayerState | None" = None):
        shifted = token_shift(x_BTD, prev_x_BD, reset_BT, None if reset_to is None else reset_to.att_x)
        k = self.key(mix(x_BTD, shifted, self.time_mix_k[...]))
        v = self.value(mix(x_BTD, shifted, self.time_mix_v[...]))
        r = jax.nn.sigmoid(self.receptance(mix(x_BTD, shifted, self.time_mix_r[...])))
        reset_wkv = None if reset_to is None else reset_to.wkv
        if x_BTD.shape[1] == 1:  # RNN mode: the one-token recurrence
            if reset_BT is not None:
                empty = wkv_ops.empty_state(*wkv_state.a.shape, wkv_state.a.dtype)
                wkv_state = jax.tree.map(lambda r, s: jnp.where(reset_BT[:, :1], r, s), reset_wkv or empty,
                                         wkv_state)
            y, wkv_state = wkv_ops.wkv_step(self.time_decay[...], self.time_first[...], k[:, 0], v[:, 0],
                                            wkv_state)
            y = y[:, None]
        else:
            y, wkv_state = wkv_ops.wkv(self.time_decay[...], self.time_first[...], k, v, wkv_state,
                                       form=self.config.wkv_form, chunk_len=self.config.wkv_chunk_len,
                                       reset_BT=reset_BT, reset_state=reset_wkv)
        return self.output(r * y), x_BTD[:, -1].astype(jnp.float32), wkv_state


class ChannelMix(nnx.Module):
    """The feed-forward sublayer: token shift, squared-ReLU key, receptance gate."""

    def __init__(self, config: ModelConfig, layer_id: int, *, rngs: nnx.Rngs):
        D, F = config.d_model, config.ffn_width
        mixes = init.time_mix_ffn(layer_id, config.n_layer, D)
        self.time_mix_k = param(mixes["k"], ("embed",))
        self.time_mix_r = param(mixes["r"], ("embed",))
        zeros = nnx.initializers.zeros_init()
        self.key = linear(D, F, ("embed", "mlp"), init.orthogonal(), config, rngs)
        self.receptance = linear(D, D, ("embed", "embed_out"), zeros, config, rngs)
        self.value = linear(F, D, ("mlp", "embed"), zeros, config, rngs)

    def __call__(self, x_BTD, prev_x_BD, reset_BT=None, reset_prev_BD=None):
        shifted = token_shift(x_BTD, prev_x_BD, reset_BT, reset_prev_BD)
        k = jnp.square(jax.nn.relu(self.key(mix(x_BTD, shifted, self.time_mix_k[...]))))
        r = jax.nn.sigmoid(self.receptance(mix(x_BTD, shifted, self.time_mix_r[...])))
        return r * self.value(k), x_BTD[:, -1].astype(jnp.float32)


class Block(nnx.Module):
    """Pre-LayerNorm residual block: x + att(ln1(x)), then + ffn(ln2(x))."""

    def __init__(self, config: ModelConfig, layer_id: int, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(config.dtype)
        self.ln1 = layer_norm(config.d_model, config, rngs)
        self.att = TimeMix(config, layer_id, rngs=rngs)
        self.ln2 = layer_norm(config.d_model, config, rngs)
        self.ffn = ChannelMix(config, layer_id, rngs=rngs)

    def __call__(self, x_BTD, state: LayerState, reset_BT=None, reset_to: LayerState | None = None):
        att_out, att_x, wkv_state = self.att(self.ln1(x_BTD).astype(self.dtype), state.att_x, state.wkv,
                                             reset_BT, reset_to)
        x_BTD = x_BTD + att_out.astype(x_BTD.dtype)
        ffn_out, ffn_x = self.ffn(self.ln2(x_BTD).astype(self.dtype), state.ffn_x, reset_BT,
                                  None if reset_to is None else reset_to.ffn_x)
        x_BTD = x_BTD + ffn_out.astype(x_BTD.dtype)
        return x_BTD, LayerState(att_x, wkv_state, ffn_x)


def _apply_block(block: Block, x_BTD, state: LayerState, reset_BT=None, reset_to: LayerState | None = None):
    return block(x_BTD, state, reset_BT, reset_to)


def _layer_state(state: RWKVState, i) -> LayerState:
    """Layer i's part of a model state."""
    return LayerState(state.att_x[i], wkv_ops.WKVState(state.wkv_a[i], state.wkv_b[i], state.wkv_p[i]),
                      state.ffn_x[i])


class RWKV(nnx.Module):
    """RWKV-4 language model: embedding, ln0, blocks, ln_out, untied head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        D, V = config.d_model, config.vocab_size
        self.emb = nnx.Embed(V, D, embedding_init=init.symmetric_uniform(config.emb_init_scale),
                             param_dtype=config.param_dtype,
                             embedding_metadata={"logical_axes": ("vocab", "embed")}, rngs=rngs)
        self.ln0 = layer_norm(D, config, rngs)
        blocks = [Block(config, i, rngs=rngs) for i in range(config.n_layer)]
        if config.scan_layers:
            graphdef = nnx.graphdef(blocks[0])
            self.blocks = nnx.merge(graphdef, stack_layers([nnx.state(b) for b in blocks]))
        else:
            self.blocks = nnx.List(blocks)
        self.ln_out = layer_norm(D, config, rngs)
        self.head = linear(D, V, ("embed", "vocab"), init.orthogonal(scale=0.5), config, rngs)

    def init_state(self, batch_size: int) -> RWKVState:
        return init_state(self.config, batch_size)

    def __call__(self, tokens_BT, state: RWKVState | None = None, reset_BT=None,
                 reset_to: RWKVState | None = None):
        """Logits [B, T, V] (fp32) for every position, and the state after the last token. Concrete
        token ids outside [0, V) raise ValueError; under jit they are the caller's to check.
        `reset_BT`, `reset_to`: document resets (see `hidden`)."""
        hidden_BTD, state = self.hidden(tokens_BT, state, reset_BT, reset_to)
        return self.logits(hidden_BTD), state

    def logits(self, hidden_D):
        """fp32 logits from `hidden` states of any leading shape [..., D]: ln_out, then the head."""
        return self.head(self.ln_out(hidden_D).astype(self.config.dtype)).astype(jnp.float32)

    def token_logprobs(self, hidden_ND, targets_N):
        """(log p(target) in fp32, whether the target is the logits' first argmax) at N positions of
        `hidden` [N, D]: `logits` and a fp32 log-softmax, for inference. In fp32 from 256 positions up the
        logits are made as [V, N] (the head's kernel transposed against ln_out(hidden)), because XLA:CPU
        reduces over their major axis much faster than over their minor one. Below 256 positions the
        [N, V] logits were as fast or faster, and in bf16 the transposed product leaves XLA:CPU's fast path
        (benchmarks/lm_eval_speed.py measures the adapter that depends on it)."""
        if hidden_ND.shape[0] < 256 or jnp.dtype(self.config.dtype) != jnp.float32:
            logp_N1, greedy_N1 = target_logprobs(self.logits(hidden_ND), targets_N[:, None])
            return logp_N1[:, 0], greedy_N1[:, 0]
        normed_ND, kernel_DV = self.head_operands(hidden_ND)
        logits_VN = jax.lax.dot_general(kernel_DV.astype(jnp.float32), normed_ND, (((0,), (1,)), ((), ())))
        max_N = logits_VN.max(axis=0)
        log_sum_N = jnp.log(jnp.exp(logits_VN - max_N).sum(axis=0))
        target_N = jnp.take_along_axis(logits_VN, targets_N[None, :], axis=0)[0]
        # The first argmax is the target when no logit is above it and none before it equals it (an argmax
        # over the major axis was slower than this masked max).
        before_N = jnp.where(jax.lax.broadcasted_iota(jnp.int32, logits_VN.shape, 0) < targets_N[None, :],
                             logits_VN, -jnp.inf).max(axis=0)
        return target_N - max_N - log_sum_N, (target_N >= max_N) & (before_N < target_N)

    def head_operands(self, hidden_D):
        """(ln_out(hidden) [..., D] in the compute dtype, the head's kernel [D, V] as stored): `logits` is
        their product in the compute dtype, cast to fp32. The training loss takes these
        (optim.chunked_token_losses) to make each chunk's logits, and each target's logit, itself."""
        return self.ln_out(hidden_D).astype(self.config.dtype), self.head.kernel[...]

    def hidden(self, tokens_BT, state: RWKVState | None = None, reset_BT=None,
               reset_to: RWKVState | None = None):
        """The final hidden states [B, T, D] (the fp32 residual stream, before ln_out and the head) and
        the state after the last token: `logits(hidden(...)[0])` is `__call__`. Generation takes the
        logits of the last position only; training applies `logits` to chunks of positions.

        Document resets: where `reset_BT` (bool [B, T]) is True, every layer's state entering position t
        (WKV sums and both token shifts' previous inputs) is replaced by `reset_to` (default: the empty
        state of `init_state`) before token t, so documents packed in one row do not see each other."""
        check_token_ids(tokens_BT, self.config.vocab_size)
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens_BT.shape}; "
                             "use model.step(tokens_B, state) for one token per sequence")
        if reset_BT is not None:
            if jnp.shape(reset_BT) != tokens_BT.shape:
                raise ValueError(f"reset_BT must have the tokens' shape {tokens_BT.shape}, got "
                                 f"{jnp.shape(reset_BT)}")
            reset_BT = jnp.asarray(reset_BT).astype(bool)
        elif reset_to is not None:
            raise ValueError("reset_to was given without reset_BT: pass the positions to reset at")
        if tokens_BT.shape[1] == 0:
            raise ValueError(f"tokens of shape {tokens_BT.shape} hold no token: give at least one per row")
        for name, given in (("state", state), ("reset_to", reset_to)):
            self._check_state_shapes(name, given, tokens_BT.shape[0])
        if state is None:
            state = self.init_state(tokens_BT.shape[0])
        # The residual stream stays in fp32; sublayers compute in config.dtype.
        x = self.ln0(self.emb(tokens_BT).astype(jnp.float32))
        run = self._scan_blocks if self.config.scan_layers else self._loop_blocks
        return run(x, state, reset_BT, reset_to)

    def _check_state_shapes(self, name: str, state: RWKVState | None, batch: int) -> None:
        """ValueError naming the shapes unless `state` is None or of init_state(batch)'s shapes."""
        if state is None:
            return
        c = self.config
        want = [(c.n_layer, batch, width) for width in (c.d_model, *[c.att_width] * 3, c.d_model)]
        have = [tuple(jnp.shape(x)) for x in state]
        if have != want:
            raise ValueError(f"{name} does not fit tokens of batch {batch}: its arrays are "
                             f"{dict(zip(RWKVState._fields, have))}, a state for batch {batch} is "
                             f"{dict(zip(RWKVState._fields, want))} (model.init_state({batch}))")

    def _loop_blocks(self, x, state: RWKVState, reset_BT=None, reset_to: RWKVState | None = None):
        layer_states = []
        apply_block = nnx.remat(_apply_block, policy=remat_policy(self.config)) if self.config.remat else _apply_block
        for i, block in enumerate(self.blocks):
            layer_reset = None if reset_to is None else _layer_state(reset_to, i)
            x, layer_out = apply_block(block, x, _layer_state(state, i), reset_BT, layer_reset)
            x = sharding.constrain(x, ("batch", "seq", "embed_out"))
            layer_states.append(layer_out)
        stack = lambda get: jnp.stack([get(s) for s in layer_states])
        return x, RWKVState(stack(lambda s: s.att_x), stack(lambda s: s.wkv.a), stack(lambda s: s.wkv.b),
                            stack(lambda s: s.wkv.p), stack(lambda s: s.ffn_x))

    def _scan_blocks(self, x, state: RWKVState, reset_BT=None, reset_to: RWKVState | None = None):
        graphdef, params = nnx.split(self.blocks)

        def body(x, layer):  # layer: this layer's parameters, state and reset state (or None)
            params_l, layer_state, layer_reset = layer
            as_layer = lambda s: _layer_state(RWKVState(*s), ...)  # the scan already took layer i's slice
            x, out = nnx.merge(graphdef, params_l)(x, as_layer(layer_state), reset_BT,
                                                   None if layer_reset is None else as_layer(layer_reset))
            x = sharding.constrain(x, ("batch", "seq", "embed_out"))
            return x, RWKVState(out.att_x, out.wkv.a, out.wkv.b, out.wkv.p, out.ffn_x)

        if self.config.remat:  # keep each block's input (the scan carry) and what the policy saves; recompute the rest
            body = jax.checkpoint(body, prevent_cse=False, policy=remat_policy(self.config))
        xs = (params, tuple(state), None if reset_to is None else tuple(reset_to))
        # On CPU the loop is unrolled when compiled (the parameters keep their stacked layout). As a loop,
        # XLA:CPU copies each layer's weights out of the stack in the forward and again in the backward
        # pass, and writes the stacked activations and gradients slice by slice into zero-filled buffers;
        # unrolled, the 169M training step is faster (benchmarks/train_step.py; the weights are still
        # copied once, and the copies kept for the backward pass are why unstacked layers are faster
        # still), and compiling 12 layers on CPU takes seconds. Where
        # compile time matters (TPU, GPU, and a TPU program compiled ahead of time on a CPU host: the
        # branch follows the platform compiled for), the loop stays a loop.
        return jax.lax.platform_dependent(x, xs, cpu=functools.partial(jax.lax.scan, body, unroll=True),
                                          default=functools.partial(jax.lax.scan, body))

    def step(self, tokens_B, state: RWKVState):
        """RNN mode: one token per sequence. Returns logits [B, V] and the next state."""
        logits, state = self(tokens_B[:, None], state)
        return logits[:, 0], state


# --- Official weights: the name table and the dimensions of a checkpoint -------------------------

def weights_layout(config: ModelConfig) -> dict[str, tuple[tuple, str, tuple[int, ...]]]:
    """Official name -> (path in our pure param dict, kind, official shape). Kinds: 'linear' (torch
    [out, in] vs our kernel [in, out]), 'mix' (official [1, 1, D] vs our [D]), 'plain' (same array)."""
    V, D, A, F = config.vocab_size, config.d_model, config.att_width, config.ffn_width
    table = {
        "emb.weight": (("emb", "embedding"), "plain", (V, D)),
        "blocks.0.ln0.weight": (("ln0", "scale"), "plain", (D,)),
        "blocks.0.ln0.bias": (("ln0", "bias"), "plain", (D,)),
        "ln_out.weight": (("ln_out", "scale"), "plain", (D,)),
        "ln_out.bias": (("ln_out", "bias"), "plain", (D,)),
        "head.weight": (("head", "kernel"), "linear", (V, D)),
    }
    for i in range(config.n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            table[b + ln + ".weight"] = (("blocks", i, ln, "scale"), "plain", (D,))
            table[b + ln + ".bias"] = (("blocks", i, ln, "bias"), "plain", (D,))
        for name in ("time_decay", "time_first"):
            table[b + "att." + name] = (("blocks", i, "att", name), "plain", (A,))
        for name in ("time_mix_k", "time_mix_v", "time_mix_r"):
            table[b + "att." + name] = (("blocks", i, "att", name), "mix", (1, 1, D))
        for name in ("time_mix_k", "time_mix_r"):
            table[b + "ffn." + name] = (("blocks", i, "ffn", name), "mix", (1, 1, D))
        linears = {"att.key": (A, D), "att.value": (A, D), "att.receptance": (A, D), "att.output": (D, A),
                   "ffn.key": (F, D), "ffn.receptance": (D, D), "ffn.value": (D, F)}
        for name, shape in linears.items():
            sub, proj = name.split(".")
            table[b + name + ".weight"] = (("blocks", i, sub, proj, "kernel"), "linear", shape)
    return table


def dims_from_tensors(tensors: dict[str, np.ndarray]) -> dict:
    """Model dimensions from official-named tensors (emb, att.key, ffn.key and the block count)."""
    needed = ["emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight"]
    if "blocks.0.att.w0" in tensors:  # x070 files have these names too
        raise ValueError("not an RWKV-4 checkpoint: it has RWKV-7's blocks.0.att.w0")
    missing = [n for n in needed if n not in tensors]
    if missing:
        raise ValueError(f"not an RWKV-4 checkpoint: missing {missing} (found e.g. {sorted(tensors)[:5]})")
    bad_rank = [f"{n}: {tuple(np.shape(tensors[n]))} (expected 2 dims)" for n in needed if np.ndim(tensors[n]) != 2]
    if bad_rank:
        raise ValueError(f"not an RWKV-4 checkpoint: mis-shaped {bad_rank}")
    vocab_size, d_model = tensors["emb.weight"].shape
    # Count layers by their key matrix only, so one stray tensor does not invent extra layers.
    blocks = {int(m.group(1)) for n in tensors if (m := re.fullmatch(r"blocks\.(\d+)\.att\.key\.weight", n))}
    dims = dict(vocab_size=int(vocab_size), d_model=int(d_model), n_layer=max(blocks) + 1,
                d_att=int(tensors["blocks.0.att.key.weight"].shape[0]),
                d_ffn=int(tensors["blocks.0.ffn.key.weight"].shape[0]))
    return dims


def flops_per_token(config: ModelConfig) -> float:
    """The paper's training cost: 6 (V D + 13 D^2 L) FLOPs per token."""
    return 6.0 * (config.vocab_size * config.d_model + 13 * config.d_model ** 2 * config.n_layer)


# --- State tuning's learned initial state (rwkv_jax/train/state_tuning.py) -------------------------
#
#     att_x     [L, D]  the previous (LayerNorm'd) input of each layer's time-mix token shift
#     ffn_x     [L, D]  the same for the channel mix
#     wkv_a     [L, A]  the WKV numerator, free
#     wkv_log_b [L, A]  the log of the WKV denominator: b = exp(log_b) > 0 whatever the update
#
# with the WKV exponent p = 0 (the state (a, b, p) means numerator a e^p and denominator b e^p, so p = 0
# loses nothing; |log_b| < 88 keeps b a normal fp32 number). It starts next to the empty state: zero
# previous inputs and numerator, and a denominator of e^INIT_LOG_B, negligible beside the e^(u + k) of
# the first token.

INIT_LOG_B = -10.0


def init_learned_state(config: ModelConfig) -> dict:
    """The learned state of `config`'s model at the start of tuning: (nearly) the empty state."""
    L, D, A = config.n_layer, config.d_model, config.att_width
    return {"att_x": jnp.zeros((L, D), jnp.float32), "ffn_x": jnp.zeros((L, D), jnp.float32),
            "wkv_a": jnp.zeros((L, A), jnp.float32), "wkv_log_b": jnp.full((L, A), INIT_LOG_B, jnp.float32)}


def learned_to_state(learned: dict, batch_size: int) -> RWKVState:
    """The model's RWKVState [L, batch_size, *]: the learned state in every row (differentiable)."""
    def rows(x):  # [L, W] -> [L, batch_size, W]
        return jnp.broadcast_to(x[:, None].astype(jnp.float32), (x.shape[0], batch_size, x.shape[1]))

    return RWKVState(att_x=rows(learned["att_x"]), wkv_a=rows(learned["wkv_a"]),
                     wkv_b=rows(jnp.exp(learned["wkv_log_b"])), wkv_p=rows(jnp.zeros_like(learned["wkv_a"])),
                     ffn_x=rows(learned["ffn_x"]))


FAMILY = Family(version=4, model_class=RWKV, state_type=RWKVState, init_state=init_state,
                weights_layout=weights_layout, dims_from_tensors=dims_from_tensors,
                wkv_forms=(*wkv_ops.FORMS, *wkv_ops.KERNEL_FORMS), default_wkv_form=wkv_ops.default_form,
                # v4neo's layerwise_lr: time_decay x2, time_first x3
                lr_multipliers={"time_decay": 2.0, "time_first": 3.0},
                logical_axes=("embed", "embed_out", "attn", "mlp", "vocab", "layers"),
                flops_per_token=flops_per_token,
                learned_state=LearnedState(fields=("att_x", "ffn_x", "wkv_a", "wkv_log_b"), init=init_learned_state,
                                           to_state=learned_to_state))
