"""Convert RWKV-4 weights between an official .pth, an HF transformers directory and rwkv_jax.

    python -m rwkv_jax.convert RWKV-4-Pile-169M.pth out/169m            # -> rwkv_jax directory
    python -m rwkv_jax.convert out/169m hf/169m --to=hf                  # -> RwkvForCausalLM directory
    python -m rwkv_jax.convert hf/169m back.pth                          # '.pth' destination -> official

The source format is detected; the destination format comes from --to, else from the path
('.pth' -> official, anything else -> rwkv_jax).
"""

import argparse
import sys
import time
from pathlib import Path

from rwkv_jax import weights


def _destination_format(dst: str, to: str | None) -> str:
    if to:
        return to
    return "pth" if Path(dst).suffix in (".pth", ".pt") else "rwkv_jax"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rwkv_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="official .pth file, HF directory or rwkv_jax directory")
    parser.add_argument("dst", help="where to write")
    parser.add_argument("--to", choices=weights.FORMATS, help="destination format (default: from the path)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    args = parser.parse_args(argv)

    fmt = _destination_format(args.dst, args.to)
    start = time.perf_counter()
    try:
        src_fmt = weights.detect_format(args.src)
        print(f"reading {args.src} ({src_fmt})", flush=True)
        model = weights.load_model(args.src)
        c = model.config
        print(f"model: {c.n_layer} layers, d_model={c.d_model}, d_ffn={c.ffn_width}, vocab={c.vocab_size}",
              flush=True)
        print(f"writing {args.dst} ({fmt})", flush=True)
        weights.write_model(model, args.dst, fmt, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
