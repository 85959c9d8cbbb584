"""Where the time of one training step goes: per-part timings in one process, each part jitted alone.

    python benchmarks/profile_step.py                          # 169M, B=1 T=128
    python benchmarks/profile_step.py --batch=2 --seq=512
    python benchmarks/profile_step.py --trace=/tmp/trace      # also a jax.profiler trace of 3 full steps

Parts (median of --steps calls after a warm-up, each a separately jitted function over the same shapes):
  step          the whole jitted train step (forward, backward, clip, Adam, apply)
  fwd+bwd       value_and_grad of the loss over the parameters
  update        the optimizer update and apply, given gradients, donated as in the step
  head+CE       forward+backward of the head matmul and cross entropy, given hidden states
  WKV           forward+backward of the WKV operator of every layer, given k and v
  matmuls       forward+backward of every block's projections (7 per layer), given inputs
  rest of f+b   fwd+bwd minus head+CE, WKV and matmuls: layer norms, token shift, gates, embedding
Limits printed beside: matmul FLOPs over the probed matmul peak; the update's bytes (read gradients,
parameters and both Adam moments, write the last three: 7 x 4 bytes per parameter) over the probed memory
bandwidth. XLA:CPU does not fuse passes with several outputs, so optim.make_optimizer's update is three
passes (11 x 4 bytes per parameter, with the gradient norm 12): the floor it can reach here is 12/7 of
that limit.
"""

import argparse
import json
import os
import resource
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import probes
from flax import nnx

from rwkv_jax.model import ModelConfig
from rwkv_jax.ops import wkv4 as wkv_ops
from rwkv_jax.train import optim, sharding, train_step


