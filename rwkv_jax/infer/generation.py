"""Text generation: the prompt is prefilled in parallel mode, then tokens are decoded as an RNN. The
command line is `python generate.py` (rwkv_jax/cli/generate.py; `python -m rwkv_jax.cli.generate` too).

Python:

    gen = generate(model, tokenizer, ["The quick", "Once"], max_new_tokens=50, temperature=0.8, top_p=0.9)
    gen[0].text, gen.state          # completions, and the state after prompt + generated tokens

How it runs:
  * Prefill: each prompt is run separately (batch 1) in parallel mode, in chunks of `prefill_chunk`
    tokens carrying the state; the remainder is split into power-of-two pieces, so at most
    log2(prefill_chunk) + 1 shapes are ever compiled whatever the prompt lengths. The prompts' states and
    last logits are then stacked into one batch: prompts of different lengths need no padding.
  * Decode: one jitted `lax.while_loop` samples a token from the logits, feeds it with `model.step` and
    repeats, for all rows at once, until `max_new_tokens` or every row is done (end-of-text, or a stop
    string). Streaming and stop strings use an ordered `io_callback` per step: the host receives the new
    tokens as they are made, decodes and prints them, checks the stop strings on the decoded text and
    answers which rows are done, so the loop stays one compiled program and stops early. Without
    `on_token` and stop strings the loop has no callback at all.
  * Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k (k > 0), then
    top-p (nucleus, p < 1), then a categorical draw keyed by (seed, step).
  * State: the returned state has read the prompt and every generated token (a stop string's tokens
    included; a row that is done stays frozen), and `logits` are the next-token logits there: save both
    (`save_state`, an .npz of the RWKVState fields, rwkv_jax/model/state_file.py) and pass them back to
    continue, even with an empty prompt. A state without logits (a state-tuning run's learned initial
    state) is a starting point instead: every prompt is read from it, an empty one as end-of-text.
"""

import dataclasses
import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from rwkv_jax.data.tokenizer import check_fits
from rwkv_jax.model import check_token_ids, state_rows
from rwkv_jax.model.state_file import check_state, load_state, save_state  # noqa: F401 (part of this API)


@dataclasses.dataclass
class Completion:
    prompt: str | None
    text: str | None          # generated text (without end-of-text), cut before the first stop string
    tokens: list[int]         # generated tokens (up to and including a stop string's or end-of-text)
    stop_reason: str          # 'stop' (a stop string), 'eot' (end-of-text) or 'length' (max_new_tokens)


@dataclasses.dataclass
class Generation:
    """The completions (indexable like a list) and the state and next-token logits after them."""
    completions: list[Completion]
    state: Any
    logits: jax.Array

    def __getitem__(self, i):
        return self.completions[i]

    def __len__(self):
        return len(self.completions)

    def __iter__(self):
        return iter(self.completions)


# --- Prefill ------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens_BT, state):
    """Last-position logits and the state: the head (V x D per token, a fifth of a 169M model's work) is
    applied to the last position only."""
    model = nnx.merge(graphdef, params)
    hidden, state = model.hidden(tokens_BT, state)
    return model.logits(hidden[:, -1]), state


def _pieces(n: int, chunk: int) -> list[int]:
    """Lengths covering n: full chunks, then the remainder's binary digits, largest first."""
    out = [chunk] * (n // chunk)
    rest = n % chunk
    bit = 1 << max(rest.bit_length() - 1, 0)
    while rest:
        if rest >= bit:
            out.append(bit)
            rest -= bit
        bit >>= 1
    return out


def prefill(model: nnx.Module, prompts: list[list[int]], state: Any | None = None, logits=None, *,
            chunk: int = 256) -> tuple[Any, jax.Array]:
    """State [L, B, *] and next-token logits [B, V] after each prompt (row b: prompt b read from row b of
    `state`, or from the empty state). An empty prompt keeps its row of `state` and `logits`."""
    if chunk < 1:
        raise ValueError(f"the prefill chunk must be >= 1 token, got {chunk}")
    graphdef, params = nnx.split(model)
    B = len(prompts)
    if state is not None:
        rows = state_rows(state)
        if rows not in (1, B):
            raise ValueError(f"the saved state holds {rows} rows (one per prompt of the generation that saved it) but "
                             f"{B} prompts were given: give {rows} prompts (an empty one continues its row)")
        if rows == 1 and B > 1:  # one saved state for every prompt
            state = jax.tree.map(lambda x: jnp.repeat(x, B, axis=1), state)
            logits = None if logits is None else jnp.repeat(logits, B, axis=0)
        check_state(model, state, B, logits)
    rows_state, rows_logits = [], []
    for b, tokens in enumerate(prompts):
        row = (model.init_state(1) if state is None else jax.tree.map(lambda x: x[:, b:b + 1], state))
        if not len(tokens):
            if logits is None:
                raise ValueError(f"prompt {b} is empty and there are no saved logits to continue from: give a "
                                 "prompt, or a state saved with its logits")
            rows_state.append(row)
            rows_logits.append(logits[b:b + 1])
            continue
        check_token_ids(tokens, model.config.vocab_size, f"prompt {b}")
        tokens = np.asarray(tokens, np.int32)
        start, last = 0, None
        for n in _pieces(len(tokens), chunk):
            last, row = _forward(graphdef, params, jnp.asarray(tokens[None, start:start + n]), row)
            start += n
        rows_state.append(row)
        rows_logits.append(last)
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *rows_state)
    return stacked, jnp.concatenate(rows_logits, axis=0)


