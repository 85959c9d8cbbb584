"""Subprocess probe for tests/test_lora.py: LoRA steps of a small RWKV-4 on several meshes of 8 simulated
CPU devices and on one device, from the same base and batches; writes what the test compares.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scripts/lora_sharding_probe.py OUT.json

Per mesh: the losses; the largest difference of every adapter from the one-device run's after the steps, and
the largest change of an adapter over the steps;
whether every base weight came back bit-identical; and the PartitionSpecs of the adapters and their base
kernels (and of the adapters' Adam moments).
"""

import json
import sys

MESHES = [(1, 1, 1), (2, 2, 2)]  # one device, and data x fsdp x tensor on 8
STEPS = 3


def probe() -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from flax import nnx

    from rwkv_jax.model import ModelConfig, lora
    from rwkv_jax.train import optim, sharding, train_step

    config = ModelConfig(vocab_size=256, d_model=64, n_layer=2)
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    optim_config = optim.default_optim_config()
    optim_config.update({"lr_init": 1e-2, "lr_final": 1e-2, "warmup_steps": 0})
    optimizer = optim.make_optimizer(optim_config, 10)
    base = nnx.state(lora.build(config, None, seed=3), nnx.Param)
    base_bytes = {k: np.asarray(v).tobytes() for k, v in nnx.to_flat_state(base)}
    rng = np.random.default_rng(0)
    batches = rng.integers(0, 256, (STEPS, 8, 33)).astype(np.int32)
    runs, reference = [], None
    for shape in MESHES:
        n = int(np.prod(shape))
        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape))), jax.devices()[:n])
        graphdef, init, _, shardings = train_step.train_state_factory(config, optimizer, mesh, 0, trainable="lora",
                                                                      lora=spec)
        step_fn = train_step.make_train_step(graphdef, optimizer, optim.learning_rate(optim_config, 10), shardings,
                                             mesh, trainable="lora")
        state = init(jax.tree.map(np.asarray, base))  # init donates what it is given: a fresh copy
        start = {k: np.asarray(v) for k, v in nnx.to_flat_state(train_step.split_adapters(state.params)[0])}
        losses = []
        for tokens in batches:
            batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["loss"]))
        adapters, frozen = train_step.split_adapters(state.params)
        flat = {k: v for k, v in nnx.to_flat_state(adapters)}
        values = {k: np.asarray(v) for k, v in flat.items()}
        if reference is None:
            reference = values
        specs = {".".join(map(str, k)): list(map(_axes, v.sharding.spec)) for k, v in flat.items()}
        params = dict(nnx.to_flat_state(state.params))
        for k in flat:
            kernel = k[:-2] + ("kernel",)
            specs[".".join(map(str, kernel))] = list(map(_axes, params[kernel].sharding.spec))
        moments = state.opt_state.inner_state[1].mu
        moment_specs = {".".join(map(str, k)): list(map(_axes, v.sharding.spec)) for k, v in nnx.to_flat_state(moments)}
        runs.append({"mesh": list(shape), "losses": losses,
                     "adapter_max_diff": max(float(np.abs(values[k] - reference[k]).max()) for k in values),
                     "adapter_max_change": max(float(np.abs(values[k] - start[k]).max()) for k in values),
                     "adapters_moved": all(bool(np.any(values[k])) for k in values if k[-1] == "lora_b"),
                     "base_bit_identical": all(np.asarray(v).tobytes() == base_bytes[k]
                                               for k, v in nnx.to_flat_state(frozen)),
                     "specs": {k: v for k, v in specs.items()}, "moment_specs": moment_specs})
    return {"device_count": jax.device_count(), "runs": runs}


def _axes(entry):
    return list(entry) if isinstance(entry, tuple) else entry


if __name__ == "__main__":
    result = probe()
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
