"""Device meshes and logical-axis sharding, in the manner of MaxText.

Every parameter carries `logical_axes` metadata (see rwkv_jax/model.py). One rules table maps logical
axes to mesh axes; a dimension whose size does not divide by its mesh axes is replicated instead.

Mesh axes:
  data    plain data parallelism: parameters replicated, batch split.
  fsdp    batch split AND parameters / optimizer state sharded along the model width (ZeRO-3 style).
  tensor  tensor parallelism over the attention, FFN and vocab widths.
"""

import contextlib
import contextvars
import math

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Activations: 'batch', 'seq'; parameters: the names in model.py.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "seq": (),
    "embed": ("fsdp",),
    "embed_out": (),
    "attn": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "heads": ("tensor",),  # RWKV-7's per-head parameters [H, N]
    "head_dim": (),
    "lora": (),  # RWKV-7's low-rank widths: small, replicated
    "layers": (),  # the stacked-layer axis of scan_layers: every device holds its shard of every layer
}


def default_mesh_config() -> ml_collections.ConfigDict:
    """Mesh shape; -1 takes all remaining devices (at most one axis may be -1)."""
    return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})


def mesh_shape(mesh_config, device_count: int) -> tuple[int, ...]:
    shape = [int(mesh_config[a]) for a in MESH_AXES]
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: axis sizes must be positive, or -1 for the rest")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if device_count % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} does not divide {device_count} devices")
        shape[shape.index(-1)] = device_count // known
    if math.prod(shape) != device_count:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} devices but "
                         f"{device_count} are present; set one axis to -1 to take the rest")
    return tuple(shape)


def make_mesh(mesh_config, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    try:  # topology-aware placement where the platform supports it
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def spec_for(logical_axes, shape, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array: each logical axis through RULES, replicated where sizes don't divide."""
    if logical_axes is None:
        return PartitionSpec()
    used, spec = set(), []
    for name, size in zip(logical_axes, shape):
        axes = tuple(a for a in RULES.get(name, ()) if mesh.shape[a] > 1 and a not in used)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for an nnx.State of Variables, from their `logical_axes` metadata."""
    def sharding(variable):
        axes = variable.get_metadata().get("logical_axes")
        return NamedSharding(mesh, spec_for(axes, variable.shape, mesh))
    return jax.tree.map(sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [B, T]: rows split over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(RULES["batch"], None))


def recurrent_state_sharding(mesh: Mesh, abstract_state):
    """Shardings of a model state carried across training steps, each field [n_layer, B, ...]: rows split
    as the batch's are, so each device holds the state of its own rows."""
    return jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec(None, RULES["batch"], *[None] * (x.ndim - 2))),
                        abstract_state)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# --- Activation constraints ----------------------------------------------------------------------

_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("rwkv_jax_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
    """Within this context (around tracing), `constrain` pins activations to the mesh."""
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVE_MESH.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_sharding` context, or None (ops that must run per device,
    such as the Pallas WKV kernel, wrap themselves in shard_map over it)."""
    return _ACTIVE_MESH.get()


def constrain(x, logical_axes):
    """with_sharding_constraint by logical axes when a mesh is active; the identity otherwise."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(logical_axes, x.shape, mesh)))
