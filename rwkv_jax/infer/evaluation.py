"""Scoring a language model on documents: loss, perplexity, bits per byte, loss by token position,
LAMBADA-style last-word accuracy, and the parallel-vs-RNN mode check. The documents come from
`rwkv_jax.data.eval_documents`, the report files from `rwkv_jax.infer.eval_report`; `eval.py` is the command line.

Scoring. A document is a list of tokens t_0 .. t_{n-1}; the model reads the end-of-text token and then
the document, and position p (0-based) is the prediction of t_p from eot, t_0 .. t_{p-1}: every token of
the document is scored, the first one from the document boundary alone, as documents follow an
end-of-text token in training.

Memory stays bounded whatever the document length: documents are cut into windows of `window` tokens
and the recurrent state is carried from window to window, so a 16k-token document costs what a
`window`-token one does, per window. One jitted function of fixed shape [batch_size, window] scores a
window of every row; a row whose document ends is refilled with the next document (its state reset to
the empty state inside the function, or to `initial_state`: a state-tuning run's learned state,
`eval.py --initial_state`) and the tail of a document is padded and masked, so it compiles
once. In 'rnn' mode the same window is scored one token at a time with `model.step` (a `lax.scan`); in
'both' mode the two run side by side on the same windows, each carrying its own state, and the largest
differences in per-token loss and in logits are reported.

Bits per byte = total nats / ln 2 / UTF-8 bytes of the evaluated text (the decoded scored tokens).
"""

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.data.documents import Document
from rwkv_jax.data.text_files import jsonl_records
from rwkv_jax.model import RWKVState, check_token_ids, target_logprobs
from rwkv_jax.model.state_file import check_state
from rwkv_jax.train.metrics import bits_per_byte

MODES = ("parallel", "rnn", "both")


# --- LAMBADA --------------------------------------------------------------------------------------

def lambada_examples(path) -> list[tuple[str, str]]:
    """(context, ' ' + last word) of each `{"text": ...}` line: the split of the RWKV LAMBADA evaluation."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LAMBADA file {path} not found (a jsonl file of {{\"text\": ...}} lines)")
    examples = []
    for lineno, record in jsonl_records(path, path.read_text(encoding="utf-8")):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or " " not in text.strip():
            raise ValueError(f'{path}:{lineno}: expected an object with a "text" string of at least two words')
        context, last = text.strip().rsplit(" ", 1)
        examples.append((context, " " + last))
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


def lambada_documents(examples, tokenizer) -> Iterator[Document]:
    for context, target in examples:
        ctx, tgt = tokenizer.encode(context), tokenizer.encode(target)
        if not tgt:
            raise ValueError(f"LAMBADA target {target!r} encodes to no tokens")
        yield Document(np.asarray(ctx + tgt, np.int32), len(target.encode("utf-8")), score_from=len(ctx))


# --- The jitted window --------------------------------------------------------------------------

def _reset(state, reset_B, start):
    rows = lambda x: reset_B.reshape((1, -1) + (1,) * (x.ndim - 2))  # [B] against [L, B, ...]
    return jax.tree.map(lambda s, e: jnp.where(rows(s), e, s), state, start)


def _token_scores(logits, targets):
    logp, hit = target_logprobs(logits.astype(jnp.float32), targets[..., None])
    return -logp[..., 0], hit[..., 0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score_window(graphdef, modes, params, states, start_state, inputs_BW, targets_BW, mask_BW, reset_B):
    """Per-token loss and argmax hit [B, W] per mode, the new states, and (both modes) the largest
    |logit difference| between them over unmasked positions. A row with `reset_B` starts from `start_state`."""
    model = nnx.merge(graphdef, params)
    out, new_states, parallel_logits = {}, {}, None
    if "parallel" in modes:
        state = _reset(states["parallel"], reset_B, start_state)
        hidden_BWD, new_states["parallel"] = model.hidden(inputs_BW, state)
        B, W, D = hidden_BWD.shape
        logp, hit = model.token_logprobs(hidden_BWD.reshape(B * W, D), targets_BW.reshape(B * W))
        out["parallel"] = (-logp.reshape(B, W), hit.reshape(B, W))
        if "rnn" in modes:  # compared with the recurrence's logits below
            parallel_logits = model.logits(hidden_BWD)
    max_diff = jnp.zeros((), jnp.float32)
    if "rnn" in modes:
        state = _reset(states["rnn"], reset_B, start_state)
        xs = (inputs_BW.T, targets_BW.T, mask_BW.T)
        if parallel_logits is not None:
            xs = xs + (jnp.swapaxes(parallel_logits, 0, 1),)

        def body(carry, x):
            state, max_diff = carry
            logits, state = model.step(x[0], state)
            if len(x) == 4:
                diff = jnp.where(x[2][:, None], jnp.abs(logits - x[3]), 0.0)
                max_diff = jnp.maximum(max_diff, diff.max())
            loss, hit = _token_scores(logits, x[1])
            return (state, max_diff), (loss, hit)

        (new_states["rnn"], max_diff), (loss_WB, hit_WB) = jax.lax.scan(body, (state, max_diff), xs)
        out["rnn"] = (loss_WB.T, hit_WB.T)
    return out, new_states, max_diff


def window_bytes(config, batch_size: int, window: int) -> int:
    """About the memory one scored window takes (fp32): logits, log-probabilities and the softmax's pass
    over them [B, W, V], a block's activations [B, W, ~12 D + 2 FFN width], and every row's state."""
    c = config
    state = 5 * c.n_layer * batch_size * max(c.d_model, c.att_width) * 4
    return batch_size * window * (3 * c.vocab_size + 12 * c.d_model + 2 * c.ffn_width) * 4 + state


def device_memory_bytes() -> int | None:
    """The default device's memory: its allocator's limit on GPU/TPU, the machine's RAM on CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_window_fits(config, batch_size: int, window: int) -> None:
    """ValueError naming --batch_size and --window when one window of that size cannot fit the device
    (the arrays are sized from them, not from the documents): a clear error instead of an out-of-memory
    abort or the kernel killing the process."""
    need, have = window_bytes(config, batch_size, window), device_memory_bytes()
    if have is not None and need > have:
        raise ValueError(f"batch_size x window = {batch_size:,} x {window:,} tokens per scored window needs about "
                         f"{need / 2**30:,.1f} GiB (logits over the {config.vocab_size:,}-token vocabulary, "
                         f"activations, states), more than this device's {have / 2**30:,.1f} GiB: lower "
                         "--batch_size or --window (the state is carried from window to window, so a smaller "
                         "window loses nothing)")


