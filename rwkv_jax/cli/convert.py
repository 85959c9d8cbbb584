"""Convert RWKV-4 and RWKV-7 weights between an official .pth, an HF transformers directory (RWKV-4 only)
and rwkv_jax.

    python -m rwkv_jax.cli.convert RWKV-4-Pile-169M.pth out/169m            # -> rwkv_jax directory
    python -m rwkv_jax.cli.convert out/169m hf/169m --to=hf                  # -> RwkvForCausalLM directory
    python -m rwkv_jax.cli.convert hf/169m back.pth                          # '.pth' destination -> official
    python -m rwkv_jax.cli.convert WORKDIR out/run.pth                       # a training run's latest checkpoint
    python -m rwkv_jax.cli.convert LORA_WORKDIR out/run.pth --merge_lora     # a LoRA run, adapters merged in
    python -m rwkv_jax.cli.convert LORA_WORKDIR out/adapters.npz --adapters_only  # its adapters alone

The source format is detected; the destination format comes from --to, else from the path
('.pth' -> official, anything else -> rwkv_jax). A training workdir is only read. A LoRA run
(optim.trainable='lora') needs one of --merge_lora (W + A B alpha / rank in fp32, written in any format) or
--adapters_only (an .npz of the adapters and a header; `optim.lora_init` reads it back).
"""

import time
from pathlib import Path

from absl import flags

from rwkv_jax.cli import common
from rwkv_jax.cli import runner as cli

_TO = flags.DEFINE_enum("to", "", ["", "pth", "hf", "rwkv_jax"], "Destination format (default: from the path).")
_MERGE_LORA = flags.DEFINE_bool("merge_lora", False, "SRC is a LoRA run's workdir: write its model with the "
                                "adapters merged into the base's matrices.")
_ADAPTERS_ONLY = flags.DEFINE_bool("adapters_only", False, "SRC is a LoRA run's workdir: write its adapters alone "
                                   "to DST (.npz), for optim.lora_init.")


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
    source_format = weights.detect_format(src)
    spec = _lora_spec(src, source_format)
    if _ADAPTERS_ONLY.value:
        _write_adapters(src, dst, spec)
        print(f"done in {time.perf_counter() - start:.1f}s", flush=True)
        return
    print(f"reading {src} ({source_format}{', LoRA adapters merged' if spec else ''})", flush=True)
    model = weights.load_model(src)
    weights.check_finite(model, src)
    c = model.config
    print(f"model: {c.n_layer} layers, d_model={c.d_model}, d_ffn={c.ffn_width}, vocab={c.vocab_size}", flush=True)
    print(f"writing {dst} ({fmt})", flush=True)
    weights.write_model(model, dst, fmt, overwrite=common.OVERWRITE.value)
    print(f"done in {time.perf_counter() - start:.1f}s", flush=True)


def _lora_spec(src: str, source_format: str):
    """The LoraSpec of a LoRA workdir SRC (None for any other source), checked against the flags."""
    from rwkv_jax.io.workdir import Workdir
    spec = Workdir(src).lora_spec() if source_format == "workdir" else None
    if _MERGE_LORA.value and _ADAPTERS_ONLY.value:
        raise cli.UsageError("--merge_lora and --adapters_only exclude each other: pass one")
    if spec is None and (_MERGE_LORA.value or _ADAPTERS_ONLY.value):
        flag = "--merge_lora" if _MERGE_LORA.value else "--adapters_only"
        raise cli.UsageError(f"{flag}: {src} is not a LoRA run's workdir (optim.trainable='lora'); drop the flag")
    if spec is not None and not (_MERGE_LORA.value or _ADAPTERS_ONLY.value):
        raise cli.UsageError(f"{src} is a LoRA run: pass --merge_lora to write its model with the adapters merged, "
                             "or --adapters_only to write the adapters alone (.npz)")
    return spec


def _write_adapters(src: str, dst: str, spec) -> None:
    from rwkv_jax.io import workdir
    from rwkv_jax.model import lora
    if Path(dst).suffix != ".npz":
        raise cli.UsageError(f"--adapters_only writes an .npz file: DST {dst} should end in .npz")
    if Path(dst).exists() and not common.OVERWRITE.value:
        raise cli.UsageError(f"{dst} exists: pass --overwrite to replace it")
    loaded = workdir.load(src, keep_adapters=True)
    print(f"writing the adapters of {src} (step {loaded.step}; rank {spec.rank}, alpha {spec.alpha:g}, targets "
          f"{','.join(spec.targets)}) to {dst}", flush=True)
    lora.save_adapters(dst, loaded.model, spec)


def entry_point():
    cli.run(main, shared_flags=(common.OVERWRITE,))


if __name__ == "__main__":
    entry_point()
