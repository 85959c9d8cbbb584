"""Evaluate an RWKV-4 checkpoint: loss, perplexity, bits per byte and loss by token position.

    python eval.py --checkpoint=WORKDIR                          # the run's validation split, latest checkpoint
    python eval.py --checkpoint=RWKV-4-Pile-169M.pth --tokenizer=20B_tokenizer.json --text_files='docs/*.txt'
    python eval.py --checkpoint=HF_DIR --tfds=pg19 --split=test --eval_len=16384 --max_docs=50
    python eval.py --checkpoint=WORKDIR --binidx=data/pile_val_text_document --max_tokens=1000000
    python eval.py --checkpoint=X.pth --tokenizer=T.json --lambada=lambada_test.jsonl    # last-word accuracy
    python eval.py --checkpoint=WORKDIR --mode=both            # parallel and RNN modes, and their difference

The checkpoint is a training workdir (its latest good checkpoint), an official .pth, an HF RWKV
directory or an rwkv_jax directory. The tokenizer is the run's copy in a workdir, an HF directory's
tokenizer.json, or --tokenizer. The report is printed and written to --report.json/.md/.png (default:
CHECKPOINT_DIR/eval/<data>). Documents of any length are evaluated in windows of --window tokens with
the state carried across, so memory does not grow with --eval_len.
"""

import sys
from pathlib import Path

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, official .pth, HF or rwkv_jax directory.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer file (.model sentencepiece, .json HF tokenizers); "
                                 "default: the workdir's copy or the HF directory's tokenizer.json.")
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
_DTYPE = flags.DEFINE_string("dtype", "", "Compute dtype override: float32 or bfloat16 (default: the checkpoint's).")
_WKV_FORM = flags.DEFINE_string("wkv_form", "", "WKV form override: sequential, parallel or chunked.")
flags.mark_flags_as_required(["checkpoint"])


def _data_config(checkpoint: Path):
    """The `data` section of a training workdir's config.json, or None."""
    import json
    import ml_collections
    path = checkpoint / "config.json"
    if not (checkpoint.is_dir() and (checkpoint / "checkpoints").is_dir() and path.is_file()):
        return None
    return ml_collections.ConfigDict(json.loads(path.read_text())).data


def documents(checkpoint: Path, tokenizer, data_dir: str):
    """(name, label, iterator of Documents) for the data the flags choose."""
    import os
    from rwkv_jax import evaluation
    from rwkv_jax.data import binidx, catalog, pipeline, text_files
    chosen = [f for f in (_TEXT_FILES, _TFDS, _BINIDX) if f.value]
    if len(chosen) > 1:
        raise app.UsageError(f"give at most one of --text_files, --tfds, --binidx (got {[f.name for f in chosen]})")
    limits = dict(eval_len=_EVAL_LEN.value, max_docs=_MAX_DOCS.value)
    if _TEXT_FILES.value:
        files = text_files.find_text_files(_TEXT_FILES.value)

        def texts():
            stats = text_files.ReadStats()
            for f in files:
                for _, text in text_files.read_documents(f, stats):
                    yield text
        return ("text", f"{len(files)} text file(s): {_TEXT_FILES.value}",
                evaluation.documents_from_texts(texts(), tokenizer, **limits))
    if _TFDS.value:
        builder = catalog.build_catalog(_TFDS.value, data_dir=os.path.join(data_dir, "tfds"))
        catalog.num_examples(builder, _SPLIT.value)
        key = catalog.text_key(builder)
        name = f"tfds-{_TFDS.value.replace('/', '_')}-{_SPLIT.value}"
        return name, f"TFDS {_TFDS.value} split {_SPLIT.value}", evaluation.documents_from_texts(
            pipeline.split_texts(builder, _SPLIT.value, key), tokenizer, **limits)
    if _BINIDX.value:
        ds = binidx.MMapIndexedDataset(os.path.expanduser(_BINIDX.value))
        return "binidx", f"binidx {_BINIDX.value} ({len(ds)} sequences)", evaluation.documents_from_tokens(
            (ds[i] for i in range(len(ds))), tokenizer, **limits)
    c = _data_config(checkpoint)
    if c is None:
        raise app.UsageError("no data: a checkpoint that is not a training workdir needs --text_files, --tfds, "
                             "--binidx or --lambada")
    if c.source == "binidx":
        ds = binidx.MMapIndexedDataset(os.path.expanduser(c.binidx_prefix))
        if not c.validation_fraction or not c.eval_split:
            raise ValueError("the run has no validation split (validation_fraction or eval_split is empty)")
        first = len(ds) - max(1, round(c.validation_fraction * len(ds)))  # as rwkv_jax.data splits it
        return "validation", f"the run's binidx validation split ({c.binidx_prefix}, sequences {first}..)", \
            evaluation.documents_from_tokens((ds[i] for i in range(first, len(ds))), tokenizer, **limits)
    if data_dir:
        c.data_dir = data_dir
    from rwkv_jax import data as data_lib
    builder, key, eval_split = data_lib.text_source(c)  # the run's dataset, as training built it
    if not eval_split:
        raise ValueError("the run has no validation split (config.data.text_split='all' or eval_split=''): "
                         "pass --text_files, --tfds or --binidx")
    return "validation", f"the run's {c.source} dataset, split {eval_split}", evaluation.documents_from_texts(
        pipeline.split_texts(builder, eval_split, key), tokenizer, **limits)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run()
    except (FileNotFoundError, ValueError) as e:  # bad inputs: one clear line, no traceback
        sys.exit(f"eval.py: error: {e}")