def _apply(optimizer, grads, opt_state, params):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def timed(fn, *args, steps=5):
    return probes.median_time(fn, *args, repeats=steps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=50277)
    p.add_argument("--d_model", type=int, default=768)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--wkv_form", default="auto")
    p.add_argument("--scan_layers", action="store_true")
    p.add_argument("--trace", default="", help="directory for a jax.profiler trace of 3 full steps")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    B, T, D, L, V = args.batch, args.seq, args.d_model, args.n_layer, args.vocab
    config = ModelConfig(vocab_size=V, d_model=D, n_layer=L, wkv_form=args.wkv_form, scan_layers=args.scan_layers)
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    optim_config = optim.default_optim_config()
    optimizer = optim.make_optimizer(optim_config, 1000)
    schedule = optim.learning_rate(optim_config, 1000)
    graphdef, init, _, shardings = train_step.train_state_factory(config, optimizer, mesh, seed=0)
    state = init()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, size=(B, T + 1), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    n_params = sum(x.size for x in jax.tree.leaves(state.params))

    load = "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    peak, bandwidth = probes.matmul_flops(), probes.memory_bandwidth()
    print(f"{L} x {D}, vocab {V}, B={B} T={T}, {n_params:,} parameters; {load}")
    print(f"probed: matmul {peak / 1e9:.1f} GFLOP/s (2048^3 fp32 dot), memory {bandwidth / 1e9:.1f} GB/s "
          "(elementwise pass, read + write)", flush=True)

    rows = {}
    step_fn = train_step.make_train_step(graphdef, optimizer, schedule, shardings, mesh,
                                         l2wrap_factor=optim_config.l2wrap_factor)
    holder = {"state": state}

    def full_step():
        holder["state"], m = step_fn(holder["state"], batch)
        return holder["state"], m

    start = time.perf_counter()
    jax.block_until_ready(full_step())
    rows["first step (compile)"] = time.perf_counter() - start
    rows["step"] = timed(full_step, steps=args.steps)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(full_step())
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults  # each maps one page of fresh memory
    params = holder["state"].params

    grad_fn = probes.kept_outputs(jax.value_and_grad(
        lambda p: train_step._loss(graphdef, p, None, batch["inputs"], batch["targets"], optim_config.l2wrap_factor,
                                   2048)[0]), params)
    rows["fwd+bwd"] = timed(grad_fn, steps=args.steps)
    _, grads = grad_fn()

    # Donated as in the train step: the moments and parameters are updated in place, and the gradients
    # (temporaries inside the step) may be overwritten. Each call gets fresh copies, made before the clock.
    # With four donated trees of the same shapes for three outputs, jax warns that one is left unused.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    update = jax.jit(lambda grads, opt_state, params: _apply(optimizer, grads, opt_state, params),
                     donate_argnums=(0, 1, 2))
    copies = lambda: jax.block_until_ready(jax.tree.map(jnp.copy, (grads, holder["state"].opt_state, params)))  # noqa: E731
    rows["update"] = probes.median_time(update, repeats=args.steps, fresh_args=copies)

    model = nnx.merge(graphdef, params)
    hidden = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    head_ce = jax.grad(lambda h, kernel: optim.chunked_token_losses(
        h.astype(config.dtype), kernel, batch["targets"], l2wrap_factor=1e-4)[0], argnums=(0, 1))
    rows["head+CE"] = timed(probes.kept_outputs(head_ce, hidden, model.head.kernel[...]), steps=args.steps)

    k = jnp.asarray(rng.standard_normal((L, B, T, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((L, B, T, D)), jnp.float32)
    decay = jnp.asarray(rng.uniform(-5, 3, (L, D)), jnp.float32)
    first = jnp.asarray(rng.uniform(-1, 1, (L, D)), jnp.float32)

    def all_wkv(decay, first, k, v):
        return sum(wkv_ops.wkv(decay[i], first[i], k[i], v[i], form=config.wkv_form)[0].sum() for i in range(L))
    wkv_grads = jax.grad(all_wkv, argnums=(0, 1, 2, 3))
    rows["WKV"] = timed(probes.kept_outputs(wkv_grads, decay, first, k, v), steps=args.steps)

    x = jnp.asarray(rng.standard_normal((B * T, D)), jnp.float32)
    x4 = jnp.asarray(rng.standard_normal((B * T, 4 * D)), jnp.float32)
    shapes = [(D, D)] * 4 + [(D, 4 * D), (4 * D, D), (D, D)]  # att k, v, r, output; ffn key, value, receptance
    mats = [jnp.asarray(rng.standard_normal((L,) + s) * 0.02, jnp.float32) for s in shapes]

    def all_matmuls(mats, x, x4):
        return sum(((x if m.shape[1] == D else x4) @ m[i]).sum() for i in range(L) for m in mats)
    matmul_grads = jax.grad(all_matmuls, argnums=(0, 1, 2))
    rows["matmuls"] = timed(probes.kept_outputs(matmul_grads, mats, x, x4), steps=args.steps)
    rows["rest of f+b"] = rows["fwd+bwd"] - rows["head+CE"] - rows["WKV"] - rows["matmuls"]

    matmul_flops = 6 * B * T * 13 * D * D * L
    head_flops = 6 * B * T * V * D
    update_bytes = 7 * 4 * n_params
    limits = {"step": (matmul_flops + head_flops) / peak, "fwd+bwd": (matmul_flops + head_flops) / peak,
              "head+CE": head_flops / peak, "matmuls": matmul_flops / peak, "update": update_bytes / bandwidth}
    print(f"\n{'part':<22} {'ms':>9} {'% of step':>10} {'limit ms':>9} {'x limit':>8}")
    for name, seconds in rows.items():
        limit = limits.get(name)
        share = "" if name.startswith("first") else f"{100 * seconds / rows['step']:>9.1f}%"
        lim = f"{1e3 * limit:>9.1f} {seconds / limit:>7.2f}x" if limit else ""
        print(f"{name:<22} {1e3 * seconds:>9.1f} {share:>10} {lim}")
    print(f"tokens/s {B * T / rows['step']:.1f}; MFU {(matmul_flops + head_flops) / rows['step'] / peak:.1%}; "
          f"{faults:,} page faults per step")
    result = {"shape": f"{L}x{D} V{V} B{B} T{T}", "seconds": rows, "limits_s": limits, "peak_flops": peak,
              "bandwidth": bandwidth, "n_params": n_params, "update_bytes": update_bytes,
              "page_faults_per_step": faults,
              "load": os.getloadavg()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)

    if args.trace:
        with jax.profiler.trace(args.trace):
            for _ in range(3):
                jax.block_until_ready(full_step())
        print(f"trace written to {args.trace} (open with TensorBoard's profile plugin or Perfetto)")
    return result


if __name__ == "__main__":
    main()
