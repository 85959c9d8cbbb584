"""Reading and writing model weights in three formats, all through the official tensor names; the
generation (RWKV-4 or RWKV-7) is read from the names, and its Family holds the name table.

  * 'pth':      an official RWKV-LM checkpoint, a torch state dict with names like
                `blocks.0.att.time_decay` (reading or writing it needs torch).
  * 'hf':       a HuggingFace transformers directory (`config.json` + safetensors), loadable by
                `transformers.RwkvForCausalLM.from_pretrained`; names like `rwkv.blocks.0.attention.time_decay`.
  * 'rwkv_jax': our own directory: `rwkv_config.json` + an orbax checkpoint of the parameters.
  * 'workdir':  a training workdir of `train.py` (rwkv_jax.io.workdir): read only; the parameters of its
                latest good checkpoint, restored without the optimizer state.

The hub of every conversion is a dict of numpy arrays under official names and shapes. The model's
dimensions are inferred from the tensors; unknown, missing or mis-shaped tensors raise one
`WeightsMismatchError` that lists them all. Writers build in a temporary sibling and rename at the end,
so a failed write leaves nothing behind.
"""

import contextlib
import dataclasses
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.io import workdir as workdir_lib
from rwkv_jax.model import RWKV, VERSIONS, ModelConfig, family, family_of, with_scan_layers

FORMATS = ("pth", "hf", "rwkv_jax")
CONFIG_FILE = workdir_lib.MODEL_CONFIG  # rwkv_config.json, as in a training workdir
PARAMS_DIR = "params"


class WeightsMismatchError(ValueError):
    """The tensors do not form a model of the inferred generation and shape."""


def infer_config(tensors: dict[str, np.ndarray], **overrides) -> ModelConfig:
    """Model dimensions (and generation) from official-named tensors, by the generation whose names they
    carry; WeightsMismatchError with each generation's reason when none fits."""
    reasons = []
    for version in VERSIONS:
        try:
            dims = family(version).dims_from_tensors(tensors)
        except ValueError as e:
            reasons.append(str(e))
            continue
        return ModelConfig.from_dict({"version": version, **dims, **overrides}, inference=True)
    raise WeightsMismatchError("; ".join(reasons))


def check_tensors(tensors: dict[str, np.ndarray], config: ModelConfig) -> None:
    """Raise one WeightsMismatchError listing every unknown, missing and mis-shaped tensor."""
    layout = family_of(config).weights_layout(config)
    unknown = sorted(set(tensors) - set(layout))
    missing = sorted(set(layout) - set(tensors))
    misshaped = [f"{n}: {tuple(tensors[n].shape)} (expected {shape})"
                 for n, (_, _, shape) in layout.items() if n in tensors and tuple(tensors[n].shape) != shape]
    if unknown or missing or misshaped:
        parts = [f"{label} ({len(items)}): {', '.join(items)}" for label, items in
                 (("unknown", unknown), ("missing", missing), ("mis-shaped", misshaped)) if items]
        raise WeightsMismatchError(
            f"tensors do not match an RWKV-{config.version} model with {config.n_layer} layers, "
            f"d_model={config.d_model}, vocab={config.vocab_size}:\n  " + "\n  ".join(parts))


# --- Model <-> official tensors ------------------------------------------------------------------

