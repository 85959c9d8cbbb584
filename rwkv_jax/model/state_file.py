"""State files: an RWKV state saved as an .npz, for `generate --save_state/--load_state`, the learned
initial state of a state-tuning run (rwkv_jax/train/state_tuning.py) and `eval.py --initial_state`.

    save_state(path, state, logits=None, model_config=None)
    state, logits = load_state(path, model)   # model: check the file was written for this model's shape

The file holds the five RWKVState fields ([L, B, *] fp32), the next-token logits [B, V] when given (a
generation to continue) and the shape of the model it was written for (`model_shape`: n_layer, d_model,
d_att, d_ffn, vocab_size), so that a file used with another model fails with both shapes named.
The write is atomic: a reader never sees half a file.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.model.rwkv4 import RWKVState

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


def save_state(path, state: RWKVState, logits=None, model_config=None) -> None:
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


def load_state(path, model=None) -> tuple[RWKVState, jax.Array | None]:
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
        missing = [k for k in RWKVState._fields if k not in data]
        if missing:
            raise ValueError(f"{path}: not an RWKV state file (missing {missing}; has {sorted(data.files)})")
        state = RWKVState(*(jnp.asarray(data[k], jnp.float32) for k in RWKVState._fields))
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


def check_state(model, state: RWKVState, batch_size: int | None = None, logits=None) -> None:
    """ValueError unless `state` (and `logits`) have the shapes of `model`'s state for `batch_size` rows."""
    expected = jax.eval_shape(lambda: model.init_state(batch_size or state.att_x.shape[1]))
    got = {k: tuple(v.shape) for k, v in state._asdict().items()}
    want = {k: tuple(v.shape) for k, v in expected._asdict().items()}
    if got != want:
        raise ValueError(f"the state does not fit this model (or batch): shapes {got}, expected {want}")
    if logits is not None and tuple(logits.shape) != (state.att_x.shape[1], model.config.vocab_size):
        raise ValueError(f"the saved logits {tuple(logits.shape)} do not fit this model: a vocabulary of "
                         f"{logits.shape[-1]} where the model has {model.config.vocab_size} (the state was saved "
                         "with another model)")
