"""Evaluate an RWKV-4 or RWKV-7 checkpoint: loss, perplexity, bits per byte and loss by token position.

    python eval.py --checkpoint=WORKDIR                          # the run's validation split, latest checkpoint
    python eval.py --checkpoint=RWKV-4-Pile-169M.pth --tokenizer=20B_tokenizer.json --text_files='docs/*.txt'
    python eval.py --checkpoint=X.pth --tokenizer=T.json --lambada=lambada_test.jsonl    # last-word accuracy

All flags: `python eval.py --help`; the program is rwkv_jax/cli/eval.py (also `rwkv-eval`).
"""

from rwkv_jax.cli.eval import entry_point, main, run  # noqa: F401  (run: the evaluation, for tests)

if __name__ == "__main__":
    entry_point()