@dataclasses.dataclass
class ScoredDocument:
    index: int                 # order in the input
    document: Document
    loss: dict                 # mode -> float32 [n] per-token loss in nats
    hit: dict                  # mode -> bool [n]: the argmax was the token
    max_logit_diff: float = 0.0  # both modes: largest |parallel - rnn| logit over the windows it was in


@dataclasses.dataclass
class _Row:
    """A document in one row of the window batch, while it is being scored."""
    index: int
    document: Document
    inputs: np.ndarray         # the start token, then the document but its last token
    modes: dataclasses.InitVar[tuple]
    offset: int = 0            # tokens already placed into windows
    losses: dict = dataclasses.field(default_factory=dict)  # mode -> list of per-window arrays
    hits: dict = dataclasses.field(default_factory=dict)
    max_logit_diff: float = 0.0

    def __post_init__(self, modes):
        self.losses = {m: [] for m in modes}
        self.hits = {m: [] for m in modes}

    @property
    def consumed(self) -> bool:
        return self.offset >= len(self.inputs)

    def scored(self) -> ScoredDocument:
        return ScoredDocument(self.index, self.document, {m: np.concatenate(v) for m, v in self.losses.items()},
                              {m: np.concatenate(v) for m, v in self.hits.items()}, self.max_logit_diff)


