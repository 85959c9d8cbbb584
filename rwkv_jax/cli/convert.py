"""Convert RWKV-4 and RWKV-7 weights between an official .pth, an HF transformers directory (RWKV-4 only)
and rwkv_jax.

    python -m rwkv_jax.cli.convert RWKV-4-Pile-169M.pth out/169m            # -> rwkv_jax directory
    python -m rwkv_jax.cli.convert out/169m hf/169m --to=hf                  # -> RwkvForCausalLM directory
    python -m rwkv_jax.cli.convert hf/169m back.pth                          # '.pth' destination -> official
    python -m rwkv_jax.cli.convert WORKDIR out/run.pth                       # a training run's latest checkpoint

The source format is detected; the destination format comes from --to, else from the path
('.pth' -> official, anything else -> rwkv_jax). A training workdir is only read.
"""

import time
from pathlib import Path

from absl import flags

from rwkv_jax.cli import common
from rwkv_jax.cli import runner as cli

_TO = flags.DEFINE_enum("to", "", ["", "pth", "hf", "rwkv_jax"], "Destination format (default: from the path).")


def _destination_format(dst: str, to: str) -> str:
    if to:
        return to
    return "pth" if Path(dst).suffix in (".pth", ".pt") else "rwkv_jax"


def main(argv):
    if len(argv) != 3:
        raise cli.UsageError(f"expected SRC and DST, got {argv[1:] or 'nothing'}")
    from rwkv_jax.io import weights
    src, dst = argv[1:]
    src_path, dst_path = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    if dst_path == src_path or dst_path in src_path.parents:
        raise cli.UsageError(f"DST {dst} is SRC or a directory holding it: writing there would replace SRC; choose "
                             "another destination")
    if src_path in dst_path.parents:
        raise cli.UsageError(f"DST {dst} is inside SRC {src}: the conversion would write into its own source; "
                             "choose a destination outside it")
    fmt = _destination_format(dst, _TO.value)
    start = time.perf_counter()
    print(f"reading {src} ({weights.detect_format(src)})", flush=True)
    model = weights.load_model(src)
    weights.check_finite(model, src)
    c = model.config
    print(f"model: {c.n_layer} layers, d_model={c.d_model}, d_ffn={c.ffn_width}, vocab={c.vocab_size}", flush=True)
    print(f"writing {dst} ({fmt})", flush=True)
    weights.write_model(model, dst, fmt, overwrite=common.OVERWRITE.value)
    print(f"done in {time.perf_counter() - start:.1f}s", flush=True)


def entry_point():
    cli.run(main, shared_flags=(common.OVERWRITE,))


if __name__ == "__main__":
    entry_point()