def _abstract_model(config: ModelConfig):
    return nnx.split(nnx.eval_shape(lambda: family_of(config).model_class(config, rngs=nnx.Rngs(0))))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def model_from_official(tensors: dict[str, np.ndarray], **overrides) -> RWKV:
    """An RWKV model holding the given official-named tensors (dimensions inferred)."""
    config = infer_config(tensors, **overrides)
    check_tensors(tensors, config)
    if config.scan_layers:  # the tensor layout is per layer: fill a list of blocks, then stack them
        return with_scan_layers(model_from_official(tensors, **{**overrides, "scan_layers": False}), True)
    graphdef, state = _abstract_model(config)
    params = nnx.to_pure_dict(state)
    for name, (path, kind, _) in family_of(config).weights_layout(config).items():
        array = np.asarray(tensors[name], dtype=np.float32)
        if kind == "linear":
            array = array.T
        elif kind == "mix":
            array = array.reshape(-1)
        _set(params, path, jnp.asarray(array, dtype=_get(params, path).dtype))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def model_to_official(model: RWKV) -> dict[str, np.ndarray]:
    """The model's parameters as fp32 numpy arrays under official names and shapes."""
    model = with_scan_layers(model, False)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = {}
    for name, (path, kind, shape) in family_of(model.config).weights_layout(model.config).items():
        array = np.asarray(jax.device_get(_get(params, path)), dtype=np.float32)
        tensors[name] = np.array(array.T if kind == "linear" else array.reshape(shape), order="C")  # writable
    return tensors


# --- HF names --------------------------------------------------------------------------------------

_HF_RENAMES = [  # applied in order to an official name
    ("emb.weight", "rwkv.embeddings.weight"), ("blocks.0.ln0.", "blocks.0.pre_ln."),
    (".att.time_mix_k", ".attention.time_mix_key"), (".att.time_mix_v", ".attention.time_mix_value"),
    (".att.time_mix_r", ".attention.time_mix_receptance"), (".att.", ".attention."),
    (".ffn.time_mix_k", ".feed_forward.time_mix_key"), (".ffn.time_mix_r", ".feed_forward.time_mix_receptance"),
    (".ffn.", ".feed_forward."),
]


def official_to_hf_name(name: str) -> str:
    if name == "head.weight":
        return name
    for old, new in _HF_RENAMES:
        name = name.replace(old, new)
    return name if name.startswith("rwkv.") else "rwkv." + name


def hf_to_official_name(name: str) -> str:
    if name == "head.weight":
        return name
    name = name.removeprefix("rwkv.")
    for old, new in _HF_RENAMES:  # specific renames come first in both directions
        name = name.replace(new.removeprefix("rwkv."), old)
    return name


# --- Files -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _atomic_output(dst: Path, overwrite: bool, is_dir: bool):
    """Yield a temporary path beside `dst`; move it onto `dst` only if the block succeeds. An old `dst`
    is set aside first and removed last, so no crash leaves neither the old nor the new one."""
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; remove it or pass overwrite=True (--overwrite)")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        holder = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    except OSError as e:
        raise type(e)(f"cannot write {dst}: {e.strerror or e} (in {dst.parent})") from e
    target = holder / dst.name
    if is_dir:
        target.mkdir()
    try:
        yield target
        if dst.exists():
            os.replace(dst, holder / "previous")
        os.replace(target, dst)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading or writing official .pth files needs torch: "
                          "pip install torch (the CPU build is enough)") from e
    return torch


def read_pth(path) -> dict[str, np.ndarray]:
    torch = _import_torch()
    try:  # mmap needs the zipfile format (torch >= 1.6); legacy files are read whole
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise WeightsMismatchError(f"{path}: not a flat state dict of tensors (name -> tensor)")
    return {name: t.float().numpy() for name, t in state_dict.items()}


def write_pth(tensors: dict[str, np.ndarray], path, *, overwrite: bool = False) -> None:
    torch = _import_torch()
    with _atomic_output(Path(path), overwrite, is_dir=False) as tmp:
        torch.save({name: torch.from_numpy(np.array(a, dtype=a.dtype, copy=True)) for name, a in tensors.items()}, tmp)


def read_hf_dir(path) -> tuple[dict[str, np.ndarray], dict]:
    """Official-named tensors and the HF config of a transformers RWKV directory."""
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    if hf_config.get("model_type") != "rwkv":
        raise WeightsMismatchError(f"{path}/config.json has model_type={hf_config.get('model_type')!r}, "
                                   "not 'rwkv' (this project reads RWKV-4 models only)")
    files = sorted(path.glob("*.safetensors"))
    tensors = {}
    if files:
        from safetensors.numpy import load_file
        for f in files:
            tensors.update(load_file(f))
    elif (path / "pytorch_model.bin").exists():
        torch = _import_torch()
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        tensors = {n: t.float().numpy() for n, t in sd.items()}
    else:
        raise FileNotFoundError(f"{path} has config.json but no *.safetensors or pytorch_model.bin weights")
    return {hf_to_official_name(n): np.asarray(a, np.float32) for n, a in tensors.items()}, hf_config


