"""Sharding (`rwkv_jax.train.sharding`, `rwkv_jax.train.train_step`) on simulated CPU devices.

  * `mesh_shape`: the -1 fill and errors that name the problem; `spec_for`: logical axes -> mesh axes,
    with replication where a dimension does not divide (unit tests, in-process, on abstract meshes).
  * End to end, in subprocesses (the device count is fixed by XLA_FLAGS before jax is imported):
    meshes (data, fsdp, tensor) = (8,1,1), (2,4,1), (2,2,2) on 8 devices and one plain 1-device
    process train the same model on the same batches for 3 steps with the same losses (1e-5 relative);
    the train state is created already sharded (each parameter's sharding is the expected
    NamedSharding, its shard on device 0 has the shape the rules give, no stray full copy is left on the
    device); device 0 holds exactly the bytes the rules give (fsdp=4: the fsdp-sharded parameters / 4);
    and the Adam moments are sharded exactly like their parameters; streamed training's carried state is
    split over the batch axes like the batch and trains to the same losses.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from rwkv_jax.train import sharding

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "scripts" / "sharding_probe.py"
# Opt level 0 only shortens XLA:CPU compiles (each run compiles one init and one step); every
# configuration compared runs under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"

D, V, L = 64, 256, 2
SPEC = {
    "steps": 3, "batch_size": 8, "seq_len": 32, "seed": 0,
    "model": {"vocab_size": V, "d_model": D, "n_layer": L},
    # A large learning rate and no warmup, so that the 3 steps move the loss visibly.
    "optim": {"lr_init": 1e-2, "lr_final": 1e-3, "warmup_steps": 0},
}
MESHES_8 = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
AXES = ("data", "fsdp", "tensor")

# The layout the model declares (logical axes per parameter), written out independently of
# rwkv_jax so that a change of it shows up here; and what each logical axis is sharded over.
EXPECTED_LOGICAL_AXES = {
    "emb.embedding": ("vocab", "embed"), "head.kernel": ("embed", "vocab"),
    "ln0.scale": ("embed",), "ln0.bias": ("embed",), "ln_out.scale": ("embed",), "ln_out.bias": ("embed",),
    **{f"blocks.{i}.{name}": axes for i in range(L) for name, axes in {
        "ln1.scale": ("embed",), "ln1.bias": ("embed",), "ln2.scale": ("embed",), "ln2.bias": ("embed",),
        "att.time_decay": ("attn",), "att.time_first": ("attn",),
        "att.time_mix_k": ("embed",), "att.time_mix_v": ("embed",), "att.time_mix_r": ("embed",),
        "att.key.kernel": ("embed", "attn"), "att.value.kernel": ("embed", "attn"),
        "att.receptance.kernel": ("embed", "attn"), "att.output.kernel": ("attn", "embed"),
        "ffn.time_mix_k": ("embed",), "ffn.time_mix_r": ("embed",),
        "ffn.key.kernel": ("embed", "mlp"), "ffn.receptance.kernel": ("embed", "embed_out"),
        "ffn.value.kernel": ("mlp", "embed"),
    }.items()},
}
MESH_AXIS_OF = {"embed": "fsdp", "attn": "tensor", "mlp": "tensor", "vocab": "tensor", "embed_out": None}


def dotted(path: str) -> str:
    """"['blocks'][0]['att']['key']['kernel']" -> 'blocks.0.att.key.kernel'."""
    return ".".join(part.strip("'\"") for part in path.strip("[]").split("]["))


def expected_shard_shape(shape, logical_axes, mesh: dict) -> list[int]:
    out = []
    for size, name in zip(shape, logical_axes):
        axis = MESH_AXIS_OF[name]
        n = mesh[axis] if axis else 1
        out.append(size // n if size % n == 0 else size)
    return out


# --- mesh_shape ----------------------------------------------------------------------------------

def cfg(data, fsdp, tensor):
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


@pytest.mark.parametrize("axes, devices, expected", [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((-1, 4, 1), 8, (2, 4, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((1, 1, -1), 4, (1, 1, 4)),
    ((2, 4, 1), 8, (2, 4, 1)),
    ((-1, 1, 1), 1, (1, 1, 1)),
])
def test_mesh_shape_fills_minus_one(axes, devices, expected):
    assert sharding.mesh_shape(cfg(*axes), devices) == expected


@pytest.mark.parametrize("axes, devices, message", [
    ((-1, -1, 1), 8, "at most one axis may be -1"),
    ((-1, 3, 1), 8, "does not divide 8 devices"),
    ((-1, 16, 1), 8, "does not divide 8 devices"),
    ((2, 2, 1), 8, "uses 4 devices but 8 are present"),
    ((4, 4, 1), 8, "uses 16 devices but 8 are present"),
])
def test_mesh_shape_errors_name_the_problem(axes, devices, message):
    with pytest.raises(ValueError, match=message) as e:
        sharding.mesh_shape(cfg(*axes), devices)
    assert "'data'" in str(e.value)  # the offending mesh is spelled out by axis name


def test_mesh_shape_zero_axis_is_a_value_error():
    with pytest.raises(ValueError, match="fsdp"):
        sharding.mesh_shape(cfg(-1, 0, 1), 8)


def test_make_mesh_on_given_devices():
    mesh = sharding.make_mesh(cfg(-1, 1, 1), devices=jax.devices()[:1])
    assert mesh.axis_names == AXES and dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


# --- spec_for ------------------------------------------------------------------------------------

def amesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), AXES)


@pytest.mark.parametrize("axes, shape, mesh, expected", [
    # Parameters: embed over fsdp, attn / mlp / vocab over tensor, embed_out never.
    (("embed", "attn"), (64, 64), (1, 4, 2), P("fsdp", "tensor")),
    (("attn", "embed"), (64, 64), (1, 4, 2), P("tensor", "fsdp")),
    (("embed", "mlp"), (64, 256), (2, 2, 2), P("fsdp", "tensor")),
    (("embed", "embed_out"), (64, 64), (1, 4, 1), P("fsdp", None)),
    (("embed",), (64,), (8, 1, 1), P(None)),                      # size-1 mesh axes are left out
    (("embed", "attn"), (64, 64), (8, 1, 1), P(None, None)),
    # A dimension that does not divide is replicated; the other dimensions keep their sharding.
    (("vocab", "embed"), (50277, 768), (1, 4, 2), P(None, "fsdp")),
    (("embed", "vocab"), (768, 50277), (1, 4, 2), P("fsdp", None)),
    (("embed",), (6,), (1, 4, 1), P(None)),
    (("attn",), (6,), (1, 1, 4), P(None)),
    # A mesh axis is used at most once per array.
    (("embed", "embed"), (64, 64), (1, 4, 1), P("fsdp", None)),
    # Activations: batch over data x fsdp (one axis name when only one is > 1), seq never.
    (("batch", "seq"), (8, 32), (2, 4, 1), P(("data", "fsdp"), None)),
    (("batch", "seq"), (8, 32), (2, 1, 1), P("data", None)),
    (("batch", "seq"), (8, 32), (1, 4, 2), P("fsdp", None)),
    (("batch", "seq", "embed_out"), (8, 32, 64), (2, 2, 2), P(("data", "fsdp"), None, None)),
    # batch 4 does not divide data x fsdp = 8: replicated as a whole, not split over one of the two.
    (("batch", "seq"), (4, 32), (2, 4, 1), P(None, None)),
    # Unknown logical names and arrays without logical axes are replicated.
    (("nonsense",), (64,), (1, 4, 2), P(None)),
    (None, (64, 64), (1, 4, 2), P()),
])
def test_spec_for(axes, shape, mesh, expected):
    assert sharding.spec_for(axes, shape, amesh(*mesh)) == expected


def test_batch_sharding_and_constrain_without_mesh():
    mesh = sharding.make_mesh(cfg(-1, 1, 1), devices=jax.devices()[:1])
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
    assert sharding.replicated(mesh).spec == P()
    x = jnp.ones((2, 3))
    assert sharding.constrain(x, ("batch", "seq")) is x  # identity outside activation_sharding

    @jax.jit
    def f(x):
        with sharding.activation_sharding(mesh):
            return sharding.constrain(x * 2, ("batch", "seq"))

    np.testing.assert_array_equal(f(x), 2 * np.ones((2, 3)))


# --- End to end on 8 simulated devices -----------------------------------------------------------

def _start_probe(tmp_path: Path, name: str, meshes, device_count: int):
    spec_path, out_path = tmp_path / f"{name}.spec.json", tmp_path / f"{name}.out.json"
    spec_path.write_text(json.dumps({**SPEC, "meshes": meshes}))
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f] + [FAST_COMPILE]
    if device_count > 1:
        flags.append(f"--xla_force_host_platform_device_count={device_count}")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, str(PROBE), str(spec_path), str(out_path)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, out_path, log


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """{mesh tuple: result} for the three 8-device meshes and a plain 1-device process, run concurrently."""
    tmp = tmp_path_factory.mktemp("sharding")
    started = [_start_probe(tmp, "eight", MESHES_8, 8), _start_probe(tmp, "one", [(1, 1, 1)], 1)]
    try:
        for proc, _, log in started:
            try:
                proc.wait(timeout=420)
            finally:
                log.close()
        results = {}
        for (proc, out_path, log), name in zip(started, ("eight", "one")):
            output = Path(log.name).read_text()[-6000:]
            assert proc.returncode == 0, f"probe {name} failed (rc {proc.returncode}):\n{output}"
            data = json.loads(out_path.read_text())
            assert data["device_count"] == (8 if name == "eight" else 1)
            for run in data["runs"]:
                results[tuple(run["mesh"][a] for a in AXES)] = run
        return results
    finally:
        for proc, _, log in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            log.close()


def test_losses_equal_across_meshes(probes):
    reference = probes[(1, 1, 1)]["losses"]
    assert len(reference) == 3 and all(math.isfinite(x) for x in reference)
    assert len(set(reference)) == 3, "the loss should change from step to step"
    for mesh in MESHES_8:
        np.testing.assert_allclose(probes[mesh]["losses"], reference, rtol=1e-5, err_msg=f"mesh {mesh}")
        np.testing.assert_allclose(probes[mesh]["grad_norms"], probes[(1, 1, 1)]["grad_norms"], rtol=1e-4,
                                   err_msg=f"mesh {mesh}")
        assert probes[mesh]["params_keep_sharding_after_steps"], mesh
        assert probes[mesh]["batch_spec"] == [["data", "fsdp"], None]


def test_the_carried_state_is_split_like_the_batch_and_trains_alike_on_every_mesh(probes):
    """Streamed training: the carried state [L, B, D] is split over the batch axes (axis 1) from init on,
    each device holding its own rows' state, and gives the losses of one device."""
    reference = probes[(1, 1, 1)]
    assert reference["streamed_losses"][0] == reference["losses"][0]  # the first step starts empty
    assert abs(reference["streamed_losses"][1] - reference["losses"][1]) > 1e-4  # the carry counts at step 2
    for mesh in [(1, 1, 1), *MESHES_8]:
        run = probes[mesh]
        assert run["carry_specs"] == {"init": [None, ["data", "fsdp"], None],
                                      "after_steps": [None, ["data", "fsdp"], None]}, mesh
        rows = SPEC["batch_size"] // (mesh[0] * mesh[1])
        assert run["carry_shard0_shape"] == [L, rows, D], mesh
        np.testing.assert_allclose(run["streamed_losses"], reference["streamed_losses"], rtol=1e-5, err_msg=str(mesh))
        np.testing.assert_allclose(run["carry_abs_sum"], reference["carry_abs_sum"], rtol=1e-4, err_msg=str(mesh))


