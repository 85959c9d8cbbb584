"""Subprocess probe for tests/test_sharding.py: trains a small RWKV for a few steps on each requested
mesh and writes, per mesh, the losses, the per-device bytes and the layout of the created train state.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scripts/sharding_probe.py SPEC.json OUT.json

SPEC.json: {"meshes": [[data, fsdp, tensor], ...], "steps": 3, "model": {...}, "batch_size": 8,
"seq_len": 32, "seed": 0}. A mesh smaller than the device count uses the first devices. The device
count must be fixed through XLA_FLAGS by the caller, before jax is imported (it is, here, below).
"""

import json
import sys


def _path(keypath) -> str:
    import jax
    return jax.tree_util.keystr(keypath).removesuffix(".value")


def _device0_bytes(x, device) -> int:
    return sum(s.data.nbytes for s in x.addressable_shards if s.device == device)


def probe(spec: dict) -> dict:
    import jax
    import ml_collections
    import numpy as np
    from flax import nnx

    from rwkv_jax.model import ModelConfig
    from rwkv_jax.train import optim, sharding, train_step

    model_config = ModelConfig(**spec["model"])
    steps, batch_size, seq_len = spec["steps"], spec["batch_size"], spec["seq_len"]
    optim_config = optim.default_optim_config()
    optim_config.update(spec.get("optim", {}))
    rng = np.random.default_rng(spec["seed"])
    tokens = rng.integers(0, model_config.vocab_size, (steps, batch_size, seq_len + 1)).astype(np.int32)

    results = []
    for data, fsdp, tensor in spec["meshes"]:
        n = data * fsdp * tensor
        mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor}),
                                  devices=jax.devices()[:n])
        dev0 = mesh.devices.flat[0]
        optimizer = optim.make_optimizer(optim_config, steps)
        schedule = optim.learning_rate(optim_config, steps)
        graphdef, init, abstract_state, shardings = train_step.train_state_factory(
            model_config, optimizer, mesh, spec["seed"])

        live_before = {id(a) for a in jax.live_arrays()}
        state = init()
        jax.block_until_ready(state)
        # Every array alive on the mesh's first device after init, except those from before: the state
        # itself, and nothing else (no replicated full-size copy left behind by the initialiser).
        state_ids = {id(x) for x in jax.tree.leaves(state)}
        stray = [a.shape for a in jax.live_arrays()
                 if id(a) not in live_before and id(a) not in state_ids and dev0 in a.devices()]

        # Layout of the created parameters.
        abstract_vars = jax.tree_util.tree_flatten_with_path(
            abstract_state.params, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
        axes_of = {_path(p): v.get_metadata().get("logical_axes") for p, v in abstract_vars}
        params = []
        flat_params = jax.tree_util.tree_flatten_with_path(state.params)[0]
        flat_expected = jax.tree.leaves(shardings.params)
        for (p, x), expected in zip(flat_params, flat_expected, strict=True):
            shard0 = [s for s in x.addressable_shards if s.device == dev0]
            params.append({
                "path": _path(p), "shape": list(x.shape), "dtype": str(x.dtype),
                "logical_axes": list(axes_of[_path(p)]) if axes_of[_path(p)] is not None else None,
                "spec": [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec],
                "is_named": isinstance(x.sharding, jax.sharding.NamedSharding),
                "sharding_equals_expected": x.sharding == expected,
                "mesh_matches": isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh,
                "fully_replicated": x.sharding.is_fully_replicated,
                "shard0_shape": list(shard0[0].data.shape),
                "device0_bytes": _device0_bytes(x, dev0),
            })

        # Optimizer state: every leaf under an Adam moment ('mu', 'nu') against its parameter.
        param_sharding_by_path = {_path(p): x.sharding for p, x in flat_params}
        moments = []
        other_opt = []
        for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
            key = _path(p)
            for moment in ("mu", "nu"):
                marker = f".{moment}"
                if marker in key:
                    param_path = key.split(marker, 1)[1]
                    ps = param_sharding_by_path[param_path]
                    moments.append({"moment": moment, "param": param_path,
                                    "same_sharding": x.sharding == ps,
                                    "same_shard_shape": x.sharding.shard_shape(x.shape) == ps.shard_shape(x.shape),
                                    "device0_bytes": _device0_bytes(x, dev0)})
                    break
            else:
                other_opt.append({"path": key, "shape": list(x.shape), "device0_bytes": _device0_bytes(x, dev0)})

        # Train.
        step_fn = train_step.make_train_step(graphdef, optimizer, schedule, shardings, mesh,
                                             l2wrap_factor=optim_config.l2wrap_factor)
        batch_sharding = sharding.batch_sharding(mesh)
        losses, grad_norms = [], []
        for i in range(steps):
            batch = {"inputs": jax.device_put(tokens[i, :, :-1], batch_sharding),
                     "targets": jax.device_put(tokens[i, :, 1:], batch_sharding)}
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["loss"]))
            grad_norms.append(float(metrics["grad_norm"]))
        after_training = [x.sharding == e for x, e in zip(jax.tree.leaves(state.params), flat_expected)]
        param_total_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
        del state

        # Streamed training: the carried state, created and kept split over the batch axes, carried 2 steps.
        graphdef_s, init_s, _, shardings_s = train_step.train_state_factory(model_config, optimizer, mesh,
                                                                            spec["seed"], carry_rows=batch_size)
        step_s = train_step.make_train_step(graphdef_s, optimizer, schedule, shardings_s, mesh,
                                            l2wrap_factor=optim_config.l2wrap_factor)
        state = init_s()
        carry_specs = {"init": [list(a) if isinstance(a, tuple) else a for a in state.carry.wkv_a.sharding.spec]}
        streamed_losses = []
        for i in range(2):
            batch = {"inputs": jax.device_put(tokens[i, :, :-1], batch_sharding),
                     "targets": jax.device_put(tokens[i, :, 1:], batch_sharding)}
            state, metrics = step_s(state, batch)
            streamed_losses.append(float(metrics["loss"]))
        carry = state.carry.wkv_a
        carry_specs["after_steps"] = [list(a) if isinstance(a, tuple) else a for a in carry.sharding.spec]

        results.append({
            "mesh": dict(mesh.shape), "num_devices": n, "losses": losses, "grad_norms": grad_norms,
            "params": params, "moments": moments, "other_opt_state": other_opt,
            "param_device0_bytes": sum(p["device0_bytes"] for p in params),
            "param_total_bytes": param_total_bytes,
            "stray_live_arrays_on_device0": [list(s) for s in stray],
            "params_keep_sharding_after_steps": all(after_training),
            "batch_spec": [list(a) if isinstance(a, tuple) else a for a in batch_sharding.spec],
            "streamed_losses": streamed_losses, "carry_specs": carry_specs,
            "carry_shard0_shape": list([s for s in carry.addressable_shards if s.device == dev0][0].data.shape),
            "carry_abs_sum": float(np.abs(np.asarray(carry, np.float64)).sum()),
        })
        del state
    return {"device_count": jax.device_count(), "runs": results}


def main(argv):
    with open(argv[1]) as f:
        spec = json.load(f)
    result = probe(spec)
    with open(argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv)
