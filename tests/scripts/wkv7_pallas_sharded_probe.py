"""Subprocess probe for tests/test_wkv7_pallas.py: on 4 simulated CPU devices (the caller sets
XLA_FLAGS=--xla_force_host_platform_device_count=4), WKV-7 by the Pallas kernel (interpret mode) inside
shard_map over a (data 2, fsdp 1, tensor 2) mesh, directly, through wkv7(form='pallas') under
activation_sharding, and with document resets to a given reset state, against wkv7_chunked on one
device: values, final state and the gradients into r, w, k, v, a, b and the initial state. Prints one JSON
line: per variant the pallas_calls in its program and the errors relative to the largest magnitude of each
reference quantity."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.ops import wkv7
from rwkv_jax.ops.wkv7_pallas import wkv7_pallas_sharded
from rwkv_jax.train import sharding
from tests.helpers import rel_err, wkv7_inputs


def main():
    assert jax.device_count() == 4, jax.devices()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
    B, T = 4, 40
    streams, state = wkv7_inputs(B, T, seed=0, heads=2, N=32)
    args = [jnp.asarray(x) for x in (*streams, state)]
    weights = jnp.asarray(np.random.default_rng(1).normal(size=streams[0].shape), jnp.float32)

    def loss_of(run):
        def loss(*a):
            y, S = run(*a)
            return jnp.sum(y * weights) + jnp.sum(S * S), (y, S)
        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))

    def through_dispatcher(*a):  # what the model does: wkv7(form='pallas') under activation_sharding
        with sharding.activation_sharding(mesh):
            return wkv7.wkv7(*a, form="pallas", chunk_len=16)

    rng = np.random.default_rng(2)
    resets = dict(reset_BT=jnp.asarray(rng.random((B, T)) < 0.1),
                  reset_state=jnp.asarray(rng.normal(0, 0.3, state.shape[1:]), jnp.float32))
    runs = {"sharded": lambda *a: wkv7_pallas_sharded(mesh, *a, interpret=True),
            "dispatcher": through_dispatcher, "chunked": lambda *a: wkv7.wkv7_chunked(*a, chunk_len=16),
            "sharded_resets": lambda *a: wkv7_pallas_sharded(mesh, *a, interpret=True, **resets),
            "chunked_resets": lambda *a: wkv7.wkv7_chunked(*a, chunk_len=16, **resets)}
    results = {name: loss_of(run)(*args) for name, run in runs.items()}
    out = {}
    for name in ("sharded", "dispatcher", "sharded_resets"):
        (_, (y_ref, S_ref)), g_ref = results["chunked_resets" if name.endswith("resets") else "chunked"]
        (_, (y, S)), g = results[name]
        text = str(jax.make_jaxpr(loss_of(runs[name]))(*args))
        out[name] = {"mosaic_or_interpret_calls": text.count("pallas_call"),
                     "errors": [rel_err(y, y_ref), rel_err(S, S_ref),
                                *(rel_err(x, x_ref) for x, x_ref in zip(g, g_ref))]}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
