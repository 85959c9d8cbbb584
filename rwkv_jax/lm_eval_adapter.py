"""rwkv-jax as a model of EleutherAI's lm-evaluation-harness (`lm-eval` 0.4.x), registered as `rwkv_jax`.

    python -m rwkv_jax.lm_eval --model_args checkpoint=RWKV-4-Pile-169M.pth,tokenizer=20B_tokenizer.json \\
        --tasks lambada_local,choice_local --include_path tasks/ --batch_size 8

    import lm_eval
    from lm_eval.tasks import TaskManager
    from rwkv_jax.lm_eval_adapter import RWKVLM
    lm = RWKVLM(checkpoint="RWKV-4-Pile-169M.pth", tokenizer="20B_tokenizer.json", batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_local"], task_manager=TaskManager(include_path="tasks"))

The checkpoint is anything `rwkv_jax.weights.load_model` loads (a training workdir, an official .pth, an
HF RWKV directory, an rwkv_jax directory) or an `RWKV` module; the tokenizer a file (.json HF tokenizers,
.model sentencepiece; default: the workdir's copy or the HF directory's tokenizer.json) or a
`rwkv_jax.data.tokenizer.Tokenizer`.

How the three request types run, using the recurrence:
  * `loglikelihood`: (context, continuation) strings are tokenized as the harness's HF model does (the
    harness's `TemplateLM`: trailing spaces of the context move to the continuation, context +
    continuation is encoded as one string and split after the tokens of the context alone; an empty
    context becomes the end-of-text token). Requests sharing a context (the endings of a multiple-choice
    question) form a group: the context is read once, in parallel mode, and its state is copied for each
    continuation, which is scored from there in one padded, masked parallel call. Contexts are read
    `batch_size` at a time, sorted by length; rows advance together by power-of-two chunks no longer than
    the shortest remaining context, and a row whose context is done keeps its state (a masked update),
    so no padding ever enters a state and at most log2(chunk) + 1 shapes compile.
  * `loglikelihood_rolling`: each document once, in windows of `window` tokens with the state carried
    (rwkv_jax.evaluation's scorer), the first token predicted from the end-of-text token, as the harness
    does with its prefix token. No window re-reads overlapping context, unlike a transformer.
  * `generate_until`: rwkv_jax.generate's jitted decoder (parallel prefill, RNN decode in one
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

log = logging.getLogger(__name__)

CONTEXT_PREFIXES = ("eot", "none", "newline")


# --- The rwkv_jax internals this adapter uses (all of them, in one place) ------------------------------
# Loading (weights.load_model, weights.find_tokenizer, data.tokenizer.check_fits), the windowed scorer of
# eval.py (evaluation.score_documents over data.documents.Document) and the jitted decoder
# (generate.generate_tokens).
# Everything else below uses only the model's public API: model(tokens_BT, state), model.init_state(B),
# model.config and the `head` module.

def _load(checkpoint, tokenizer, overrides: dict):
    """(model, tokenizer, description) from paths or objects."""
    from rwkv_jax import weights
    from rwkv_jax.data.tokenizer import check_fits
    from rwkv_jax.model import RWKV
    if isinstance(checkpoint, RWKV):
        model, name = checkpoint, "<RWKV module>"
        if overrides:
            raise ValueError(f"dtype / wkv_form overrides {overrides} need a checkpoint path, not a loaded model")
    else:
        if not checkpoint:
            raise ValueError("no checkpoint: pass --model_args checkpoint=PATH (a training workdir, an official "
                             ".pth, an HF RWKV directory or an rwkv_jax directory)")
        name = str(Path(checkpoint).expanduser())
        weights.detect_format(name)  # FileNotFoundError for a missing checkpoint
        model = weights.load_model(name, **overrides)
        if isinstance(model, tuple):  # load_model returning (model, info)
            model = model[0]
    if tokenizer is None or isinstance(tokenizer, str):
        if isinstance(checkpoint, RWKV) and not tokenizer:
            raise ValueError("a loaded model needs tokenizer=PATH or a Tokenizer object")
        tokenizer = weights.find_tokenizer(name, tokenizer or "")
    check_fits(tokenizer, model.config.vocab_size, fix="it is not this model's tokenizer (pass tokenizer=PATH)")
    return model, tokenizer, name


def _score_documents(model, token_lists, *, start_token, batch_size, window):
    """Summed log-probability of each token list (scored after `start_token`), in input order."""
    from rwkv_jax import evaluation
    from rwkv_jax.data.documents import Document
    docs = (Document(np.asarray(t, np.int32)) for t in token_lists)
    out = [0.0] * len(token_lists)
    for scored in evaluation.score_documents(model, docs, batch_size=batch_size, window=window,
                                             start_token=start_token):
        out[scored.index] = -float(np.sum(scored.loss["parallel"], dtype=np.float64))
    return out


def _generate(model, tokenizer, prompts, *, max_new_tokens, stop, temperature, top_p, top_k, seed, chunk):
    """Completion texts of token-id prompts, cut before the first stop string."""
    from rwkv_jax import generate
    gen = generate.generate_tokens(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, top_k=top_k, seed=seed, eot_id=tokenizer.eot_id,
                                   stop=stop, decode=tokenizer.decode, prefill_chunk=chunk)
    return [c.text for c in gen]


# --- Jitted pieces of loglikelihood ----------------------------------------------------------------

class _Identity(nnx.Module):
    def __call__(self, x):
        return x


@functools.partial(jax.jit, static_argnums=0)
def _advance(graphdef, params, state, last_BV, tokens_BC, active_B, ending_B):
    """Reads a chunk of tokens in parallel mode into the rows that are `active` (the others keep their
    state), and keeps the next-token logits of the rows whose context `ending` here. The head runs on the
    chunk's last position only (swapped out of this traced copy of the model)."""
    model = nnx.merge(graphdef, params)
    head, model.head = model.head, _Identity()
    hidden_BCD, new_state = model(tokens_BC, state)
    logits_BV = head(hidden_BCD[:, -1].astype(model.config.dtype)).astype(jnp.float32)
    keep = lambda old, new: jnp.where(active_B.reshape((1, -1) + (1,) * (old.ndim - 2)), new, old)  # noqa: E731
    state = jax.tree.map(keep, state, new_state)
    return state, jnp.where(ending_B[:, None], logits_BV, last_BV)