def score_documents(model, documents: Iterable[Document], *, modes=("parallel",), batch_size: int = 4,
                    window: int = 512, start_token: int = 0, max_tokens: int = 0,
                    progress: Callable[[int, int], None] | None = None,
                    initial_state: RWKVState | None = None) -> Iterator[ScoredDocument]:
    """Per-token losses of each document, yielded as documents finish (not in input order).

    `max_tokens` > 0 stops taking new documents once that many tokens were taken. `progress(docs, tokens)`
    is called after every window. `initial_state` (one row, [L, 1, *]): every document starts from it
    instead of the empty state."""
    modes = tuple(m for m in ("parallel", "rnn") if m in modes)
    if not modes:
        raise ValueError(f"modes must name 'parallel' and/or 'rnn', got {modes}")
    if batch_size < 1 or window < 1 or max_tokens < 0:
        raise ValueError(f"batch_size and window must be >= 1 and max_tokens >= 0, got {batch_size}, {window} "
                         f"and {max_tokens}")
    check_window_fits(model.config, batch_size, window)
    graphdef, params = nnx.split(model)
    vocab = model.config.vocab_size
    if initial_state is None:
        start_state = model.init_state(batch_size)
    else:
        check_state(model, initial_state, batch_size=1)
        start_state = jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x, jnp.float32), batch_size, axis=1),
                                   initial_state)
    states = {m: start_state for m in modes}
    B, W = batch_size, window
    docs = iter(documents)
    rows: list[_Row | None] = [None] * B
    taken_docs = taken_tokens = done_docs = 0
    exhausted = False
    pending = None                  # outputs of the dispatched window, read after the next dispatch

    def take() -> _Row | None:
        nonlocal taken_docs, taken_tokens, exhausted
        if exhausted or (max_tokens and taken_tokens >= max_tokens):
            return None
        doc = next(docs, None)
        if doc is None:
            exhausted = True
            return None
        tokens = np.asarray(doc.tokens, np.int64)
        if tokens.ndim != 1 or not len(tokens):
            raise ValueError(f"document {taken_docs} has no tokens")
        check_token_ids(tokens, vocab, f"document {taken_docs}")
        row = _Row(taken_docs, doc, np.concatenate([[start_token], tokens[:-1]]).astype(np.int32), modes)
        taken_docs += 1
        taken_tokens += len(tokens)
        return row

    def collect(result):
        nonlocal done_docs
        out, diff = jax.device_get(result[:2])
        finished = []
        for r, (row, start, valid) in enumerate(result[2]):
            if row is None:
                continue
            row.max_logit_diff = max(row.max_logit_diff, float(diff))
            for m in modes:
                row.losses[m].append(out[m][0][r, :valid])
                row.hits[m].append(out[m][1][r, :valid])
            if start + valid == len(row.inputs):
                done_docs += 1
                finished.append(row.scored())
        return finished

    while True:
        reset = np.zeros(B, bool)
        for r in range(B):
            if rows[r] is None or rows[r].consumed:
                rows[r] = take()
                reset[r] = True
        if all(row is None for row in rows):
            break
        inputs = np.zeros((B, W), np.int32)
        targets = np.zeros((B, W), np.int32)
        mask = np.zeros((B, W), bool)
        placed = []                 # (row, first position, valid count) of each batch row in this window
        for r, row in enumerate(rows):
            if row is None:
                placed.append((None, 0, 0))
                continue
            start = row.offset
            valid = min(W, len(row.inputs) - start)
            inputs[r, :valid] = row.inputs[start:start + valid]
            targets[r, :valid] = row.document.tokens[start:start + valid]
            mask[r, :valid] = True
            row.offset = start + valid
            placed.append((row, start, valid))
        out, states, diff = _score_window(graphdef, modes, params, states, start_state, inputs, targets, mask, reset)
        if pending is not None:
            yield from collect(pending)
        pending = (out, diff, placed)
        if progress is not None:
            progress(done_docs, taken_tokens)
    if pending is not None:
        yield from collect(pending)


# --- Accumulating a report --------------------------------------------------------------------------

class LossStats:
    """Token losses of one mode: totals and the per-position sums (arrays grown as needed)."""

    def __init__(self):
        self.total = 0.0
        self.tokens = 0
        self.bytes = 0
        self.docs = 0
        self.sum_by_pos = np.zeros(0, np.float64)
        self.count_by_pos = np.zeros(0, np.int64)

    def add(self, losses: np.ndarray, num_bytes: int) -> None:
        n = len(losses)
        if n > len(self.sum_by_pos):
            grow = max(n, 2 * len(self.sum_by_pos))
            self.sum_by_pos = np.pad(self.sum_by_pos, (0, grow - len(self.sum_by_pos)))
            self.count_by_pos = np.pad(self.count_by_pos, (0, grow - len(self.count_by_pos)))
        self.sum_by_pos[:n] += losses
        self.count_by_pos[:n] += 1
        self.total += float(np.sum(losses, dtype=np.float64))
        self.tokens += n
        self.bytes += num_bytes
        self.docs += 1

    def summary(self) -> dict:
        if not self.tokens:
            raise ValueError("no tokens were evaluated: the documents are empty")
        loss = self.total / self.tokens
        used = int(np.max(np.nonzero(self.count_by_pos)[0])) + 1
        counts, sums = self.count_by_pos[:used], self.sum_by_pos[:used]
        return {
            "documents": self.docs, "tokens": self.tokens, "bytes": self.bytes,
            "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": bits_per_byte(self.total, self.bytes),
            "loss_by_position": position_buckets(sums, counts),
            "loss_per_position": [round(float(x), 6) for x in sums / np.maximum(counts, 1)],
            "tokens_per_position": counts.tolist(),
        }


