"""Evaluate an RWKV-4 or RWKV-7 checkpoint: loss, perplexity, bits per byte and loss by token position.

    python eval.py --checkpoint=WORKDIR                          # the run's validation split, latest checkpoint
    python eval.py --checkpoint=RWKV-4-Pile-169M.pth --tokenizer=20B_tokenizer.json --text_files='docs/*.txt'
    python eval.py --checkpoint=HF_DIR --tfds=pg19 --split=test --eval_len=16384 --max_docs=50
    python eval.py --checkpoint=WORKDIR --binidx=data/pile_val_text_document --max_tokens=1000000
    python eval.py --checkpoint=X.pth --tokenizer=T.json --lambada=lambada_test.jsonl    # last-word accuracy
    python eval.py --checkpoint=WORKDIR --mode=both            # parallel and RNN modes, and their difference
    python eval.py --checkpoint=BASE --initial_state=TUNED/state.npz --text_files='style/*.txt'  # a tuned state
    python eval.py --checkpoint=RUN_B --label=B --compare=RUN_A/eval/validation.json   # both curves, one PNG

The checkpoint is a training workdir (its latest good checkpoint, read only: a run may be training in
it), an official .pth, an HF RWKV directory or an rwkv_jax directory. The tokenizer is the run's copy
in a workdir, an HF directory's tokenizer.json, or --tokenizer. The report is printed and written to
--report.json/.md/.png (default: CHECKPOINT_DIR/eval/<data>, or <stem>-<data> for a .pth file; when that
directory is read-only, under $TMPDIR/rwkv_jax-eval/, printed). Documents of any length are evaluated in
windows of --window tokens with the state carried across, so memory does not grow with --eval_len.
"""

import tempfile
import time
from pathlib import Path

from absl import flags

from rwkv_jax.cli import common
from rwkv_jax.cli import runner as cli

_TEXT_FILES = flags.DEFINE_string("text_files", "", "Comma-separated text files, directories or globs "
                                  "(.txt/.md/.py; .jsonl lines with a 'text' field): each file or line a document.")
_TFDS = flags.DEFINE_string("tfds", "", "A TFDS catalog dataset name (e.g. pg19, tiny_shakespeare).")
_SPLIT = flags.DEFINE_string("split", "validation", "Split of --tfds.")
_BINIDX = flags.DEFINE_string("binidx", "", "A .bin/.idx pair (path without the suffix): each sequence a document.")
_LAMBADA = flags.DEFINE_string("lambada", "", "A LAMBADA jsonl file ({\"text\": ...} lines): last-word accuracy "
                               "and perplexity instead of the perplexity report.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Where TFDS datasets are kept (default: the run's data_dir, "
                                "else $RWKV_JAX_DATA_DIR or ~/.cache/rwkv_jax/data).")
_MODE = flags.DEFINE_enum("mode", "parallel", ["parallel", "rnn", "both"],
                          "Parallel (GPT) mode, RNN mode token by token, or both with their largest difference.")