def run() -> dict:
    """The evaluation the parsed flags describe; returns the report."""
    import time
    from rwkv_jax import evaluation, weights
    from rwkv_jax.data.config import default_data_dir
    checkpoint = Path(_CHECKPOINT.value).expanduser()
    overrides = {k: v for k, v in (("dtype", _DTYPE.value), ("wkv_form", _WKV_FORM.value)) if v}
    fmt = weights.detect_format(checkpoint)  # FileNotFoundError for a missing checkpoint
    tokenizer = evaluation.find_tokenizer(checkpoint, _TOKENIZER.value)
    start = time.time()
    model = weights.load_model(checkpoint, **overrides)
    evaluation.check_tokenizer_fits(tokenizer, model)
    step = getattr(model, "checkpoint_step", None)
    print(f"loaded {checkpoint} ({fmt}{f', step {step}' if step is not None else ''}; {model.config.n_layer} "
          f"layers x {model.config.d_model}, vocab {model.config.vocab_size}) in {time.time() - start:.1f}s",
          flush=True)
    run_data = _data_config(checkpoint)
    data_dir = _DATA_DIR.value or (run_data.data_dir if run_data is not None else default_data_dir())

    def progress(docs, tokens):
        now = time.time()
        if now - progress.last > 10:
            progress.last = now
            print(f"  {docs} documents done, {tokens:,} tokens taken ({now - start:.0f}s)", flush=True)
    progress.last = time.time()

    if _LAMBADA.value:
        name, label = "lambada", f"LAMBADA {_LAMBADA.value}"
        report = evaluation.evaluate_lambada(model, evaluation.lambada_examples(_LAMBADA.value), tokenizer,
                                             mode=_MODE.value, batch_size=max(_BATCH_SIZE.value, 1),
                                             window=min(_WINDOW.value, 256))
    else:
        name, label, docs = documents(checkpoint, tokenizer, data_dir)
        report = evaluation.evaluate_documents(model, docs, mode=_MODE.value, batch_size=_BATCH_SIZE.value,
                                               window=_WINDOW.value, start_token=tokenizer.eot_id,
                                               max_tokens=_MAX_TOKENS.value, progress=progress)
    report = {"checkpoint": str(checkpoint), "format": fmt, "checkpoint_step": step, "data": label,
              "tokenizer": tokenizer.path, "eval_len": _EVAL_LEN.value, **report}
    print(evaluation.format_table(report))
    prefix = _REPORT.value or str((checkpoint if checkpoint.is_dir() else checkpoint.parent) / "eval" /
                                  (name if _MODE.value == "parallel" else f"{name}-{_MODE.value}"))
    paths = evaluation.write_report(report, prefix)
    print("report: " + ", ".join(paths))
    return report


if __name__ == "__main__":
    sys.exit(app.run(main))
