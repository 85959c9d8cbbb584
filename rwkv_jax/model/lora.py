"""LoRA adapters on a model's block projections, built on Flax NNX's own LoRA (`nnx.LoRALinear`,
`nnx.LoRAParam`), for every generation and for layers as a list or stacked (scan_layers).

A targeted projection y = x W (W [in, out], frozen) becomes

    y = x W + ((x A) B) * alpha / rank        A [in, rank] (he-uniform), B [rank, out] (zeros)

so an adapted model starts equal to its base (B = 0). A and B are `nnx.LoRAParam`s (a subclass of
nnx.Param): `nnx.state(model, nnx.LoRAParam)` is the adapters, everything else the frozen base. A carries
the logical axes (in-axis of W, 'lora'), B ('lora', out-axis of W), so on a mesh each adapter is split as
its base matrix is along the model width ('lora' is replicated); stacked layers add the leading 'layers'.

`LoRALinear` is nnx.LoRALinear with the alpha / rank scale, which NNX's class lacks; it keeps nnx.Linear's
state layout (the base `kernel` where it was, the adapters under `lora`), so the official weight table and
checkpoints of the base keep their paths. `merged(model)` folds the adapters into the kernels
(W + A B alpha / rank in fp32): a plain model of the same config, what eval, generate and convert use.

    spec = LoraSpec(rank=16, alpha=32.0, targets=DEFAULT_TARGETS)
    model = add_lora(model, spec, rngs)       # in place; the base weights are kept as they are
    plain = merged(model)
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkv_jax.model.model_config import ModelConfig

# The projections of a block that can carry adapters, per generation ("sublayer.projection"). RWKV-7's own
# low-rank matrices (w1/w2, a1/a2, v1/v2, g1/g2) are ordinary weights here: frozen in a LoRA run.
TARGETS = {4: ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.receptance", "ffn.value"),
           7: ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")}
# The default: the time mix's r/k/v/output and the channel mix's key/value.
DEFAULT_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
ADAPTERS_FORMAT = 1  # the adapters-only .npz layout (`save_adapters`)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


def parse_targets(text) -> tuple[str, ...]:
    """'att.key,ffn.value' (or a sequence) -> ('att.key', 'ffn.value'), order kept, blanks dropped."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(dict.fromkeys(t.strip() for t in items if t.strip()))


def target_problem(version: int, targets) -> str | None:
    """None, or one line naming the unknown targets and the valid ones of generation `version`."""
    valid = TARGETS.get(version)
    if valid is None:
        return f"LoRA has no targets for model.version={version!r}"
    unknown = [t for t in targets if t not in valid]
    if unknown or not targets:
        return (f"optim.lora_targets: unknown {unknown} for RWKV-{version}; valid: {','.join(valid)}" if unknown
                else f"optim.lora_targets is empty; valid: {','.join(valid)}")
    return None


class LoRALinear(nnx.LoRALinear):
    """nnx.LoRALinear whose adapter product is scaled: y = x W + ((x A) B) * lora_scale. Built around an
    existing nnx.Linear (`from_linear`), whose kernel Variable it keeps."""

    def __call__(self, x, out_sharding=None):
        y = nnx.Linear.__call__(self, x, out_sharding=out_sharding)
        return y + (self.lora(x) * self.lora_scale).astype(y.dtype)

    @classmethod
    def from_linear(cls, base: nnx.Linear, spec: LoraSpec, a_keys: list) -> "LoRALinear":
        """`base` with adapters of `spec.rank`: its kernel (and its settings) kept, A and B fp32 with
        logical axes from the kernel's; a kernel stacked over layers ([L, in, out]) gets stacked adapters,
        A of layer i drawn with `a_keys[i]` (one key for a plain kernel)."""
        kernel = base.kernel
        axes = kernel.get_metadata().get("logical_axes") or (None,) * kernel.ndim
        lead, (in_axis, out_axis) = tuple(axes[:-2]), tuple(axes[-2:])
        stacked = kernel.shape[:-2]
        placeholder = lambda key, shape, dtype: jnp.zeros((), dtype)  # noqa: E731 - replaced below
        new = cls(base.in_features, base.out_features, lora_rank=spec.rank, use_bias=False, dtype=base.dtype,
                  param_dtype=base.param_dtype, precision=base.precision, dot_general=base.dot_general,
                  kernel_init=placeholder, lora_dtype=base.dtype, lora_param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                  a_initializer=placeholder, b_initializer=placeholder)
        new.kernel = kernel
        # nnx's default initialisers (A he-uniform, B zeros), layer by layer
        a_init = nnx.initializers.he_uniform()
        a = jnp.stack([a_init(key, (base.in_features, spec.rank), jnp.float32) for key in a_keys])
        new.lora.lora_a = nnx.LoRAParam(a.reshape(*stacked, base.in_features, spec.rank),
                                        logical_axes=(*lead, in_axis, "lora"))
        new.lora.lora_b = nnx.LoRAParam(jnp.zeros((*stacked, spec.rank, base.out_features), jnp.float32),
                                        logical_axes=(*lead, "lora", out_axis))
        new.lora_scale = spec.scale
        return new


