"""Batch production speed from the token cache of the embedded (stdlib) corpus.

  python benchmarks/data.py [--seconds 3]

Prints tokens/s of `Batches.batch_at` (single-threaded numpy, 12 x 1024 windows) next to the
tokens one training step of the 169M config consumes, and how many such steps/s data can feed.
"""

import argparse
import importlib.util
import os
import sys
import time

from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rwkv_jax import data  # pylint: disable=wrong-import-position

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_tokens_169m() -> tuple[int, str]:
    """batch_size * seq_len of configs/169m.py, assuming batch 12 and seq 1024 where it lacks them."""
    path = os.path.join(_ROOT, "configs", "169m.py")
    train = {}
    if os.path.isfile(path):
        spec = importlib.util.spec_from_file_location("config_169m", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        train = module.get_config().get("train", {})
    batch, seq = train.get("batch_size"), train.get("seq_len")
    source = (f"configs/169m.py: batch {batch or 12}{'' if batch else ' (assumed)'} x "
              f"seq {seq or 1024}{'' if seq else ' (assumed)'}")
    return (batch or 12) * (seq or 1024), source


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--batch_size", type=int, default=12)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = p.parse_args()
    logging.set_verbosity(logging.INFO)  # Show build progress on a first run.

    c = data.default_data_config()
    start = time.time()
    _, train, _ = data.make_datasets(c, seq_len=args.seq_len, batch_size=args.batch_size,
                                     model_vocab_size=c.sp_vocab_size)
    print(f"data ready in {time.time() - start:.1f}s ({c.data_dir}): {len(train.tokens_N)} train tokens")

    train.batch_at(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        train.batch_at(steps)
        steps += 1
    elapsed = time.perf_counter() - start
    rate = steps * args.batch_size * args.seq_len / elapsed
    need, source = step_tokens_169m()
    print(f"batch production: {rate / 1e6:.1f}M tokens/s ({steps / elapsed:.0f} batches/s of "
          f"{args.batch_size} x {args.seq_len}, one thread)")
    print(f"169M training step: {need} tokens ({source})")
    print(f"ratio: data feeds {rate / need:.0f} training steps/s; target > 1M tokens/s: "
          f'{"met" if rate > 1e6 else "NOT met"}')
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"tokens_per_s": rate, "step_tokens_169m": need, "batch": [args.batch_size, args.seq_len]}, f)


if __name__ == "__main__":
    main()