@functools.partial(jax.jit, static_argnums=0)
def _continuations(graphdef, params, state, last_GV, group_R, first_R, inputs_RT, targets_RT, mask_RT):
    """Log-probability and greedy flag of each continuation row: its first token from its group's
    next-token logits, the rest from one parallel call on the group's state, copied per row."""
    logp0_RV = jax.nn.log_softmax(last_GV[group_R], axis=-1)
    logp_R = jnp.take_along_axis(logp0_RV, first_R[:, None], axis=-1)[:, 0]
    greedy_R = jnp.argmax(logp0_RV, axis=-1) == first_R
    if inputs_RT.shape[1]:  # continuations longer than one token
        model = nnx.merge(graphdef, params)
        branched = jax.tree.map(lambda s: s[:, group_R], state)
        logits_RTV, _ = model(inputs_RT, branched)
        logp_RTV = jax.nn.log_softmax(logits_RTV.astype(jnp.float32), axis=-1)
        logp_RT = jnp.take_along_axis(logp_RTV, targets_RT[..., None], axis=-1)[..., 0]
        logp_R = logp_R + jnp.sum(jnp.where(mask_RT, logp_RT, 0.0), axis=1)
        hit_RT = jnp.argmax(logp_RTV, axis=-1) == targets_RT
        greedy_R = greedy_R & jnp.all(hit_RT | ~mask_RT, axis=1)
    return logp_R, greedy_R


def _pow2_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


# --- The harness model ------------------------------------------------------------------------------