def _blocks(model) -> list:
    """The model's Block modules: one (stacked) or n_layer (a list)."""
    return [model.blocks] if model.config.scan_layers else list(model.blocks)


def add_lora(model, spec: LoraSpec, rngs: nnx.Rngs):
    """`model` with every target projection of every block a LoRALinear (in place; returned too)."""
    problem = target_problem(model.config.version, spec.targets)
    if problem:
        raise ValueError(problem)
    if spec.rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {spec.rank}")
    # A's keys layer by layer, target by target, whether the layers are a list or stacked: the same
    # adapters either way
    keys = [[rngs.params() for _ in spec.targets] for _ in range(model.config.n_layer)]
    blocks = _blocks(model)
    for b, block in enumerate(blocks):
        for t, target in enumerate(spec.targets):
            sub_name, proj = target.split(".")
            sub = getattr(block, sub_name)
            a_keys = [layer[t] for layer in keys] if model.config.scan_layers else [keys[b][t]]
            setattr(sub, proj, LoRALinear.from_linear(getattr(sub, proj), spec, a_keys))
    return model


def build(config: ModelConfig, spec: LoraSpec | None, seed: int = 0):
    """The model of `config` (its generation's class) with adapters of `spec` (none when None); under
    nnx.eval_shape or jit nothing of the unused parts is computed."""
    from rwkv_jax.model.family import family_of
    rngs = nnx.Rngs(seed)
    model = family_of(config).model_class(config, rngs=rngs)
    return model if spec is None else add_lora(model, spec, rngs)


def is_lora_path(path) -> bool:
    """Whether a state path (of keys or names) is an adapter's."""
    return any(getattr(k, "key", k) in ("lora_a", "lora_b") for k in path)