_EVAL_LEN = flags.DEFINE_integer("eval_len", 0, "Tokens evaluated per document (0: whole documents).")
_WINDOW = flags.DEFINE_integer("window", 512, "Tokens per row of one jitted window (state carried across).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "Documents evaluated side by side.")
_MAX_DOCS = flags.DEFINE_integer("max_docs", 0, "Stop after this many documents (0: all).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 0, "Take no new document after this many tokens (0: all).")
_REPORT = flags.DEFINE_string("report", "", "Report path prefix: writes PREFIX.json, PREFIX.md, PREFIX.png.")
_INITIAL_STATE = flags.DEFINE_string("initial_state", "", "A state file (e.g. a state-tuning run's WORKDIR/state.npz): "
                                     "every document starts from it instead of the empty state.")
_WKV_FORM = flags.DEFINE_enum("wkv_form", "", ["", "sequential", "parallel", "chunked"], "WKV form override.")
_LABEL = flags.DEFINE_string("label", "", "The name of this report's curve in plots (default: the checkpoint's name).")
_COMPARE = flags.DEFINE_list("compare", [], "Other reports' PREFIX.json files (from eval.py), comma-separated: their "
                             "loss by position is drawn on this report's PNG and tabled beside this one's.")


def check_flags() -> None:
    """Usage errors, before anything is loaded."""
    common.require(common.CHECKPOINT)
    chosen = [f"--{f.name}" for f in (_TEXT_FILES, _TFDS, _BINIDX, _LAMBADA) if f.value]
    if len(chosen) > 1:
        raise cli.UsageError(f"give at most one of --text_files, --tfds, --binidx, --lambada (got {chosen})")
    common.check_non_negative(_EVAL_LEN, _MAX_DOCS, _MAX_TOKENS)
    if flags.FLAGS["split"].present and not _TFDS.value:  # flags the chosen data would ignore
        raise cli.UsageError(f"--split is for --tfds (got --split={_SPLIT.value} without it)")
    if _LAMBADA.value:
        for flag in (_EVAL_LEN, _MAX_DOCS, _MAX_TOKENS):
            if flag.value:
                raise cli.UsageError(f"--{flag.name} does not apply to --lambada (every example is scored): drop it")
    common.check_positive(_WINDOW, _BATCH_SIZE)
    if _REPORT.value.endswith("/") or (_REPORT.value and not Path(_REPORT.value).name):
        raise cli.UsageError(f"--report={_REPORT.value} names a directory: give a path prefix such as "
                             f"{Path(_REPORT.value) / 'report'} (writes .json, .md and .png)")
    if _REPORT.value:
        _check_report_place(_REPORT.value)
    if _COMPARE.value and _LAMBADA.value:
        raise cli.UsageError("--compare needs a perplexity evaluation (loss by position), not --lambada")
    for path in _COMPARE.value:
        if not Path(path).expanduser().is_file():
            raise cli.UsageError(f"--compare={path}: no such file (give the PREFIX.json an eval.py run wrote)")


def _check_report_place(prefix: str) -> None:
    """A usage error unless files can be created where --report puts them (its directory, or the nearest
    existing directory above it, which write_report would create it under): checked with a probe file
    before the evaluation rather than after it."""
    directory = Path(prefix).expanduser().absolute().parent
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    problem = f"{existing} is not a directory" if not existing.is_dir() else None
    if problem is None:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            problem = f"cannot create files in {existing} ({e.strerror})"
    if problem:
        raise cli.UsageError(f"--report={prefix}: {problem}; give a path prefix in a writable directory")


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    run()


def run() -> dict:
    """The evaluation the parsed flags describe; returns the report."""
    from rwkv_jax import data
    from rwkv_jax.infer import eval_report, evaluation
    from rwkv_jax.io.workdir import Workdir
    check_flags()
    compare = [_read_compare(path) for path in _COMPARE.value]  # a bad file fails before the model loads
    checkpoint = Path(common.CHECKPOINT.value).expanduser()
    start = time.time()
    loaded, tokenizer = common.load_checkpoint(**({"wkv_form": _WKV_FORM.value} if _WKV_FORM.value else {}))
    model = loaded.model
    initial_state = _load_initial_state(model)
    print(f"loaded {checkpoint} ({loaded.format}{f', step {loaded.step}' if loaded.step is not None else ''}; "
          f"{model.config.n_layer} layers x {model.config.d_model}, vocab {model.config.vocab_size}) in "
          f"{time.time() - start:.1f}s", flush=True)

    def progress(docs, tokens):
        now = time.time()
        if now - progress.last > 10:
            progress.last = now
            print(f"  {docs} documents done, {tokens:,} tokens taken ({now - start:.0f}s)", flush=True)
    progress.last = time.time()

    if _LAMBADA.value:
        name, label = "lambada", f"LAMBADA {_LAMBADA.value}"
        report = evaluation.evaluate_lambada(model, evaluation.lambada_examples(_LAMBADA.value), tokenizer,
                                             mode=_MODE.value, batch_size=_BATCH_SIZE.value,
                                             window=min(_WINDOW.value, 256), initial_state=initial_state)
    else:
        run_data = Workdir(checkpoint).data_config() if loaded.format == "workdir" else None
        spec = data.EvalSpec(text_files=_TEXT_FILES.value, tfds=_TFDS.value, split=_SPLIT.value,
                             binidx=_BINIDX.value, run_data=run_data, data_dir=_DATA_DIR.value,
                             eval_len=_EVAL_LEN.value, max_docs=_MAX_DOCS.value)
        docs = data.eval_documents(spec, tokenizer, vocab_size=model.config.vocab_size)
        name, label = docs.name, docs.label
        report = evaluation.evaluate_documents(model, docs.documents, mode=_MODE.value, batch_size=_BATCH_SIZE.value,
                                               window=_WINDOW.value, start_token=tokenizer.eot_id,
                                               max_tokens=_MAX_TOKENS.value, progress=progress,
                                               initial_state=initial_state)
    report = {"checkpoint": str(checkpoint), "format": loaded.format, "checkpoint_step": loaded.step,
              "data": label, "tokenizer": tokenizer.path, "eval_len": _EVAL_LEN.value,
              **({"initial_state": _INITIAL_STATE.value} if _INITIAL_STATE.value else {}), **report}
    if _LABEL.value:
        report["label"] = _LABEL.value
    if compare:
        report["compare"] = compare
    print(eval_report.format_table(report))
    paths = eval_report.write_report(report, _report_prefix(checkpoint, name))
    print("report: " + ", ".join(paths))
    return report


def _load_initial_state(model):
    """The one-row state of --initial_state, checked to fit `model`, or None."""
    if not _INITIAL_STATE.value:
        return None
    from rwkv_jax.model import state_file, state_rows
    try:
        state, _ = state_file.load_state(_INITIAL_STATE.value, model)
    except (ValueError, OSError) as e:
        raise type(e)(f"--initial_state={e}") from None
    if state_rows(state) != 1:
        raise ValueError(f"--initial_state={_INITIAL_STATE.value} holds {state_rows(state)} states (a batch "
                         "saved by generate.py); every document starts from one: save a single prompt's state")
    return state


def _read_compare(path: str) -> dict:
    """The part of the --compare report that this one shows; ValueError naming the file if it is not one."""
    import json

    from rwkv_jax.infer import eval_report
    path = Path(path).expanduser()
    try:
        other = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--compare {path}: not a JSON report ({e})") from e
    return eval_report.compare_part(other, path)


def _report_prefix(checkpoint: Path, name: str) -> str:
    """--report, else CHECKPOINT_DIR/eval/NAME; a read-only place is replaced by one under $TMPDIR."""
    from rwkv_jax.io.workdir import Workdir
    if _REPORT.value:
        return _REPORT.value
    name = name if _MODE.value == "parallel" else f"{name}-{_MODE.value}"
    name = f"{name}-{Path(_INITIAL_STATE.value).stem}" if _INITIAL_STATE.value else name
    name = name if checkpoint.is_dir() else f"{checkpoint.stem}-{name}"  # .pth files side by side keep their reports
    place = Workdir(checkpoint if checkpoint.is_dir() else checkpoint.parent)
    if place.writable():
        return str(place.eval_dir / name)
    fallback = Path(tempfile.gettempdir()) / "rwkv_jax-eval" / place.path.resolve().name / name
    print(f"{place.path} is read-only: writing the report under {fallback.parent} instead", flush=True)
    return str(fallback)


def entry_point():
    cli.run(main, shared_flags=(common.CHECKPOINT, common.TOKENIZER, common.DTYPE))


if __name__ == "__main__":
    entry_point()