# --- Sampling and the decode loop ----------------------------------------------------------------------

def sample_logits(key, logits_BV, *, temperature=1.0, top_k: int = 0, top_p=1.0, greedy: bool = False,
                  use_top_p: bool = True):
    """One token per row: argmax if `greedy`, else top-k (k > 0) then top-p filtering of
    softmax(logits / temperature) and a categorical draw."""
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep = before < top_p                        # the smallest set whose mass reaches top_p
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


MAX_NEW_TOKENS_LIMIT = 2 ** 31  # the decode loop's step counter is an int32
SEED_LIMIT = 2 ** 63  # seeds are int64: [-SEED_LIMIT, SEED_LIMIT)

_SINK_LOCK = threading.Lock()
_SINK = [None]  # the host side of the running decode loop (one at a time)


def _host_tokens(tokens_B, done_B):
    return np.asarray(_SINK[0](np.asarray(tokens_B), np.asarray(done_B)), bool)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "use_top_p",
                                             "stream", "stop_at_eot"))
def _decode(graphdef, params, state, logits, key, temperature, top_p, eot_id, *, max_new_tokens: int,
            greedy: bool, top_k: int, use_top_p: bool, stream: bool, stop_at_eot: bool):
    model = nnx.merge(graphdef, params)
    B = logits.shape[0]

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, state, logits, tokens, done, lengths = carry
        token = sample_logits(jax.random.fold_in(key, i), logits, temperature=temperature, top_k=top_k,
                              top_p=top_p, greedy=greedy, use_top_p=use_top_p)
        token = jnp.where(done, 0, token)
        tokens = tokens.at[:, i].set(token)
        lengths = lengths + (~done).astype(jnp.int32)
        now_done = done | ((token == eot_id) & stop_at_eot)
        if stream:
            now_done = now_done | io_callback(_host_tokens, jax.ShapeDtypeStruct((B,), jnp.bool_), token, done,
                                              ordered=True)
        new_logits, new_state = model.step(token, state)
        keep = lambda old, new: jnp.where(done.reshape((1, B) + (1,) * (old.ndim - 2)), old, new)  # noqa: E731
        state = type(state)(*(keep(o, n) for o, n in zip(state, new_state)))
        logits = jnp.where(done[:, None], logits, new_logits)
        return i + 1, state, logits, tokens, now_done, lengths

    carry = (jnp.zeros((), jnp.int32), state, logits, jnp.zeros((B, max_new_tokens), jnp.int32),
             jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))
    _, state, logits, tokens, _, lengths = jax.lax.while_loop(cond, body, carry)
    return tokens, lengths, state, logits


class _Stream:
    """Host side of the decode loop: keeps each row's tokens, decodes them, finds stop strings and hands
    new text to `on_token(row, token, text)`. Text that may still become a stop string or ends in an
    incomplete character is held back until it is decided; `flush` sends what is left at the end."""

    def __init__(self, batch_size, decode, stop, on_token, eot_id, stop_at_eot):
        self.tokens = [[] for _ in range(batch_size)]
        self.sent = [0] * batch_size
        self.decode, self.stop, self.on_token = decode, tuple(s for s in stop if s), on_token
        self.eot_id, self.stop_at_eot = eot_id, stop_at_eot
        self.finished = [False] * batch_size

    def __call__(self, tokens_B, done_B):
        out = np.array(done_B, bool)
        for b, (token, done) in enumerate(zip(tokens_B.tolist(), done_B.tolist())):
            if done or self.finished[b]:
                continue
            if self.stop_at_eot and token == self.eot_id:
                self.finished[b] = True
                self._send(b, token, self._text(b), final=True)
                continue
            self.tokens[b].append(token)
            text = self._text(b)
            cut = _first_stop(text, self.stop) if text is not None else None
            if cut is not None:
                self.finished[b] = out[b] = True
                self._send(b, token, text[:cut], final=True)
            else:
                self._send(b, token, text, final=False)
        return out

    def _text(self, b):
        return None if self.decode is None else self.decode(self.tokens[b])

    def _send(self, b, token, text, final):
        if text is None:
            if self.on_token is not None and token is not None:
                self.on_token(b, token, None)
            return
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
                safe = len(text.rstrip("\ufffd"))
            for s in self.stop:  # hold back a suffix that could still become a stop string
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        piece = text[self.sent[b]:safe] if safe > self.sent[b] else ""
        self.sent[b] = max(self.sent[b], safe)
        if self.on_token is not None and (piece or token is not None):
            self.on_token(b, token, piece)

    def flush(self):
        for b in range(len(self.tokens)):
            if not self.finished[b] and self.decode is not None:
                self.finished[b] = True
                self._send(b, None, self._text(b), final=True)