def merged(model):
    """The plain model (no adapters) whose target kernels are W + (A B) * alpha / rank, computed in fp32 at
    HIGHEST precision and stored in W's dtype; every other weight as it is. A model without adapters comes
    back as it is."""
    lora_state = nnx.state(model, nnx.LoRAParam)
    if not jax.tree.leaves(lora_state):
        return model
    plain_graphdef, plain_state = nnx.split(nnx.eval_shape(lambda: build(model.config, None)))
    values = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # base and adapters
    kernels = {}

    def visit(path, _):
        names = tuple(getattr(k, "key", k) for k in path)
        if names[-1] == "lora_a":
            kernels[names[:-2]] = names
        return None

    jax.tree_util.tree_map_with_path(visit, values)
    scales = {path: module.lora_scale for path, module in nnx.iter_graph(model) if isinstance(module, LoRALinear)}
    for owner in kernels:
        node = values
        for name in owner:
            node = node[name]
        kernel, adapters = node["kernel"], node.pop("lora")
        delta = jnp.matmul(jnp.asarray(adapters["lora_a"], jnp.float32), jnp.asarray(adapters["lora_b"], jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        node["kernel"] = (jnp.asarray(kernel, jnp.float32) + delta * scales[owner]).astype(kernel.dtype)
    nnx.replace_by_pure_dict(plain_state, values)
    return nnx.merge(plain_graphdef, plain_state)


# --- Adapters alone in a file (`rwkv-convert WORKDIR out.npz --adapters_only`, `optim.lora_init`) -----

def _flat_names(tree) -> dict[str, np.ndarray]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[".".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(leaf)
    return flat


def adapters_of(model) -> dict[str, np.ndarray]:
    """The adapters as {'blocks.<i>.att.key.lora.lora_a': fp32 array}, one entry per layer (stacked
    layers are split)."""
    from rwkv_jax.model.layers import unstack_layers
    values = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    if model.config.scan_layers:
        values["blocks"] = {i: nnx.to_pure_dict(layer) for i, layer in enumerate(
            unstack_layers(nnx.state(model.blocks, nnx.LoRAParam), model.config.n_layer))}
    return _flat_names(values)


def save_adapters(path, model, spec: LoraSpec) -> None:
    """An .npz of the adapters and a JSON header (format, rank, alpha, targets, the base model's shape)."""
    from rwkv_jax.model.state_file import model_shape
    header = {"format": ADAPTERS_FORMAT, "rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets),
              "model": list(model_shape(model.config))}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, __header__=np.array(json.dumps(header)), **adapters_of(model))
    tmp.replace(path)


def load_adapters(path, config: ModelConfig, spec: LoraSpec) -> dict[str, np.ndarray]:
    """The adapters of an .npz written by `save_adapters`, checked against `config` and `spec`
    (ValueError naming what differs and the fix)."""
    from rwkv_jax.model.state_file import describe_shape, model_shape
    path = Path(path)
    try:
        with np.load(path) as f:
            header = json.loads(str(f["__header__"]))
            arrays = {k: f[k] for k in f.files if k != "__header__"}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"optim.lora_init={path}: not an adapters file of `rwkv-convert WORKDIR OUT.npz "
                         f"--adapters_only` ({type(e).__name__}: {e})") from e
    have = (header.get("rank"), float(header.get("alpha", 0)), tuple(header.get("targets", ())))
    want = (spec.rank, float(spec.alpha), tuple(spec.targets))
    if have != want:
        raise ValueError(f"optim.lora_init={path} holds adapters of rank {have[0]}, alpha {have[1]}, targets "
                         f"{','.join(have[2])}; this run asks for rank {want[0]}, alpha {want[1]}, targets "
                         f"{','.join(want[2])}: set optim.lora_rank, lora_alpha and lora_targets to the file's")
    if tuple(header.get("model", ())) != tuple(model_shape(config)):
        raise ValueError(f"optim.lora_init={path} adapts a model of {describe_shape(tuple(header['model']))}, "
                         f"config.model is {describe_shape(model_shape(config))}")
    return arrays


def adapters_state(arrays: dict[str, np.ndarray], abstract_adapters, scan_layers: bool):
    """The nnx.State of adapters (the layout of `abstract_adapters`) holding `arrays` (`load_adapters`)."""
    state = jax.tree.map(lambda x: x, abstract_adapters)
    if scan_layers:
        n_layer = max(int(name.split(".")[1]) for name in arrays) + 1
        per_layer = [{} for _ in range(n_layer)]
        for name, array in arrays.items():
            _, i, *rest = name.split(".")
            node = per_layer[int(i)]
            for key in rest[:-1]:
                node = node.setdefault(key, {})
            node[rest[-1]] = array
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
        values = {"blocks": stacked}
    else:
        values = {}
        for name, array in arrays.items():
            node = values
            keys = [int(k) if k.isdigit() else k for k in name.split(".")]
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = array
    like = nnx.to_pure_dict(state)
    if jax.tree.structure(like) != jax.tree.structure(values):
        raise ValueError(f"the adapters file's entries do not fit this model's adapters ({len(arrays)} arrays, "
                         f"expected {len(jax.tree.leaves(like))})")
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a, x: jnp.asarray(x, a.dtype), like, values))
    return state
