"""Bytes and FLOPs per chip of the real training step, compiled ahead of time for a TPU topology on any
host (libtpu must be installed; no TPU needed): XLA's cost_analysis() of the step with each WKV form.

    JAX_PLATFORMS=cpu python benchmarks/tpu_aot_cost.py --config=tiny --forms=parallel,pallas
    JAX_PLATFORMS=cpu python benchmarks/tpu_aot_cost.py --config=169m --batch=16 --seq=1024

The step is configs/<config>.py's model and optimizer with `--batch` x `--seq` tokens (defaults: the
config's), no microbatches, on a mesh of all the topology's chips (data axis). With --wkv-only the
script compiles one WKV forward+backward at the step's per-layer shape instead.
"""

import argparse
import importlib.util
import os
from pathlib import Path

# Compile-only use of libtpu: several such processes (tests, other runs) may share the host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(f"config_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def topology_devices(topology: str):
    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices


def compile_train_step(config, devices, form: str, batch: int, seq: int):
    """The compiled train step (jax.stages.Compiled) for `devices` with WKV `form`."""
    from rwkv_jax.model import ModelConfig
    from rwkv_jax.train import optim, sharding, train_step

    model_config = ModelConfig.from_dict({**config.model, "wkv_form": form,
                                          "dtype": "bfloat16" if config.model.dtype == "auto" else config.model.dtype})
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=devices)
    optimizer = optim.make_optimizer(config.optim, 1000)
    graphdef, _, abstract_state, shardings = train_step.train_state_factory(model_config, optimizer, mesh, 0)
    step = train_step.make_train_step(graphdef, optimizer, optim.learning_rate(config.optim, 1000), shardings,
                                      mesh, l2wrap_factor=config.optim.l2wrap_factor)
    # shardings has one NamedSharding per Variable (a pytree node around its value): a tree prefix.
    state = jax.tree.map(lambda s, node: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), node), shardings, abstract_state)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding.batch_sharding(mesh))
    return step.trace(state, {"inputs": tokens, "targets": tokens}).lower().compile()


def compile_wkv(devices, form: str, batch: int, seq: int, channels: int, dtype=jnp.bfloat16):
    """One WKV forward+backward at [batch, seq, channels] (batch split over all chips) for `devices`."""
    from rwkv_jax.ops import wkv4 as wkv_ops
    from rwkv_jax.train import sharding

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=devices)

    def loss(time_decay, time_first, k, v):
        with sharding.activation_sharding(mesh):
            y, state = wkv_ops.wkv(time_decay, time_first, k, v, form=form)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state.a)

    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    channel = jax.ShapeDtypeStruct((channels,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    big = jax.ShapeDtypeStruct((batch, seq, channels), dtype, sharding=rows)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(channel, channel, big, big).lower().compile()


def per_chip(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"bytes": float(cost.get("bytes accessed", float("nan"))), "flops": float(cost.get("flops", float("nan")))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--forms", default="parallel,pallas")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
    p.add_argument("--seq", type=int, default=0, help="sequence length (default: the config's)")
    p.add_argument("--wkv-only", action="store_true", help="compile one WKV fwd+bwd at the layer shape")
    args = p.parse_args()
    config = load_config(args.config)
    batch, seq = args.batch or config.train.batch_size, args.seq or config.train.seq_len
    devices = topology_devices(args.topology)
    rows = {}
    for form in args.forms.split(","):
        if args.wkv_only:
            compiled = compile_wkv(devices, form, batch, seq, config.model.d_att or config.model.d_model)
        else:
            compiled = compile_train_step(config, devices, form, batch, seq)
        rows[form] = per_chip(compiled)
        print(f"{args.config} {'WKV fwd+bwd' if args.wkv_only else 'train step'} {batch}x{seq} on "
              f"{args.topology}, WKV {form}: {rows[form]['bytes']:.3e} bytes, {rows[form]['flops']:.3e} FLOPs "
              "per chip", flush=True)
    if "pallas" in rows:
        for form, row in rows.items():
            if form != "pallas":
                print(f"bytes {form} / pallas = {row['bytes'] / rows['pallas']['bytes']:.2f}x")


if __name__ == "__main__":
    main()
