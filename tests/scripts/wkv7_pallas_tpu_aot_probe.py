"""Subprocess probe for tests/test_wkv7_pallas.py: compiles, ahead of time for one chip of a TPU v5e
(libtpu, no TPU needed), the WKV-7 Pallas kernel's forward and backward (jax.grad into every input) at a
given head size and chunk length, bf16 streams, with document resets to a learned state, and prints one
JSON line: the Mosaic calls in the compiled program and its bytes and FLOPs.

    JAX_PLATFORMS=cpu python tests/scripts/wkv7_pallas_tpu_aot_probe.py 64 32
"""

import json
import os
import sys

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: other processes may hold libtpu

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from rwkv_jax.ops.wkv7_pallas import wkv7_pallas


def main(head_size: str, chunk_len: str):
    device = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
    B, T, H, N = 2, 64, 2, int(head_size)
    chip = jax.sharding.SingleDeviceSharding(device)
    on_chip = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=chip)
    stream = on_chip((B, T, H, N), jnp.bfloat16)

    def loss(r, w, k, v, a, b, state, reset_BT, reset_state):
        y, S = wkv7_pallas(r, w, k, v, a, b, state, reset_BT=reset_BT, reset_state=reset_state, interpret=False,
                           chunk_len=int(chunk_len))
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(S)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6, 8))).trace(
        *[stream] * 6, on_chip((B, H, N, N), jnp.float32), on_chip((B, T), jnp.bool_),
        on_chip((H, N, N), jnp.float32)).lower().compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    print(json.dumps({"mosaic_calls": compiled.as_text().count("tpu_custom_call"),
                      "bytes": float(cost.get("bytes accessed", 0.0)), "flops": float(cost.get("flops", 0.0))}),
          flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
