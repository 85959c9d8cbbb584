"""rwkv-jax as a model of EleutherAI's lm-evaluation-harness (`lm-eval` 0.4.x), registered as `rwkv_jax`.

    python -m rwkv_jax.cli.lm_eval --model_args checkpoint=RWKV-4-Pile-169M.pth,tokenizer=20B_tokenizer.json \\
        --tasks lambada_local,choice_local --include_path tasks/ --batch_size 8

    import lm_eval
    from lm_eval.tasks import TaskManager
    from rwkv_jax.infer.lm_eval_adapter import RWKVLM
    lm = RWKVLM(checkpoint="RWKV-4-Pile-169M.pth", tokenizer="20B_tokenizer.json", batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_local"], task_manager=TaskManager(include_path="tasks"))

The checkpoint is anything `rwkv_jax.io.weights.load_model` loads (a training workdir, an official .pth, an
HF RWKV directory, an rwkv_jax directory) or an `RWKV` module; the tokenizer a file (.json HF tokenizers,
.model sentencepiece; default: the workdir's copy or the HF directory's tokenizer.json) or a
`rwkv_jax.data.tokenizer.Tokenizer`.

How the three request types run, using the recurrence:
  * `loglikelihood`: (context, continuation) strings are tokenized as the harness's HF model does (the
    harness's `TemplateLM`: trailing spaces of the context move to the continuation, context +
    continuation is encoded as one string and split after the tokens of the context alone; an empty
    context becomes the end-of-text token). Requests sharing a context (the endings of a multiple-choice
    question) form a group: the context is read once and its state copied for each continuation.
    Contexts are read `batch_size` at a time, sorted by length, in parallel mode: the rows of a batch are
    left-padded to its longest and reset to the empty state at their first token (training's document
    resets), so a batch's state holds each context's own state (padding is read once per context; reading
    only the tokens all rows share, and the rest at the start of every continuation row, would read those
    again per continuation). The head runs once per context, at its last token: those log-probabilities
    score the first token of every continuation of the context.
    Each continuation row then reads the continuation but its last token (a one-token continuation reads
    nothing). Continuation rows (of 16 batches at a time) are sorted by length and scored 4 x batch_size
    per padded call, the head (with a fp32 logsumexp and the target's logit) applied only at the scored
    positions, never over padded rows or columns. Chunk lengths,
    row counts, row lengths and scored positions per call take the sizes 1, 2, ..., 8, 10, 12, 14, 16, 20,
    ... (four per octave), so few shapes compile and padding stays under a quarter.
  * `loglikelihood_rolling`: each document once, in windows of `window` tokens with the state carried
    (rwkv_jax.infer.evaluation's scorer), the first token predicted from the end-of-text token, as the harness
    does with its prefix token. No window re-reads overlapping context, unlike a transformer.
  * `generate_until`: rwkv_jax.infer.generation's jitted decoder (parallel prefill, RNN decode in one
    `lax.while_loop`), stopping at the harness's `until` strings, end-of-text or `max_gen_toks`; greedy
    unless the request asks for sampling (do_sample / temperature > 0, top_p, top_k, seed).

Context prefix (`context_prefix`): RWKV reads documents after an end-of-text token in training, and
`eval.py` scores after one, so by default ('eot') every non-empty context of `loglikelihood` and every
prompt of `generate_until` is read after the end-of-text token; this makes the harness's LAMBADA numbers
equal `eval.py --lambada`. 'none' reads the context from the empty state, exactly as the harness's `hf`
model scores an RWKV model; 'newline' reads it after the tokens of '\\n' (the pad of ChatRWKV's lm-eval
scripts).
"""

import collections
import functools
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from rwkv_jax.model import check_token_ids

log = logging.getLogger(__name__)

CONTEXT_PREFIXES = ("eot", "none", "newline")