def position_buckets(sums: np.ndarray, counts: np.ndarray) -> list[dict]:
    """Log-spaced buckets of 0-based positions: 0, 1, 2-3, 4-7, 8-15, ..."""
    buckets, start, end = [], 0, 0
    while start < len(counts):
        stop = min(end, len(counts) - 1)
        n = int(counts[start:stop + 1].sum())
        if n:
            buckets.append({"positions": f"{start}" if start == end else f"{start}-{end}", "first": start,
                            "last": end, "tokens": n, "loss": float(sums[start:stop + 1].sum() / n)})
        start, end = end + 1, max(1, 2 * end + 1)
    return buckets


def evaluate_documents(model, documents: Iterable[Document], *, mode: str = "parallel", batch_size: int = 4,
                       window: int = 512, start_token: int = 0, max_tokens: int = 0,
                       progress=None, initial_state: RWKVState | None = None) -> dict:
    """The perplexity report (a JSON-ready dict) of `documents` in `mode` ('parallel', 'rnn', 'both'),
    every document started from `initial_state` (one row) or the empty state."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    modes = ("parallel", "rnn") if mode == "both" else (mode,)
    stats = {m: LossStats() for m in modes}
    max_loss_diff = max_logit_diff = 0.0
    start = time.time()
    for scored in score_documents(model, documents, modes=modes, batch_size=batch_size, window=window,
                                  start_token=start_token, max_tokens=max_tokens, progress=progress,
                                  initial_state=initial_state):
        for m in modes:
            stats[m].add(scored.loss[m], scored.document.num_bytes)
        if mode == "both":
            max_loss_diff = max(max_loss_diff, float(np.max(np.abs(scored.loss["parallel"] - scored.loss["rnn"]))))
            max_logit_diff = max(max_logit_diff, scored.max_logit_diff)
    if not stats[modes[0]].tokens:
        raise ValueError("no tokens to evaluate: every document is empty (check the text files, the split "
                         "or --max_docs)")
    report = {"mode": mode, "window": window, "batch_size": batch_size, **stats[modes[0]].summary()}
    if mode == "both":
        rnn = stats["rnn"].summary()
        report["mode_check"] = {
            "parallel_loss": report["loss"], "rnn_loss": rnn["loss"],
            "max_abs_token_loss_diff": max_loss_diff,
            "max_abs_logit_diff": max_logit_diff,
            "abs_mean_loss_diff": abs(report["loss"] - rnn["loss"]),
        }
    report["seconds"] = round(time.time() - start, 3)
    report["tokens_per_second"] = round(report["tokens"] / max(time.time() - start, 1e-9), 1)  # all modes
    return report


def evaluate_lambada(model, examples, tokenizer, *, mode: str = "parallel", batch_size: int = 16,
                     window: int = 256, start_token: int | None = None,
                     initial_state: RWKVState | None = None) -> dict:
    """Last-word accuracy (every target token the argmax) and perplexity exp(-mean log p(last word)), as
    the RWKV LAMBADA evaluation computes them; the context follows an end-of-text token."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    modes = ("parallel", "rnn") if mode == "both" else (mode,)
    start_token = tokenizer.eot_id if start_token is None else start_token
    logp_sum = {m: 0.0 for m in modes}
    correct = {m: 0 for m in modes}
    n = target_tokens = 0
    max_diff = max_logit_diff = 0.0
    start = time.time()
    for scored in score_documents(model, lambada_documents(examples, tokenizer), modes=modes,
                                  batch_size=batch_size, window=window, start_token=start_token,
                                  initial_state=initial_state):
        k = scored.document.score_from
        for m in modes:
            logp_sum[m] -= float(np.sum(scored.loss[m][k:], dtype=np.float64))
            correct[m] += bool(np.all(scored.hit[m][k:]))
        if mode == "both":
            max_diff = max(max_diff, float(np.max(np.abs(scored.loss["parallel"][k:] - scored.loss["rnn"][k:]))))
            max_logit_diff = max(max_logit_diff, scored.max_logit_diff)
        n += 1
        target_tokens += len(scored.document.tokens) - k
    m0 = modes[0]
    report = {"mode": mode, "examples": n, "accuracy": correct[m0] / n,
              "perplexity": math.exp(-logp_sum[m0] / n), "mean_target_tokens": target_tokens / n,
              "seconds": round(time.time() - start, 3)}
    if mode == "both":
        report["mode_check"] = {"rnn_accuracy": correct["rnn"] / n,
                                "rnn_perplexity": math.exp(-logp_sum["rnn"] / n),
                                "max_abs_token_loss_diff": max_diff,
                                "max_abs_logit_diff": max_logit_diff}
    return report