def test_model_layout_is_the_documented_one(probes):
    params = probes[(1, 1, 1)]["params"]
    got = {dotted(p["path"]): tuple(p["logical_axes"]) for p in params}
    assert got == EXPECTED_LOGICAL_AXES


@pytest.mark.parametrize("mesh", [(1, 1, 1), *MESHES_8])
def test_state_is_created_sharded_by_the_rules(probes, mesh):
    run = probes[mesh]
    mesh_dict = dict(zip(AXES, mesh))
    assert run["stray_live_arrays_on_device0"] == [], "init left arrays besides the state on device 0"
    for p in run["params"]:
        name = dotted(p["path"])
        assert p["is_named"] and p["mesh_matches"] and p["sharding_equals_expected"], name
        want = expected_shard_shape(p["shape"], EXPECTED_LOGICAL_AXES[name], mesh_dict)
        assert p["shard0_shape"] == want, (name, p["spec"])
        # Fully replicated exactly where no rule applies at this mesh.
        assert p["fully_replicated"] == (want == p["shape"]), name
        assert p["device0_bytes"] == math.prod(want) * 4, name


def test_device_bytes_shrink_with_fsdp(probes):
    total = probes[(1, 1, 1)]["param_total_bytes"]
    # Every parameter has an 'embed' dimension except time_decay and time_first ([A] each, per layer).
    not_fsdp = L * 2 * D * 4
    n_params_expected = sum(math.prod(s) for s in _shapes().values())
    assert total == n_params_expected * 4
    assert probes[(1, 1, 1)]["param_device0_bytes"] == total
    assert probes[(8, 1, 1)]["param_device0_bytes"] == total  # plain data parallelism replicates
    assert probes[(2, 4, 1)]["param_device0_bytes"] == (total - not_fsdp) // 4 + not_fsdp
    # fsdp 2 x tensor 2: matrices with two sharded dims / 4, the rest / 2 except ffn.receptance
    # (embed, embed_out), which only fsdp splits.
    two_d = sum(math.prod(s) for n, s in _shapes().items()
                if len(s) == 2 and not n.endswith("ffn.receptance.kernel"))
    rest = n_params_expected - two_d
    assert probes[(2, 2, 2)]["param_device0_bytes"] == (two_d // 4 + rest // 2) * 4
    for mesh in [(1, 1, 1), *MESHES_8]:
        assert probes[mesh]["param_total_bytes"] == total


def _shapes() -> dict[str, tuple[int, ...]]:
    F = 4 * D
    dims = {"embed": D, "attn": D, "mlp": F, "vocab": V, "embed_out": D}
    return {name: tuple(dims[a] for a in axes) for name, axes in EXPECTED_LOGICAL_AXES.items()}


@pytest.mark.parametrize("mesh", [(1, 1, 1), *MESHES_8])
def test_optimizer_moments_are_sharded_like_params(probes, mesh):
    run = probes[mesh]
    params = {p["path"]: p for p in run["params"]}
    moments = run["moments"]
    assert sorted((m["moment"], m["param"]) for m in moments) == sorted(
        (k, path) for k in ("mu", "nu") for path in params)
    for m in moments:
        assert m["same_sharding"] and m["same_shard_shape"], m
        assert m["device0_bytes"] == params[m["param"]]["device0_bytes"], m
    # Everything else in the optimizer state is a scalar counter.
    assert all(o["shape"] == [] for o in run["other_opt_state"]), run["other_opt_state"]
