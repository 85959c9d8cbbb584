"""The shape and numerics of a model, whatever its generation: `ModelConfig`, and the `config.model`
section of a training config built from it (its defaults are the dataclass's) with its checks."""

import dataclasses

import jax
import ml_collections

PARAM_DTYPES = ("float32", "bfloat16", "float16")  # model.param_dtype
REMAT_POLICIES = ("nothing", "dots")                # model.remat_policy
COMPUTE_DTYPES = (*PARAM_DTYPES, "auto")            # model.dtype


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a model. `version` names its RWKV generation (rwkv_jax.model.family); for
    RWKV-4 `d_att`/`d_ffn` default to D and 4D as in the paper."""
    version: int = 4
    vocab_size: int = 50277
    d_model: int = 768
    n_layer: int = 12
    d_att: int | None = None
    d_ffn: int | None = None
    head_size: int = 64           # RWKV-7: the width of a head (its WKV state is [head_size, head_size])
    d_decay_lora: int | None = None  # RWKV-7's LoRA widths (decay, in-context learning rate, value
    d_aaa_lora: int | None = None    # residual, gate); None: the official sizing rule for d_model
    d_mv_lora: int | None = None
    d_gate_lora: int | None = None
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"        # compute dtype: 'float32', 'bfloat16', or 'auto' (bf16 on GPU/TPU, fp32 on CPU)
    param_dtype: str = "float32"  # master weights
    wkv_form: str = "auto"        # 'sequential' | 'parallel' | 'chunked' | 'auto' (per backend)
    wkv_chunk_len: int = 32
    emb_init_scale: float = 1e-4
    remat: bool = False           # recompute each block in the backward pass: activation memory O(1 block)
    remat_policy: str = "nothing"  # with remat, what the forward keeps: 'nothing' (the block's input only)
                                   # or 'dots' (also the projections' outputs: no matmul recomputed)
    scan_layers: bool | str = False  # blocks' parameters stacked on a leading layer axis and applied by
                                     # lax.scan: compile time independent of depth. 'auto' (the paper
                                     # configs): stacked on GPU/TPU, a list on CPU (see `resolve_scan_layers`)

    @property
    def att_width(self) -> int:
        return self.d_att or self.d_model

    @property
    def ffn_width(self) -> int:
        return self.d_ffn or 4 * self.d_model

    @classmethod
    def from_dict(cls, values, platform: str | None = None, *, inference: bool = False) -> "ModelConfig":
        """Build from a dict/ConfigDict, naming any unknown key, with every 'auto' resolved for `platform`
        ('cpu', 'gpu', 'tpu'; None: the default backend's, which starts it: not before jax.distributed).
        The one place where 'auto' choices are made: dtype (fp32 on CPU, bf16 elsewhere), scan_layers
        (`resolve_scan_layers`) and wkv_form (the generation's fastest form on the platform; `inference`:
        its fastest without gradients, for a model loaded to evaluate or generate)."""
        values = dict(values)
        cls.check_keys(values)
        values.setdefault("wkv_form", "auto")
        target = lambda: platform or jax.default_backend()  # asked only for an 'auto'
        if values.get("dtype") == "auto":
            values["dtype"] = "float32" if target() == "cpu" else "bfloat16"
        if "scan_layers" in values:
            values["scan_layers"] = resolve_scan_layers(values["scan_layers"], platform)
        if values["wkv_form"] == "auto":
            from rwkv_jax.model.family import family  # the generation's own forms
            values["wkv_form"] = family(values.get("version", 4)).default_wkv_form(target(), inference)
        return cls(**values)

    @classmethod
    def check_keys(cls, values) -> None:
        """ValueError naming any key of `values` that is not a field (nothing resolved, no backend started)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys are {sorted(known)}")


def resolve_scan_layers(value, platform: str | None = None) -> bool:
    """`scan_layers` as a bool for a program compiled for `platform` ('cpu', 'gpu', 'tpu'; default: the
    default backend's, asked only for 'auto'); True/False also as the strings the command line gives.
    'auto' stacks the layers on GPU and TPU (compile time independent of depth) and keeps them a list on
    CPU: XLA:CPU unrolls the scan anyway (`RWKV._scan_blocks`) but still copies every layer's weights out
    of the stack and its gradients back in, a tenth of the 169M step at B=1 T=128."""
    if isinstance(value, str):
        value = {"true": True, "false": False, "auto": "auto"}.get(value.strip().lower(), value)
    if value == "auto":
        return (platform or jax.default_backend()) != "cpu"
    if not isinstance(value, bool):
        raise ValueError(f"model.scan_layers must be one of True, False, 'auto', got {value!r}")
    return value


def default_section(**overrides) -> ml_collections.ConfigDict:
    """The `config.model` section: every ModelConfig field, defaults overridden by `overrides`. A field
    whose default is None (d_att, d_ffn) is an int placeholder, so `--config.model.d_att=64` can set it."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    ModelConfig.check_keys(overrides)  # fail fast on an unknown key (no backend started)
    values = {}
    for name, field in fields.items():
        value = overrides.get(name, field.default)
        values[name] = ml_collections.config_dict.placeholder(int) if value is None else value
    return ml_collections.ConfigDict(values)


def check_section(checks) -> None:
    """Add the problems of `checks.config.model` to `checks` (rwkv_jax.train.config_checks.Checks)."""
    from rwkv_jax.model.family import VERSIONS, family  # the generations' own WKV forms
    m = checks.config.model
    checks.one_of("model", "version", VERSIONS)
    for field in ("vocab_size", "d_model", "n_layer", "wkv_chunk_len"):
        checks.at_least("model", field, 1)
    checks.at_least("model", "head_size", 1)
    checks.need(m.version != 7 or not isinstance(m.head_size, int) or m.head_size < 1 or m.d_model % m.head_size == 0,
                f"model.d_model={m.d_model} is not a multiple of model.head_size={m.head_size} (RWKV-7's heads)")
    for field in ("d_att", "d_ffn", "d_decay_lora", "d_aaa_lora", "d_mv_lora", "d_gate_lora"):
        checks.need(m[field] is None or (isinstance(m[field], int) and m[field] >= 1),
                    f"model.{field} must be None or >= 1, got {m[field]!r}")
    checks.positive("model", "layer_norm_eps")
    checks.one_of("model", "dtype", COMPUTE_DTYPES)
    checks.one_of("model", "param_dtype", PARAM_DTYPES)
    checks.one_of("model", "remat_policy", REMAT_POLICIES)
    if m.version in VERSIONS:
        checks.one_of("model", "wkv_form", (*family(m.version).wkv_forms, "auto"))
    try:
        resolve_scan_layers(m.scan_layers, "cpu")
    except ValueError as e:
        checks.need(False, str(e))

