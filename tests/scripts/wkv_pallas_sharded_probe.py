"""Subprocess probe for tests/test_wkv_pallas.py: on 4 simulated CPU devices (the caller sets
XLA_FLAGS=--xla_force_host_platform_device_count=4), WKV by the Pallas kernel inside shard_map over a
(data 2, fsdp 1, tensor 2) mesh, directly and through wkv(form='pallas') under activation_sharding, against
wkv_sequential: values, final state and gradients into every input. Prints one JSON line of max abs
differences and gradient scales.
With --resets, every form runs with the same random document-reset mask (the line then says how many).
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.ops.wkv4 import WKVState, wkv, wkv_sequential
from rwkv_jax.ops.wkv4_pallas import wkv_pallas_sharded
from rwkv_jax.train import sharding


def main():
    assert jax.device_count() == 4, jax.devices()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
    B, T, C = 4, 40, 256
    rng = np.random.default_rng(0)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    args = (f32(rng.uniform(-3, 0.5, C)), f32(rng.normal(size=C)), f32(rng.normal(size=(B, T, C))),
            f32(rng.normal(size=(B, T, C))), f32(rng.normal(size=(B, C))), f32(rng.uniform(0.5, 2, (B, C))),
            f32(rng.normal(size=(B, C))))
    r = f32(rng.normal(size=(B, T, C)))
    resets = {"reset_BT": jnp.asarray(rng.random((B, T)) < 0.1)} if "--resets" in sys.argv else {}

    def loss_of(run):
        def loss(td, tf, k, v, a, b, p):
            y, s = run(td, tf, k, v, WKVState(a, b, p))
            return jnp.sum(y * r) + jnp.sum(s.a) + jnp.sum(s.b) - jnp.sum(s.p), (y, s)
        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))

    def through_dispatcher(*a):  # what the model does: wkv(form='pallas') under activation_sharding
        with sharding.activation_sharding(mesh):
            return wkv(*a, form="pallas", **resets)

    results = {name: loss_of(run)(*args) for name, run in (
        ("sharded", lambda *a: wkv_pallas_sharded(mesh, *a, **resets)), ("dispatcher", through_dispatcher),
        ("sequential", lambda *a: wkv_sequential(*a, **resets)))}
    (_, (y_ref, s_ref)), g_ref = results["sequential"]
    out = {"grad_scale": [float(jnp.abs(g).max()) for g in g_ref],
           "resets": int(resets["reset_BT"].sum()) if resets else 0}
    for name in ("sharded", "dispatcher"):
        (_, (y, s)), g = results[name]
        out[name] = {"y": float(jnp.abs(y - y_ref).max()),
                     "state": [float(jnp.abs(x - x_ref).max()) for x, x_ref in zip(s, s_ref)],
                     "grads": [float(jnp.abs(x - x_ref).max()) for x, x_ref in zip(g, g_ref)]}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