def _int_arg(name: str, value) -> int:
    """An integer model arg (the harness passes them as strings); ValueError naming the arg."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, not {value!r}") from None


# --- The rwkv_jax internals this adapter uses (all of them, in one place) ------------------------------
# Loading (weights.load_model, weights.find_tokenizer, data.tokenizer.check_fits), the windowed scorer of
# eval.py (evaluation.score_documents over data.documents.Document) and the jitted decoder
# (generate.generate_tokens), and model.target_logprobs.
# Everything else below uses only the model's public API: model.hidden, model.logits, model.token_logprobs,
# model.init_state(B) and model.config.

def _load(checkpoint, tokenizer, overrides: dict):
    """(model, tokenizer, description) from paths or objects."""
    from rwkv_jax.data.tokenizer import check_fits
    from rwkv_jax.io import weights
    from rwkv_jax.model import with_kernels_in_compute_dtype
    loaded = isinstance(checkpoint, nnx.Module)  # a model of any generation, already loaded
    if loaded:
        model, name = checkpoint, f"<{type(checkpoint).__name__} module>"
        if overrides:
            raise ValueError(f"dtype / wkv_form overrides {overrides} need a checkpoint path, not a loaded model")
    else:
        if not checkpoint:
            raise ValueError("no checkpoint: pass --model_args checkpoint=PATH (a training workdir, an official "
                             ".pth, an HF RWKV directory or an rwkv_jax directory)")
        name = str(Path(checkpoint).expanduser())
        weights.detect_format(name)  # FileNotFoundError for a missing checkpoint
        model = weights.load_model(name, **overrides)
    model = with_kernels_in_compute_dtype(model)  # only read here: cast bf16 kernels once, not per call
    if tokenizer is None or isinstance(tokenizer, str):
        if loaded and not tokenizer:
            raise ValueError("a loaded model needs tokenizer=PATH or a Tokenizer object")
        tokenizer = weights.find_tokenizer(name, tokenizer or "")
    check_fits(tokenizer, model.config.vocab_size, fix="it is not this model's tokenizer (pass tokenizer=PATH)")
    return model, tokenizer, name


def _score_documents(model, token_lists, *, start_token, batch_size, window):
    """Summed log-probability of each token list (scored after `start_token`), in input order."""
    from rwkv_jax.data.documents import Document
    from rwkv_jax.infer import evaluation
    docs = (Document(np.asarray(t, np.int32)) for t in token_lists)
    out = [0.0] * len(token_lists)
    for scored in evaluation.score_documents(model, docs, batch_size=batch_size, window=window,
                                             start_token=start_token):
        out[scored.index] = -float(np.sum(scored.loss["parallel"], dtype=np.float64))
    return out


def _generate(model, tokenizer, prompts, *, max_new_tokens, stop, temperature, top_p, top_k, seed, chunk):
    """Completion texts of token-id prompts, cut before the first stop string."""
    from rwkv_jax.infer import generation as generate
    gen = generate.generate_tokens(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, top_k=top_k, seed=seed, eot_id=tokenizer.eot_id,
                                   stop=stop, decode=tokenizer.decode, prefill_chunk=chunk)
    return [c.text for c in gen]


# --- Jitted pieces of loglikelihood ----------------------------------------------------------------
# A context is read whole, in chunks: `_prefill` (no head) for all but the last, `_prefill_last` for the
# last, which also applies the head at the context's last token to score the first token of each of its
# continuations. `_score` then reads each continuation but its last token from the context's state and
# applies the head only at the positions that are scored.

@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, params, state, tokens_BC, reset_BC=None):
    """The state after reading a chunk of tokens, no head (XLA drops the last block's unused output). Rows
    are left-padded to one length: where reset_BC is True (a row's first token) the state entering it is
    the empty state, so the padding before it leaves no trace (the document resets of training)."""
    return nnx.merge(graphdef, params).hidden(tokens_BC, state, reset_BT=reset_BC)[1]


@functools.partial(jax.jit, static_argnums=0)
def _prefill_last(graphdef, params, state, tokens_BC, reset_BC, targets_BE):
    """`_prefill` of a batch's last chunk, and the head at each row's last token scoring targets_BE (the
    first tokens of the row's continuations): (state, log-probabilities [B, E] from a fp32 log-softmax,
    greedy flags [B, E])."""
    model = nnx.merge(graphdef, params)
    hidden_BCD, state = model.hidden(tokens_BC, state, reset_BT=reset_BC)
    from rwkv_jax.model import target_logprobs
    return (state, *target_logprobs(model.logits(hidden_BCD[:, -1]), targets_BE))


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, params, state, group_R, inputs_RT, at_P, targets_P, row_P):
    """Log-probability and greedy flag of each row: its tokens read from its group's state
    (`state[:, group_R]`), then targets_P[i] predicted at flat position at_P[i] (row * T + t) and added to
    row row_P[i] (R for padding). The head and a fp32 log-softmax (`RWKV.token_logprobs`) run only at
    those P positions (padded to a bucket size), never over padded rows or columns."""
    model = nnx.merge(graphdef, params)
    branched = jax.tree.map(lambda s: s[:, group_R], state)
    hidden_RTD, _ = model.hidden(inputs_RT, branched)
    R, T, D = hidden_RTD.shape
    logp_P, greedy_P = model.token_logprobs(hidden_RTD.reshape(R * T, D)[at_P], targets_P)
    miss_P = jnp.logical_not(greedy_P).astype(jnp.int32)
    logp_R = jax.ops.segment_sum(logp_P, row_P, num_segments=R + 1)[:R]  # segment R: the padding
    misses_R = jax.ops.segment_sum(miss_P, row_P, num_segments=R + 1)[:R]
    return logp_R, misses_R == 0


def _pow2_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _bucket(n: int) -> int:
    """n rounded up to 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ... (four sizes per octave): under 25%
    padding, few distinct shapes to compile."""
    step = max(_pow2_floor(max(n - 1, 1)) // 4, 1)
    return -(-n // step) * step


def _chunks(n: int, longest: int) -> list[int]:
    """Chunk lengths for reading n tokens, left-padded: the remainder past whole `longest` chunks padded up
    to a `_bucket` size, then the whole chunks (`longest` a power of two). One call per chunk, so padding a
    context of 13 tokens to 14 costs a column where a chunk of 1 would cost a call, which reads every
    weight once more."""
    whole, rest = divmod(n, longest)
    return ([_bucket(rest)] if rest else []) + [longest] * whole


# --- The harness model ------------------------------------------------------------------------------

@register_model("rwkv_jax")
class RWKVLM(TemplateLM):
    """An RWKV-4 or RWKV-7 checkpoint as a harness model (see the module docstring).

    Model args: checkpoint, tokenizer, batch_size (contexts read side by side; 'auto' = 8), window
    (tokens per row of one rolling window), prefill_chunk (longest parallel chunk), max_gen_toks (default
    256), context_prefix ('eot', 'none', 'newline'), dtype / wkv_form (numerics overrides), max_positions
    (positions scored per call: bounds the [positions, vocab] logits)."""

    BLOCK_BATCHES = 16  # prefill batches whose continuation rows are sorted by length together

    def __init__(self, checkpoint=None, tokenizer=None, batch_size=8, window: int = 512,
                 prefill_chunk: int = 256, max_gen_toks: int = 256, context_prefix: str = "eot",
                 dtype: str = "", wkv_form: str = "", max_positions: int = 2048, **kwargs):
        super().__init__()
        ignored = {k: v for k, v in kwargs.items() if v is not None and k not in ("device", "max_batch_size")}
        if ignored:
            raise ValueError(f"unknown model args {sorted(ignored)} for rwkv_jax; known: checkpoint, tokenizer, "
                             "batch_size, window, prefill_chunk, max_gen_toks, context_prefix, dtype, wkv_form, "
                             "max_positions")
        if context_prefix not in CONTEXT_PREFIXES:
            raise ValueError(f"context_prefix must be one of {CONTEXT_PREFIXES}, not {context_prefix!r}")
        from rwkv_jax.model import VERSIONS, family
        from rwkv_jax.model.model_config import COMPUTE_DTYPES
        wkv_forms = sorted({f for v in VERSIONS for f in family(v).wkv_forms} | {"auto"})  # any generation's
        for name, value, choices in (("dtype", dtype, COMPUTE_DTYPES), ("wkv_form", wkv_form, wkv_forms)):
            if value and value not in choices:  # found before the model loads, not at the first request
                raise ValueError(f"{name} must be one of {list(choices)}, not {value!r}")
        sizes = {name: _int_arg(name, value) for name, value in (("window", window), ("prefill_chunk", prefill_chunk),
                                                                 ("max_gen_toks", max_gen_toks),
                                                                 ("max_positions", max_positions))}
        overrides = {k: v for k, v in (("dtype", dtype), ("wkv_form", wkv_form)) if v}
        self.model, self.tokenizer, self.checkpoint = _load(checkpoint, tokenizer, overrides)
        self.graphdef, self.params = nnx.split(self.model)
        self.batch_size = self._parse_batch_size(batch_size)
        self.window, self.prefill_chunk = sizes["window"], _pow2_floor(max(sizes["prefill_chunk"], 1))
        self._max_gen_toks, self.max_positions = sizes["max_gen_toks"], sizes["max_positions"]
        if min(self.window, self._max_gen_toks, self.max_positions) < 1:
            raise ValueError("window, max_gen_toks and max_positions must be >= 1")
        self.context_prefix = context_prefix
        # The harness bootstraps standard errors in a forked process pool unless this is set; forking a
        # process that runs JAX (multithreaded) can deadlock.
        os.environ.setdefault("DISABLE_MULTIPROC", "1")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """The harness passes its own batch_size (its command line's default: 1) beside the model args:
        `batch_size` in the model args wins over that default; two different sizes are an error."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "batch_size" in arg_dict and "batch_size" in extra:
            ours, theirs = arg_dict["batch_size"], extra.pop("batch_size")
            if str(theirs) not in ("1", str(ours)):
                raise ValueError(f"batch_size given twice: --model_args batch_size={ours} and --batch_size {theirs}: "
                                 "give one of them")
        return cls(**arg_dict, **extra)

    @staticmethod
    def _parse_batch_size(value) -> int:
        text = str(value if value is not None else 8)
        if text.startswith("auto"):
            return 8
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"batch_size must be a positive integer or 'auto', not {value!r}")
        return int(text)

    # Harness interface --------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return os.path.basename(str(self.tokenizer.path))

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    def get_model_info(self) -> dict:
        c = self.model.config
        return {"checkpoint": self.checkpoint, "tokenizer": str(self.tokenizer.path), "n_layer": c.n_layer,
                "d_model": c.d_model, "vocab_size": c.vocab_size, "dtype": c.dtype,
                "context_prefix": self.context_prefix}

    @property
    def _prefix(self) -> list[int]:
        if self.context_prefix == "eot":
            return [self.eot_token_id]
        if self.context_prefix == "newline":
            return self.tokenizer.encode("\n")
        return []

    # loglikelihood ------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(log p(continuation | context), greedy) of each ((context, continuation), context ids,
        continuation ids): contexts read once per group, the state branched per continuation."""
        groups = collections.defaultdict(list)  # context ids (at least one) -> request indices
        for i, ((context, _), ctx, _) in enumerate(requests):
            # An empty context arrives as [prefix_token_id] (the end-of-text token) already; one of only
            # spaces arrives with no tokens (its spaces moved to the continuation) and is treated alike.
            ids = tuple(ctx) if context == "" else tuple(self._prefix) + tuple(ctx)
            groups[ids or (self.prefix_token_id,)].append(i)
        order = sorted(groups, key=len, reverse=True)  # longest first: memory errors show at once
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="rwkv_jax loglikelihood")
        if requests:  # every context and continuation id, before anything is read
            every = [*groups, *(cont for *_, cont in requests)]
            self._check_ids(np.concatenate([np.asarray(ids, np.int64) for ids in every]))
        block = self.batch_size * self.BLOCK_BATCHES
        for start in range(0, len(order), block):
            contexts = order[start:start + block]
            members = [groups[ctx] for ctx in contexts]
            state, state_rows, first = self._read_contexts(contexts, [[requests[i][2][:1] for i in m]
                                                                      for m in members])
            rows = [(g, i, first[g][k]) for g, m in enumerate(members) for k, i in enumerate(m)]
            for (_, i, _), value in zip(rows, self._score_rows(state, state_rows, rows, requests)):
                results[i] = value
                self.cache_hook.add_partial("loglikelihood", requests[i][0], value)
            bar.update(len(rows))
        bar.close()
        return results

    def _read_contexts(self, contexts, firsts):
        """(state, rows, first) for contexts sorted longest first, and firsts[g] the first tokens of the
        continuations of contexts[g] (each a list of one token, or empty): row rows[g] of the state holds
        the state after contexts[g], and first[g][k] is (log-probability, greedy flag) of firsts[g][k] after
        it ((0.0, True) for an empty one), from the head at the context's last token. Contexts are read
        in batches of `batch_size` (fewer rows padded to a `_bucket` size), left-padded to the batch's
        longest and on to the length of its `_chunks`, and reset to the empty state at their first token. A
        context shorter than the batch's first by more than max(8, a quarter of it) starts a new batch,
        which bounds the padding."""
        batches = []
        for g, ctx in enumerate(contexts):
            longest = len(contexts[batches[-1][0]]) if batches else 0
            if not batches or len(batches[-1]) == self.batch_size or longest - len(ctx) > max(8, longest // 4):
                batches.append([])
            batches[-1].append(g)
        sizes = [min(self.batch_size, _bucket(len(batch))) for batch in batches]
        rows = [0] * len(contexts)
        for batch, offset in zip(batches, np.cumsum([0] + sizes)):
            for j, g in enumerate(batch):
                rows[g] = int(offset) + j
        states, scores = [], []
        for batch, size in zip(batches, sizes):
            ids = [contexts[g] for g in batch]
            chunks = _chunks(len(ids[0]), self.prefill_chunk)
            n = sum(chunks)
            tokens, reset = np.zeros((size, n), np.int32), np.zeros((size, n), bool)
            for j, c in enumerate(ids):
                tokens[j, n - len(c):], reset[j, n - len(c)] = c, True
            reset[:, :1] = False  # the state entering the first token is empty already
            state, pos = self.model.init_state(size), 0
            for k in chunks[:-1]:
                resets = reset[:, pos:pos + k]
                state = _prefill(self.graphdef, self.params, state, tokens[:, pos:pos + k],
                                 resets if resets.any() else None)
                pos += k
            targets = np.zeros((size, _bucket(max(len(firsts[g]) for g in batch))), np.int32)
            for j, g in enumerate(batch):
                targets[j, :len(firsts[g])] = [t[0] if t else 0 for t in firsts[g]]
            resets = reset[:, pos:]
            state, logp, greedy = _prefill_last(self.graphdef, self.params, state, tokens[:, pos:],
                                                resets if resets.any() else None, targets)
            states.append(state)
            scores.append((logp, greedy))
        first = [None] * len(contexts)
        for batch, (logp, greedy) in zip(batches, jax.device_get(scores)):  # one wait, after every batch
            for j, g in enumerate(batch):
                first[g] = [(float(logp[j, k]), bool(greedy[j, k])) if t else (0.0, True)
                            for k, t in enumerate(firsts[g])]
        state = states[0] if len(states) == 1 else jax.tree.map(lambda *s: jnp.concatenate(s, axis=1), *states)
        return state, rows, first

    def _score_rows(self, state, state_rows, rows, requests):
        """(logp, greedy) of each (group, request index, first) row: `first` scores the continuation's
        first token (see `_read_contexts`), and the rest is scored by reading the continuation but its last
        token from the group's state (row state_rows[group]). Rows sorted by length, 4 x batch_size per
        call, at most max_positions scored positions (one row at least)."""
        out = [first for _, _, first in rows]  # (0.0, True) for a continuation with no tokens
        todo = [(r, state_rows[g], list(requests[i][2][:-1]), list(requests[i][2][1:]))
                for r, (g, i, _) in enumerate(rows) if len(requests[i][2]) > 1]
        todo.sort(key=lambda row: len(row[2]))
        while todo:  # the longest rows first
            n = min(len(todo), 4 * self.batch_size)
            while n > 1 and _bucket(sum(len(row[3]) for row in todo[-n:])) > self.max_positions:
                n //= 2
            take, todo = todo[-n:], todo[:-n]
            R, T = _bucket(n), _bucket(max(len(row[2]) for row in take))
            P = _bucket(sum(len(row[3]) for row in take))
            group, inputs = np.zeros(R, np.int32), np.zeros((R, T), np.int32)
            at, targets, row_of = np.zeros(P, np.int32), np.zeros(P, np.int32), np.full(P, R, np.int32)
            i = 0
            for j, (_, state_row, row_inputs, row_targets) in enumerate(take):
                group[j], inputs[j, :len(row_inputs)] = state_row, row_inputs
                k = len(row_targets)  # == len(row_inputs): input t predicts target t
                at[i:i + k], targets[i:i + k], row_of[i:i + k] = j * T + np.arange(k), row_targets, j
                i += k
            logp, greedy = jax.device_get(_score(self.graphdef, self.params, state, group, inputs, at, targets,
                                                 row_of))
            for j, (r, *_) in enumerate(take):
                out[r] = (out[r][0] + float(logp[j]), out[r][1] and bool(greedy[j]))
        return out

    def _check_ids(self, ids):
        check_token_ids(ids, self.model.config.vocab_size, "a request")

    # loglikelihood_rolling ----------------------------------------------------------------------------

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-probability of each whole string, its first token predicted from the end-of-text token."""
        strings = [req.args[0] for req in requests]
        token_lists = [self.tok_encode(s) for s in strings]
        nonempty = [i for i, t in enumerate(token_lists) if t]
        docs = [token_lists[i] for i in nonempty]
        window = min(self.window, _pow2_ceil(max(map(len, docs), default=1)))  # short documents: short windows
        scores = _score_documents(self.model, docs, start_token=self.prefix_token_id, batch_size=self.batch_size,
                                  window=window) if docs else []
        out = [0.0] * len(strings)
        for i, score in zip(nonempty, scores):
            out[i] = score
        for s, score in zip(strings, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (s,), score)
        return out

    # generate_until -----------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Completions of each (context, gen_kwargs) request, batched by equal gen_kwargs."""
        by_kwargs = collections.defaultdict(list)
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            by_kwargs[json.dumps(gen_kwargs, sort_keys=True, default=str)].append(i)
        out = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="rwkv_jax generate_until")
        for key, indices in by_kwargs.items():
            options = self._generation_options(json.loads(key))
            indices.sort(key=lambda i: len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                prompts = [self._prefix + self.tok_encode(requests[i].args[0]) for i in batch]
                prompts = [p or [self.eot_token_id] for p in prompts]  # an empty prompt with no prefix
                for i, text in zip(batch, _generate(self.model, self.tokenizer, prompts, chunk=self.prefill_chunk,
                                                    **options)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

    def _generation_options(self, gen_kwargs: dict) -> dict:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eot_text = self.tokenizer.decode([self.eot_token_id])
        if eot_text and eot_text not in until:  # as the harness's hf model: end-of-text also stops
            until.append(eot_text)
        max_new = self.max_gen_toks
        for name in ("max_gen_toks", "max_new_tokens", "max_tokens"):
            if kwargs.get(name) is not None:
                max_new = int(kwargs.pop(name))
                break
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        options = {"max_new_tokens": max_new, "stop": until, "seed": int(kwargs.pop("seed", 0) or 0),
                   "temperature": temperature if do_sample or temperature > 0 else 0.0,
                   "top_p": float(kwargs.pop("top_p", 1.0) or 1.0), "top_k": int(kwargs.pop("top_k", 0) or 0)}
        for name in ("max_new_tokens", "max_tokens", "max_length"):
            kwargs.pop(name, None)
        if kwargs:
            log.warning("rwkv_jax ignores the generation arguments %s", sorted(kwargs))
        if do_sample and options["temperature"] == 0:
            options["temperature"] = 1.0
        return options

