"""A training run's directory (`train.py --workdir=DIR`): the one place that knows its layout.

    DIR/config.json          the run's whole config (model, optim, train, data, mesh, checkpoint)
    DIR/rwkv_config.json     the model's ModelConfig alone (what a reader needs to rebuild the model)
    DIR/tokenizer.model      the run's tokenizer, copied (tokenizer.json for an HF tokenizers file)
    DIR/checkpoints/<step>/  orbax checkpoints: items params, opt_state, meta (rwkv_jax.io.checkpoint)
    DIR/metrics.jsonl        one JSON record per logged train step and per evaluation (a resume drops the
                             rows past its step: each step is there once)
    DIR/tensorboard/         the same metrics as TensorBoard events
    DIR/loss.png             the loss curves, drawn at the end of a run
    DIR/train.log            everything logged (third-party INFO included), the console shows less
    DIR/eval/                eval.py's reports (default place)
    DIR/state.npz            state tuning (optim.trainable='state'): the learned initial state, written at
                             every checkpoint and at the end (rwkv_jax/model/state_file.py; generate --load_state,
                             eval.py --initial_state)

The trainer writes it; readers (eval, generate, convert, `load_model`) only read it: `load_model`
restores the parameters of the latest good checkpoint without the optimizer state, opening the
checkpoints read-only (a run may be training in it at the same time); a LoRA run's adapters are merged
into its base on load.
"""

import dataclasses
import json
import os
from pathlib import Path

import ml_collections

CONFIG = "config.json"
MODEL_CONFIG = "rwkv_config.json"
TOKENIZER_STEM = "tokenizer"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
LOSS_PLOT = "loss.png"
LOG = "train.log"
LOCK = "train.lock"  # held by the one trainer of the workdir (rwkv_jax/io/workdir_lock.py)
EVAL = "eval"
STATE = "state.npz"


class Workdir:
    """Paths and contents of one run directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()

    def __repr__(self):
        return f"Workdir({str(self.path)!r})"

    config_path = property(lambda self: self.path / CONFIG)
    model_config_path = property(lambda self: self.path / MODEL_CONFIG)
    checkpoints_dir = property(lambda self: self.path / CHECKPOINTS)
    metrics_path = property(lambda self: self.path / METRICS)
    tensorboard_dir = property(lambda self: self.path / TENSORBOARD)
    loss_plot_path = property(lambda self: self.path / LOSS_PLOT)
    log_path = property(lambda self: self.path / LOG)
    eval_dir = property(lambda self: self.path / EVAL)
    state_path = property(lambda self: self.path / STATE)

    @staticmethod
    def is_workdir(path) -> bool:
        """A directory holding checkpoints/ and the run's config (rwkv_config.json or config.json)."""
        path = Path(path)
        return (path / CHECKPOINTS).is_dir() and ((path / MODEL_CONFIG).is_file() or (path / CONFIG).is_file())

    # --- What the trainer writes ------------------------------------------------------------------

    def tokenizer_copy_path(self, source) -> Path:
        """Where the run keeps its copy of the tokenizer file `source` (same suffix)."""
        return self.path / (TOKENIZER_STEM + Path(source).suffix)

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        """config.json: the run's whole config."""
        self.config_path.write_text(config.to_json_best_effort(indent=2))

    def write_model_config(self, model_config) -> None:
        """rwkv_config.json, so that readers rebuild the model from this directory alone."""
        self.model_config_path.write_text(json.dumps(dataclasses.asdict(model_config), indent=2))

    # --- What readers ask -------------------------------------------------------------------------

    def run_config(self) -> ml_collections.ConfigDict | None:
        """The run's config.json, or None when there is none."""
        if not self.config_path.is_file():
            return None
        return ml_collections.ConfigDict(json.loads(self.config_path.read_text()))

    def data_config(self) -> ml_collections.ConfigDict | None:
        """The run's `data` section (where its dataset, split and tokenizer came from), or None."""
        config = self.run_config()
        return None if config is None else config.data

    def model_config(self, **overrides):
        """The run's ModelConfig, from rwkv_config.json (or config.json's model section, as older runs
        wrote it); `overrides` change numerics such as dtype or wkv_form."""
        from rwkv_jax.model import ModelConfig
        if self.model_config_path.is_file():
            values = json.loads(self.model_config_path.read_text())
        elif (config := self.run_config()) is not None:
            values = config.model.to_dict()
        else:
            raise FileNotFoundError(f"{self.path}: no {MODEL_CONFIG} or {CONFIG}: not a training workdir")
        return ModelConfig.from_dict({**values, **overrides}, inference=True)

    def lora_spec(self):
        """The LoraSpec (rwkv_jax.model.lora) of a LoRA run (its config.json's optim.trainable='lora'), else None."""
        config = self.run_config()
        o = None if config is None else config.get("optim")
        if o is None or o.get("trainable", "all") != "lora":
            return None
        from rwkv_jax.model import lora
        return lora.LoraSpec(int(o.lora_rank), float(o.lora_alpha), lora.parse_targets(o.lora_targets))

    def tokenizer_path(self) -> Path | None:
        """The run's copy of its tokenizer, or None."""
        found = [self.path / f"{TOKENIZER_STEM}{suffix}" for suffix in (".model", ".json", ".txt")
                 if (self.path / f"{TOKENIZER_STEM}{suffix}").is_file()]
        return found[0] if found else None

    def steps(self) -> list[int]:
        """The committed checkpoint steps, oldest first (an in-flight save is not one)."""
        from rwkv_jax.io.checkpoint import Checkpointer
        if not self.checkpoints_dir.is_dir():
            return []
        with Checkpointer(self.checkpoints_dir, read_only=True) as reader:
            return reader.steps

    def writable(self) -> bool:
        """Whether a report may be written under this directory."""
        probe = self.eval_dir if self.eval_dir.is_dir() else self.path
        return os.access(probe, os.W_OK | os.X_OK)