def write_hf_dir(tensors: dict[str, np.ndarray], path, *, layer_norm_eps: float = 1e-5,
                 context_length: int = 1024, overwrite: bool = False) -> None:
    """A directory `transformers.RwkvForCausalLM.from_pretrained` loads. `rescale_every` is written as 0:
    HF's fp16 rescaling would change the numerics relative to the official model."""
    from safetensors.numpy import save_file
    config = infer_config(tensors)
    if config.version != 4:
        raise ValueError(f"the HF format holds RWKV-4 models only (transformers' RwkvForCausalLM); this is an "
                         f"RWKV-{config.version} model: write a .pth or an rwkv_jax directory")
    hf_config = {
        "architectures": ["RwkvForCausalLM"], "model_type": "rwkv", "vocab_size": config.vocab_size,
        "context_length": context_length, "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer, "attention_hidden_size": config.att_width,
        "intermediate_size": config.ffn_width, "layer_norm_epsilon": layer_norm_eps,
        "bos_token_id": 0, "eos_token_id": 0, "rescale_every": 0, "tie_word_embeddings": False,
        "use_cache": True, "dtype": "float32",
    }
    with _atomic_output(Path(path), overwrite, is_dir=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        save_file({official_to_hf_name(n): np.ascontiguousarray(a) for n, a in tensors.items()},
                  tmp / "model.safetensors", metadata={"format": "pt"})


def save_model(model: RWKV, path, *, overwrite: bool = False) -> None:
    """Our own format: rwkv_config.json + an orbax checkpoint of the parameters."""
    import orbax.checkpoint as ocp
    config = model.config  # kept as it is: scan_layers says how the model computes when loaded
    model = with_scan_layers(model, False)  # the stored layout is one entry per layer, scanned or not
    with _atomic_output(Path(path), overwrite, is_dir=True) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp.absolute() / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        checkpointer.wait_until_finished()


def _load_own(path: Path, **overrides) -> RWKV:
    import orbax.checkpoint as ocp
    config = ModelConfig.from_dict({**json.loads((path / CONFIG_FILE).read_text()), **overrides}, inference=True)
    graphdef, state = _abstract_model(dataclasses.replace(config, scan_layers=False))
    target = nnx.to_pure_dict(state)
    params = ocp.StandardCheckpointer().restore(path.absolute() / PARAMS_DIR, target)
    nnx.replace_by_pure_dict(state, params)
    return with_scan_layers(nnx.merge(graphdef, state), config.scan_layers)


# --- Entry points ----------------------------------------------------------------------------------

def detect_format(path) -> str:
    """'pth', 'hf', 'rwkv_jax' or 'workdir' (a training workdir, read only) from what is at `path`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_file():
        if path.suffix in (".pth", ".pt"):
            return "pth"
        raise ValueError(f"{path}: a file that is not an official .pth checkpoint; expected a .pth file, "
                         f"an HF directory (config.json) or an rwkv_jax directory ({CONFIG_FILE})")
    if (path / CONFIG_FILE).exists() and (path / PARAMS_DIR).exists():
        return "rwkv_jax"
    if workdir_lib.Workdir.is_workdir(path):
        return "workdir"
    if (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{path} has {CONFIG_FILE} but neither {PARAMS_DIR}/ (an rwkv_jax directory: copy it "
                                f"whole, or write it with `rwkv-convert SRC {path}`) nor checkpoints/ "
                                "(a training workdir)")
    if (path / "config.json").exists():
        return "hf"
    raise ValueError(f"{path}: directory with neither {CONFIG_FILE} (rwkv_jax) nor config.json (HF)")


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A model read from a checkpoint, and what a report says about where it came from."""
    model: RWKV
    format: str               # 'pth', 'hf', 'rwkv_jax' or 'workdir'
    step: int | None = None   # a workdir's checkpoint step


def find_tokenizer(checkpoint, tokenizer_path: str = ""):
    """The tokenizer to use with `checkpoint`: `tokenizer_path` (.json HF tokenizers, .model sentencepiece,
    .txt the RWKV World vocabulary), else the copy in a training workdir or the tokenizer.json of an HF directory."""
    from rwkv_jax.data import tokenizer as tokenizer_lib
    if not tokenizer_path:
        checkpoint = Path(checkpoint)
        found = None
        if checkpoint.is_dir():
            found = workdir_lib.Workdir(checkpoint).tokenizer_path()
            if found is None and (checkpoint / "tokenizer.json").is_file():
                found = checkpoint / "tokenizer.json"
        if found is None:
            raise ValueError(f"no tokenizer found with {checkpoint}: pass --tokenizer=PATH (a sentencepiece "
                             ".model, an HF tokenizers .json such as the GPT-NeoX-20B tokenizer of the official "
                             "Pile models, or the World models' rwkv_vocab_v20230424.txt)")
        tokenizer_path = str(found)
    return tokenizer_lib.load_tokenizer_file(tokenizer_path)


def read_official(path) -> dict[str, np.ndarray]:
    """Official-named fp32 tensors from a checkpoint in any of the formats."""
    fmt = detect_format(path)
    if fmt == "pth":
        return read_pth(path)
    if fmt == "hf":
        return read_hf_dir(path)[0]
    return model_to_official(load(path).model)


def load(path, **config_overrides) -> Loaded:
    """A ready model from an official .pth, an HF RWKV directory, an rwkv_jax directory or a training
    workdir (its latest good checkpoint's parameters, read only), on the default device, with its format,
    checkpoint step and tokenizer file. `config_overrides` set numerics such as dtype='bfloat16' or
    wkv_form='chunked'."""
    fmt = detect_format(path)
    path = Path(path)
    if fmt == "workdir":
        loaded = workdir_lib.load(path, **config_overrides)
        return Loaded(loaded.model, fmt, loaded.step)
    if fmt == "rwkv_jax":
        return Loaded(_load_own(path, **config_overrides), fmt)
    if fmt == "hf":
        tensors, hf_config = read_hf_dir(path)
        config_overrides.setdefault("layer_norm_eps", float(hf_config.get("layer_norm_epsilon", 1e-5)))
        return Loaded(model_from_official(tensors, **config_overrides), fmt)
    return Loaded(model_from_official(read_pth(path), **config_overrides), fmt)


def load_model(path, **config_overrides) -> RWKV:
    """The model alone of `load(path, **config_overrides)`."""
    return load(path, **config_overrides).model


def check_finite(model: RWKV, source) -> None:
    """ValueError naming the tensors (official names) of `model`, read from `source`, that hold a NaN or
    an Inf: a converted copy of a broken model would look like any other."""
    bad = [name for name, array in model_to_official(model).items() if not np.isfinite(array).all()]
    if bad:
        shown = ", ".join(bad[:8]) + (f", ... ({len(bad)} in all)" if len(bad) > 8 else "")
        raise ValueError(f"{source} holds non-finite weights (NaN or Inf) in {len(bad)} tensor(s): {shown}; "
                         "refusing to convert a broken model")


def write_model(model: RWKV, path, fmt: str, *, overwrite: bool = False) -> None:
    """Write `model` to `path` in format `fmt` (one of FORMATS)."""
    if fmt == "rwkv_jax":
        save_model(model, path, overwrite=overwrite)
    elif fmt == "pth":
        write_pth(model_to_official(model), path, overwrite=overwrite)
    elif fmt == "hf":
        write_hf_dir(model_to_official(model), path, layer_norm_eps=model.config.layer_norm_eps,
                     overwrite=overwrite)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