def _first_stop(text: str, stop) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def generate_tokens(model: nnx.Module, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
                    top_p: float = 1.0, top_k: int = 0, seed: int = 0, eot_id: int = 0, stop_at_eot: bool = True,
                    stop=(), decode=None, on_token=None, state: Any | None = None, logits=None,
                    prefill_chunk: int = 256, prompt_texts=None) -> Generation:
    """`generate` on token ids; `decode` (tokens -> text) is needed for stop strings and text output."""
    if not prompts:
        raise ValueError("no prompts")
    if not 0 <= max_new_tokens < MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"max_new_tokens must be >= 0 and < 2**31 (the decode loop counts in int32), got "
                         f"{max_new_tokens}")
    if not temperature >= 0 or not 0 < top_p <= 1 or top_k < 0:  # (NaN fails the comparisons)
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if not -SEED_LIMIT <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [-2**63, 2**63) (an int64), got {seed}")
    top_k = 0 if top_k >= model.config.vocab_size else int(top_k)  # k >= the vocabulary keeps every token
    stop = tuple(s for s in stop if s)
    if stop and decode is None:
        raise ValueError("stop strings need a tokenizer to decode the tokens")
    state, logits = prefill(model, prompts, state, logits, chunk=prefill_chunk)
    B = len(prompts)
    graphdef, params = nnx.split(model)
    stream = bool(stop) or on_token is not None
    sink = _Stream(B, decode, stop, on_token, eot_id, stop_at_eot) if stream else None
    tokens = np.zeros((B, 0), np.int32)
    lengths = np.zeros(B, np.int64)
    if max_new_tokens:
        with _SINK_LOCK:
            _SINK[0] = sink
            try:
                out = _decode(graphdef, params, state, logits, jax.random.key(seed),
                              jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jnp.int32(eot_id),
                              max_new_tokens=max_new_tokens,
                              greedy=temperature == 0, top_k=top_k, use_top_p=top_p < 1, stream=stream,
                              stop_at_eot=stop_at_eot)
                tokens, lengths, state, logits = jax.block_until_ready(out)
            finally:
                _SINK[0] = None
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    if sink is not None:
        sink.flush()
    completions = []
    for b in range(B):
        toks = tokens[b, :lengths[b]].tolist()
        reason = "length"
        body = toks
        if stop_at_eot and toks and toks[-1] == eot_id:
            reason, body = "eot", toks[:-1]
        text = decode(body) if decode is not None else None
        if text is not None:
            cut = _first_stop(text, stop)
            if cut is not None:
                reason, text = "stop", text[:cut]
        completions.append(Completion(prompt_texts[b] if prompt_texts else None, text, toks, reason))
    return Generation(completions, state, logits)


def generate(model: nnx.Module, tokenizer, prompts: list[str] | str, *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop=(), state: Any | None = None,
             logits=None, on_token=None, stop_at_eot: bool = True, prefill_chunk: int = 256) -> Generation:
    """Complete each prompt (a batch); see the module docstring. `on_token(row, token, text)` is called as
    tokens come (text: the newly decided text, possibly ''; token None for the final flush). `state`
    (with B = 1 or len(prompts) rows) and `logits` continue a saved generation. An empty prompt without
    saved logits to continue from starts from the end-of-text token, as documents start in training."""
    if isinstance(prompts, str):
        prompts = [prompts]
    check_fits(tokenizer, model.config.vocab_size, fix="it is not this model's tokenizer")
    ids = [tokenizer.encode(p) if p else ([] if logits is not None else [tokenizer.eot_id]) for p in prompts]
    return generate_tokens(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           top_k=top_k, seed=seed, eot_id=tokenizer.eot_id, stop_at_eot=stop_at_eot, stop=stop,
                           decode=tokenizer.decode, on_token=on_token, state=state, logits=logits,
                           prefill_chunk=prefill_chunk, prompt_texts=list(prompts))