@dataclasses.dataclass(frozen=True)
class LoadedParams:
    """The parameters of a workdir's latest good checkpoint, as a model."""
    model: object  # the generation's model class (rwkv_jax.model.family)
    step: int


def load(path, keep_adapters: bool = False, **overrides) -> LoadedParams:
    """The model of the latest good checkpoint of the workdir at `path`, on the default device. Only the
    parameters are read (no optimizer state, no optimizer), and nothing in the workdir is changed: a
    corrupt newest checkpoint is skipped, not renamed, and a running trainer's in-flight save is left
    alone. `overrides` set numerics (dtype, wkv_form, ...): the same parameters in another module.

    A LoRA run's model (optim.trainable='lora') comes with its adapters merged into the base's kernels
    (rwkv_jax.model.lora.merged: W + A B alpha / rank in fp32), a plain model; `keep_adapters=True` gives
    the adapted model itself as the run stored it (no overrides then)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rwkv_jax.io.checkpoint import Checkpointer
    from rwkv_jax.model import family_of, lora, with_scan_layers
    workdir = Workdir(path)
    config = workdir.model_config(**overrides)
    # The checkpoint holds the parameters as the run created them (param_dtype, its numerics).
    saved_config = workdir.model_config()
    # The trainer's state holds the model's whole nnx state under `params` (rwkv_jax.train.train_step).
    def abstract(c):  # the model of ModelConfig `c`, its generation's class, nothing allocated
        return nnx.eval_shape(lambda: family_of(c).model_class(c, rngs=nnx.Rngs(0)))

    spec = workdir.lora_spec()
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: lora.build(saved_config, spec)))
    with Checkpointer(workdir.checkpoints_dir, read_only=True) as reader:
        restored = reader.restore_params(abstract_params)
    if restored is None:
        raise FileNotFoundError(f"{workdir.path}: no checkpoint in {workdir.checkpoints_dir} yet (the run saves "
                                "every checkpoint.every_steps steps and at its end)")
    params, _, step = restored
    model = nnx.merge(graphdef, params)
    if spec is not None and not keep_adapters:  # a LoRA run: its adapters merged into the base's kernels
        model = lora.merged(model)
    if keep_adapters:
        return LoadedParams(model, step)
    model = with_scan_layers(model, config.scan_layers)
    if config != saved_config:  # other numerics (dtype, WKV form): the same parameters in a new module
        new_graphdef, new_state = nnx.split(abstract(config))
        values = jax.tree.map(lambda like, x: jnp.asarray(x, like.dtype), nnx.to_pure_dict(new_state),
                              nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        nnx.replace_by_pure_dict(new_state, values)
        model = nnx.merge(new_graphdef, new_state)
    return LoadedParams(model, step)
