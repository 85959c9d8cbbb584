"""State files: an RWKV state saved as an .npz, for `generate --save_state/--load_state`, the learned
initial state of a state-tuning run (rwkv_jax/train/state_tuning.py) and `eval.py --initial_state`.

    save_state(path, state, logits=None, model_config=None)
    state, logits = load_state(path, model)   # model: check the file was written for this model's shape

The file holds the fields of the model's state NamedTuple ([L, B, *] fp32: RWKV-4's five vectors per
layer), the next-token logits [B, V] when given (a generation to continue) and the shape of the model
it was written for (`model_shape`: n_layer, d_model, d_att, d_ffn, vocab_size), so that a file used
with another model fails with both shapes named.
The write is atomic: a reader never sees half a file.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.model.family import VERSIONS, family
from rwkv_jax.model.layers import state_rows

MODEL_SHAPE = "model_shape"


def model_shape(config) -> tuple[int, ...]:
    """(n_layer, d_model, d_att, d_ffn, vocab_size) of a ModelConfig."""
    return (config.n_layer, config.d_model, config.att_width, config.ffn_width, config.vocab_size)


def describe_shape(shape) -> str:
    n_layer, d_model, d_att, d_ffn, vocab = (int(x) for x in shape)
    return f"{n_layer} layers x {d_model} (d_att {d_att}, d_ffn {d_ffn}, vocab {vocab})"


def host_array(x) -> np.ndarray:
    """A host copy of a (possibly multi-host, replicated) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def save_state(path, state, logits=None, model_config=None) -> None:
    """Write `state` (and the next-token logits, and the model's shape, if given) to the .npz `path`."""
    arrays = {k: host_array(v).astype(np.float32) for k, v in state._asdict().items()}
    if logits is not None:
        arrays["logits"] = host_array(logits).astype(np.float32)
    if model_config is not None:
        arrays[MODEL_SHAPE] = np.asarray(model_shape(model_config), np.int64)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:  # a failed write leaves no half file beside `path`
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_state(path, model=None) -> tuple[object, jax.Array | None]:
    """(state, logits or None) of a state file; with `model`, ValueError (one line, both shapes named)
    unless the file was written for a model of this shape."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such state file") from None
    except (ValueError, OSError) as e:  # numpy's message for other bytes speaks of pickles: not helpful
        raise ValueError(f"{path}: not an RWKV state file (an .npz written by a state-tuning run or "
                         "generate.py --save_state)") from e
    if not hasattr(data, "files"):  # np.load gave one array: not an .npz
        raise ValueError(f"{path}: not an RWKV state file (a single array, not an .npz of the state fields)")
    with data:
        state_type = _state_type(path, data.files, model)
        state = state_type(*(jnp.asarray(data[k], jnp.float32) for k in state_type._fields))
        logits = jnp.asarray(data["logits"]) if "logits" in data else None
        shape = tuple(int(x) for x in data[MODEL_SHAPE]) if MODEL_SHAPE in data else None
    if model is not None:
        if shape is not None and shape != model_shape(model.config):
            raise ValueError(f"{path}: the state was written for a model of {describe_shape(shape)}, but this "
                             f"model is {describe_shape(model_shape(model.config))}: use the state file of "
                             "this model")
        try:
            check_state(model, state, logits=logits)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return state, logits


def _state_type(path, names, model) -> type:
    """The state NamedTuple of `model`, or without one of the generation whose fields the file holds;
    ValueError naming what is missing."""
    candidates = [type(jax.eval_shape(lambda: model.init_state(1)))] if model is not None else \
        [family(v).state_type for v in VERSIONS]
    for state_type in candidates:
        if all(k in names for k in state_type._fields):
            return state_type
    missing = [k for k in candidates[0]._fields if k not in names]
    raise ValueError(f"{path}: not an RWKV state file (missing {missing}; has {sorted(names)})")


def check_state(model, state, batch_size: int | None = None, logits=None) -> None:
    """ValueError unless `state` (and `logits`) have the shapes of `model`'s state for `batch_size` rows."""
    expected = jax.eval_shape(lambda: model.init_state(batch_size or state_rows(state)))
    got = {k: tuple(v.shape) for k, v in state._asdict().items()}
    want = {k: tuple(v.shape) for k, v in expected._asdict().items()}
    if got != want:
        raise ValueError(f"the state does not fit this model (or batch): shapes {got}, expected {want}")
    if logits is not None and tuple(logits.shape) != (state_rows(state), model.config.vocab_size):
        raise ValueError(f"the saved logits {tuple(logits.shape)} do not fit this model: a vocabulary of "
                         f"{logits.shape[-1]} where the model has {model.config.vocab_size} (the state was saved "
                         "with another model)")