@register_model("rwkv_jax")
class RWKVLM(TemplateLM):
    """An RWKV-4 checkpoint as a harness model (see the module docstring).

    Model args: checkpoint, tokenizer, batch_size (contexts read side by side; 'auto' = 8), window
    (tokens per row of one rolling window), prefill_chunk (longest parallel chunk), max_gen_toks (default
    256), context_prefix ('eot', 'none', 'newline'), dtype / wkv_form (numerics overrides), max_positions
    (continuation tokens scored per call: bounds the [rows, tokens, vocab] logits)."""

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
        overrides = {k: v for k, v in (("dtype", dtype), ("wkv_form", wkv_form)) if v}
        self.model, self.tokenizer, self.checkpoint = _load(checkpoint, tokenizer, overrides)
        self.graphdef, self.params = nnx.split(self.model)
        self.batch_size = self._parse_batch_size(batch_size)
        self.window, self.prefill_chunk = int(window), _pow2_floor(max(int(prefill_chunk), 1))
        self._max_gen_toks, self.max_positions = int(max_gen_toks), int(max_positions)
        if min(self.window, self._max_gen_toks, self.max_positions) < 1:
            raise ValueError("window, max_gen_toks and max_positions must be >= 1")
        self.context_prefix = context_prefix
        # The harness bootstraps standard errors in a forked process pool unless this is set; forking a
        # process that runs JAX (multithreaded) can deadlock.
        os.environ.setdefault("DISABLE_MULTIPROC", "1")

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
        groups = collections.defaultdict(list)  # context ids -> request indices
        for i, ((context, _), ctx, _) in enumerate(requests):
            # An empty context arrives as [prefix_token_id] (the end-of-text token) already; one of only
            # spaces arrives with no tokens (its spaces moved to the continuation) and is treated alike.
            ids = tuple(ctx) if context == "" else tuple(self._prefix) + tuple(ctx)
            groups[ids or (self.prefix_token_id,)].append(i)
        order = sorted(groups, key=len, reverse=True)  # longest first: memory errors show at once
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="rwkv_jax loglikelihood")
        for start in range(0, len(order), self.batch_size):
            contexts = order[start:start + self.batch_size]
            state, last = self._read_contexts(contexts)
            rows = [(g, i) for g, ctx in enumerate(contexts) for i in groups[ctx]]
            for (g, i), value in zip(rows, self._score_rows(state, last, rows, requests)):
                results[i] = value
                self.cache_hook.add_partial("loglikelihood", requests[i][0], value)
            bar.update(len(rows))
        bar.close()
        return results

    def _read_contexts(self, contexts):
        """State and next-token logits after each context (padded to a power-of-two number of rows)."""
        B = self.batch_size  # one shape; only the last batch has empty rows
        lengths = np.array([len(c) for c in contexts] + [0] * (B - len(contexts)))
        tokens = np.zeros((B, int(lengths.max())), np.int32)
        for b, ctx in enumerate(contexts):
            tokens[b, :len(ctx)] = ctx
        self._check_ids(tokens)
        state = self.model.init_state(B)
        last = jnp.zeros((B, self.model.config.vocab_size), jnp.float32)
        pos = np.zeros(B, np.int64)
        while True:
            active = pos < lengths
            if not active.any():
                return state, last
            n = min(self.prefill_chunk, _pow2_floor(int((lengths - pos)[active].min())))
            chunk = np.zeros((B, n), np.int32)
            for b in np.nonzero(active)[0]:
                chunk[b] = tokens[b, pos[b]:pos[b] + n]
            state, last = _advance(self.graphdef, self.params, state, last, chunk, active,
                                   active & (pos + n == lengths))
            pos = np.where(active, pos + n, pos)

    def _score_rows(self, state, last, rows, requests):
        """(logp, greedy) of each (group, request index) row, in calls of at most max_positions tokens."""
        conts = [list(requests[i][2]) for _, i in rows]
        out = [(0.0, True)] * len(rows)  # a continuation with no tokens has probability 1
        todo = sorted((r for r, c in enumerate(conts) if c), key=lambda r: len(conts[r]))
        while todo:  # the longest rows first, as many as fit in max_positions at their padded length
            longest = len(conts[todo[-1]])
            T = _pow2_ceil(longest - 1) if longest > 1 else 0
            per_call = _pow2_floor(max(1, self.max_positions // max(T, 1)))
            take, todo = todo[-per_call:], todo[:-per_call]
            R = _pow2_ceil(len(take))
            group = np.zeros(R, np.int32)
            first = np.zeros(R, np.int32)
            inputs = np.zeros((R, T), np.int32)
            targets = np.zeros((R, T), np.int32)
            mask = np.zeros((R, T), bool)
            for j, r in enumerate(take):
                c = conts[r]
                group[j], first[j] = rows[r][0], c[0]
                inputs[j, :len(c) - 1], targets[j, :len(c) - 1], mask[j, :len(c) - 1] = c[:-1], c[1:], True
            self._check_ids(first)
            logp, greedy = jax.device_get(_continuations(self.graphdef, self.params, state, last, group, first,
                                                         inputs, targets, mask))
            for j, r in enumerate(take):
                out[r] = (float(logp[j]), bool(greedy[j]))
        return out

    def _check_ids(self, ids):
        vocab = self.model.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"token id {int(ids.max())} is outside the model's vocabulary of {vocab}: the "
                             "tokenizer does not fit this model")

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

