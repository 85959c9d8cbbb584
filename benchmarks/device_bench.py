"""One accelerator run of the WKV kernel and the model, section by section (benchmarks/device.sh runs each
section in its own process under a time limit, then prints the table).

    python3 benchmarks/device_bench.py --section=check --results=/tmp/r.jsonl   # kernel vs recurrence, PASS/FAIL
    python3 benchmarks/device_bench.py --section=wkv --results=/tmp/r.jsonl     # every WKV form, fwd and fwd+bwd
                                                                                # (+ GPU kernel block sweep)
    python3 benchmarks/device_bench.py --section=train --model=169m --form=pallas --results=/tmp/r.jsonl
    python3 benchmarks/device_bench.py --section=decode --results=/tmp/r.jsonl  # RNN decode, batch 1 and 64
    python3 benchmarks/device_bench.py --section=table --results=/tmp/r.jsonl   # the table of all results

Shapes: WKV at B=16, T=1024, C=1024 bf16; training steps of the paper's 169M and 430M (vocab 50277, bf16
compute, fp32 master weights, Adam) at 16 x 1024 tokens; decoding with the 169M model. Every timing is
the median of several calls after warm-up, each ended by block_until_ready. MFU counts the paper's
6 (V D + 13 D^2 L) FLOPs per token against the device's dense bf16 peak (rwkv_jax/train/metrics.py).
RWKV_DEVICE_BENCH_SMALL=1 shrinks every shape so the script can be dry-run on a CPU (kernels interpreted).

Imports only the model, ops, optimizer and train-step modules (no data pipeline): the device machine may
lack grain/tfds. If ml_collections is missing, a minimal stand-in (attribute-access dict) is installed.
"""

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import ml_collections  # noqa: F401  (rwkv_jax.train.sharding/optim use its ConfigDict for their defaults)
except ImportError:
    class _ConfigDict(dict):
        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError as error:
                raise AttributeError(name) from error

        def __setattr__(self, name, value):
            self[name] = value

    _stand_in = types.ModuleType("ml_collections")
    _stand_in.ConfigDict = _ConfigDict
    sys.modules["ml_collections"] = _stand_in

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from probes import median_time  # noqa: E402  (this folder: jax and numpy only)

SMALL = os.environ.get("RWKV_DEVICE_BENCH_SMALL") == "1"
WKV_SHAPE = (2, 64, 128) if SMALL else (16, 1024, 1024)
TRAIN_TOKENS = (2, 64) if SMALL else (16, 1024)
MODELS = {"169m": dict(vocab_size=50277, n_layer=12, d_model=768),
          "430m": dict(vocab_size=50277, n_layer=24, d_model=1024)}
if SMALL:
    MODELS = {"169m": dict(vocab_size=512, n_layer=2, d_model=128),
              "430m": dict(vocab_size=512, n_layer=2, d_model=256)}
FORMS = ("sequential", "parallel", "chunked", "pallas")
# The Triton kernel's (block_c, num_warps) also tried in the wkv section (its 'pallas' row is the default,
# 64 and 2): one channel per thread in the first two, two in the others; B * C / block_c programs (256 at
# the default) run the latency-bound T loops side by side.
GPU_KERNEL_BLOCKS = ((32, 1), (128, 4), (64, 1), (128, 2))


def record(path, **row):
    print("RESULT " + json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def wkv_inputs(shape, dtype, seed=0):
    B, T, C = shape
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.uniform(-3, 0.5, C), jnp.float32), jnp.asarray(rng.normal(size=C), jnp.float32),
            jnp.asarray(rng.normal(size=(B, T, C)), dtype), jnp.asarray(rng.normal(size=(B, T, C)), dtype))


def wkv_loss(run):
    def loss(time_decay, time_first, k, v, r):
        y, state = run(time_decay, time_first, k, v)
        return jnp.sum(y.astype(jnp.float32) * r) + jnp.sum(state.a) + jnp.sum(state.b) + jnp.sum(state.p)
    return loss


# ---------------------------------------------------------------------------------------------- sections

def section_check(args):
    """The kernel on this device (Triton on GPU, Mosaic on TPU, interpreted on CPU) against
    wkv_sequential: values, final state and all gradients, fp32 and bf16, T and C off the block sizes."""
    from rwkv_jax.ops.wkv4 import WKVState, wkv_sequential
    from rwkv_jax.ops.wkv4_pallas import default_backend, wkv_pallas

    backend = default_backend()
    ok_all = True
    for dtype, rtol in ((jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)):
        B, T, C = 3, 100, 200
        td, tf, k, v = wkv_inputs((B, T, C), dtype, seed=1)
        rng = np.random.default_rng(2)
        state = WKVState(jnp.asarray(rng.normal(size=(B, C)), jnp.float32),
                         jnp.asarray(rng.uniform(0.5, 2, (B, C)), jnp.float32),
                         jnp.asarray(rng.normal(size=(B, C)), jnp.float32))
        r = jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32)

        def grads_of(run):
            def loss(td, tf, k, v, a, b, p):
                y, s = run(td, tf, k, v, WKVState(a, b, p))
                return jnp.sum(y.astype(jnp.float32) * r) + jnp.sum(s.a) + jnp.sum(s.b) + jnp.sum(s.p), (y, s)
            return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))(td, tf, k, v, *state)

        (_, (y, s)), g = grads_of(wkv_pallas)
        (_, (y_ref, s_ref)), g_ref = grads_of(wkv_sequential)
        rel = lambda x, ref: float(jnp.max(jnp.abs(x.astype(jnp.float32) - ref.astype(jnp.float32)))
                                   / (float(jnp.max(jnp.abs(ref.astype(jnp.float32)))) + 1e-30))
        errors = {"y": rel(y, y_ref), **{f"state.{n}": rel(a, b) for n, a, b in zip("abp", s, s_ref)},
                  **{f"d_{n}": rel(a, b) for n, a, b in zip(("td", "tf", "k", "v", "a0", "b0", "p0"), g, g_ref)}}
        finite = all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in (y, *s, *g))
        ok = finite and max(errors.values()) <= rtol
        ok_all &= ok
        worst = max(errors, key=errors.get)
        print(f"kernel check {backend} {jnp.dtype(dtype).name}: {'PASS' if ok else 'FAIL'} (worst relative "
              f"error {errors[worst]:.2e} in {worst}, limit {rtol:g}; finite={finite})", flush=True)
    record(args.results, section="check", backend=backend, passed=bool(ok_all))
    print(f"PALLAS KERNEL CHECK: {'PASS' if ok_all else 'FAIL'}", flush=True)


def section_wkv(args):
    from rwkv_jax.ops.wkv4 import wkv

    td, tf, k, v = wkv_inputs(WKV_SHAPE, jnp.bfloat16)
    r = jnp.asarray(np.random.default_rng(3).normal(size=WKV_SHAPE), jnp.float32)
    forms = args.forms.split(",") if args.forms else FORMS
    for form in forms:
        run = lambda td, tf, k, v, form=form: wkv(td, tf, k, v, form=form)
        try:
            forward = jax.jit(run)
            backward = jax.jit(jax.value_and_grad(wkv_loss(run), argnums=(0, 1, 2, 3)))
            t_fwd = median_time(lambda: forward(td, tf, k, v), repeats=args.repeats, warmup=2)
            t_bwd = median_time(lambda: backward(td, tf, k, v, r), repeats=args.repeats, warmup=2)
            record(args.results, section="wkv", form=form, shape=WKV_SHAPE, fwd_s=t_fwd, fwd_bwd_s=t_bwd)
        except Exception as error:  # noqa: BLE001 - report and go on to the next form
            print(f"wkv {form}: ERROR {type(error).__name__}: {str(error)[:500]}", flush=True)
    if "pallas" in forms and (jax.default_backend() in ("gpu", "cuda", "rocm") or SMALL):
        _sweep_gpu_kernel_blocks(args, td, tf, k, v, r)


def _sweep_gpu_kernel_blocks(args, td, tf, k, v, r):
    """The Triton kernel at each of GPU_KERNEL_BLOCKS (the dry run on CPU interprets it)."""
    from rwkv_jax.ops.wkv4_pallas import wkv_pallas

    for block_c, num_warps in GPU_KERNEL_BLOCKS:
        run = lambda td, tf, k, v, c=block_c, nw=num_warps: wkv_pallas(td, tf, k, v, backend="gpu", block_c=c,
                                                                      num_warps=nw)
        try:
            forward = jax.jit(run)
            backward = jax.jit(jax.value_and_grad(wkv_loss(run), argnums=(0, 1, 2, 3)))
            t_fwd = median_time(lambda: forward(td, tf, k, v), repeats=args.repeats, warmup=2)
            t_bwd = median_time(lambda: backward(td, tf, k, v, r), repeats=args.repeats, warmup=2)
            record(args.results, section="wkv_blocks", block_c=block_c, num_warps=num_warps, shape=WKV_SHAPE,
                   fwd_s=t_fwd, fwd_bwd_s=t_bwd)
        except Exception as error:  # noqa: BLE001 - report and go on to the next blocks
            print(f"wkv pallas block_c={block_c} num_warps={num_warps}: ERROR {type(error).__name__}: "
                  f"{str(error)[:500]}", flush=True)


def _train_step(model_config, batch, seq):
    from rwkv_jax.train import optim, sharding, train_step

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    optim_config = optim.default_optim_config()
    optimizer = optim.make_optimizer(optim_config, 1000)
    graphdef, init, _, shardings = train_step.train_state_factory(model_config, optimizer, mesh, seed=0)
    step = train_step.make_train_step(graphdef, optimizer, optim.learning_rate(optim_config, 1000), shardings,
                                      mesh, l2wrap_factor=optim_config.l2wrap_factor)
    tokens = np.random.default_rng(0).integers(0, model_config.vocab_size, (batch, seq + 1), dtype=np.int32)
    data = {"inputs": jax.device_put(tokens[:, :-1], sharding.batch_sharding(mesh)),
            "targets": jax.device_put(tokens[:, 1:], sharding.batch_sharding(mesh))}
    return step, init(), data


def section_train(args):
    from rwkv_jax.model import ModelConfig
    from rwkv_jax.train import metrics

    shape = MODELS[args.model]
    batch, seq = TRAIN_TOKENS
    for remat in ((False, True) if args.remat == "auto" else (args.remat == "on",)):
        try:
            model_config = ModelConfig(**shape, dtype="bfloat16", wkv_form=args.form, remat=remat, scan_layers=True)
            step, state, data = _train_step(model_config, batch, seq)
            holder = {"state": state}
            losses = []

            def one():
                holder["state"], m = step(holder["state"], data)
                jax.block_until_ready((holder["state"], m))
                losses.append(float(m["loss"]))

            start = time.perf_counter()
            one()
            compile_s = time.perf_counter() - start
            step_s = median_time(one, repeats=args.repeats, warmup=1)
            assert all(np.isfinite(losses)), losses
            tokens_s = batch * seq / step_s
            peak = metrics.peak_flops_per_device()
            flops = metrics.flops_per_token(shape["vocab_size"], shape["d_model"], shape["n_layer"])
            mfu = tokens_s * flops / (peak * jax.device_count()) if peak else None
            record(args.results, section="train", model=args.model, form=args.form, remat=remat, step_s=step_s,
                   tokens_per_s=tokens_s, mfu=mfu, first_call_s=compile_s, loss=losses[-1])
            return
        except Exception as error:  # noqa: BLE001 - e.g. out of memory without remat: retry with it
            print(f"train {args.model} {args.form} remat={remat}: ERROR {type(error).__name__}: "
                  f"{str(error)[:500]}", flush=True)
            holder = state = step = None
            jax.clear_caches()


def section_decode(args):
    from flax import nnx

    from rwkv_jax.model import RWKV, ModelConfig

    model = RWKV(ModelConfig(**MODELS["169m"], dtype="bfloat16"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    @jax.jit
    def step(params, tokens, state):
        logits, state = nnx.merge(graphdef, params).step(tokens, state)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), state

    for batch in (1, 64):
        try:
            holder = {"tokens": jnp.zeros((batch,), jnp.int32), "state": model.init_state(batch)}

            def one():
                holder["tokens"], holder["state"] = step(params, holder["tokens"], holder["state"])
                jax.block_until_ready(holder["tokens"])

            token_s = median_time(one, repeats=args.repeats * 10, warmup=3)
            record(args.results, section="decode", model="169m", batch=batch, token_s=token_s,
                   tokens_per_s=batch / token_s)
        except Exception as error:  # noqa: BLE001
            print(f"decode batch {batch}: ERROR {type(error).__name__}: {str(error)[:500]}", flush=True)


def section_table(args):
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()] \
        if Path(args.results).exists() else []
    print(f"\n==== rwkv-jax device benchmark: jax {jax.__version__}, {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}{' (SMALL shapes)' if SMALL else ''} ====")
    check = [r for r in rows if r["section"] == "check"]
    print(f"Pallas kernel check: {('PASS' if check[-1]['passed'] else 'FAIL') if check else 'NOT RUN'}"
          + (f" ({check[-1]['backend']} variant)" if check else ""))
    wkv_rows = {r["form"]: r for r in rows if r["section"] == "wkv"}
    kernel = wkv_rows.get("pallas")
    print(f"\nWKV at B,T,C = {WKV_SHAPE} bf16 (median ms; ratio = form time / kernel time)")
    print(f"  {'form':<11} {'fwd ms':>9} {'x kernel':>9} {'fwd+bwd ms':>11} {'x kernel':>9}")
    for form in FORMS:
        r = wkv_rows.get(form)
        if r is None:
            print(f"  {form:<11} {'(not run / failed)':>40}")
            continue
        ratio = lambda key: f"{r[key] / kernel[key]:.2f}" if kernel else "-"
        print(f"  {form:<11} {r['fwd_s'] * 1e3:>9.3f} {ratio('fwd_s'):>9} {r['fwd_bwd_s'] * 1e3:>11.3f} "
              f"{ratio('fwd_bwd_s'):>9}")
    for r in (r for r in rows if r["section"] == "wkv_blocks"):
        print(f"  {'gpu c' + str(r['block_c']) + ' w' + str(r['num_warps']):<11} {r['fwd_s'] * 1e3:>9.3f} "
              f"{'':>9} {r['fwd_bwd_s'] * 1e3:>11.3f}   (Triton kernel, block_c, num_warps)")
    batch, seq = TRAIN_TOKENS
    print(f"\nTraining step, {batch} x {seq} tokens, bf16 compute (median)")
    print(f"  {'model':<6} {'WKV':<9} {'remat':<6} {'step ms':>9} {'tokens/s':>11} {'MFU':>7}")
    for r in (r for r in rows if r["section"] == "train"):
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"  {r['model']:<6} {r['form']:<9} {str(r['remat']):<6} {r['step_s'] * 1e3:>9.1f} "
              f"{r['tokens_per_s']:>11,.0f} {mfu:>7}")
    if kernel and not SMALL:
        for r in (r for r in rows if r["section"] == "train" and r["model"] == "430m" and r["form"] == "pallas"):
            # WKV fwd+bwd per layer at 16 x 1024 x 1024 is the 430M layer shape: 24 layers of it.
            share = 24 * kernel["fwd_bwd_s"] / r["step_s"]
            print(f"  430m: 24 x WKV kernel fwd+bwd = {100 * share:.1f}% of the step (target <= 5%)")
    print("\nRNN decode, 169M, bf16 (median per token step)")
    for r in (r for r in rows if r["section"] == "decode"):
        print(f"  batch {r['batch']:>3}: {r['tokens_per_s']:>11,.0f} tokens/s ({r['token_s'] * 1e3:.3f} ms/step)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", required=True, choices=("check", "wkv", "train", "decode", "table"))
    p.add_argument("--results", required=True, help="JSON-lines file the sections append to")
    p.add_argument("--model", default="169m", choices=tuple(MODELS))
    p.add_argument("--form", default="pallas")
    p.add_argument("--forms", default="", help="wkv section: comma-separated forms (default: all)")
    p.add_argument("--remat", default="auto", choices=("auto", "on", "off"),
                   help="train: auto tries without remat and retries with it on error (e.g. out of memory)")
    p.add_argument("--repeats", type=int, default=3 if SMALL else 5)
    args = p.parse_args()
    {"check": section_check, "wkv": section_wkv, "train": section_train, "decode": section_decode,
     "table": section_table}[args.section](args)


if __name__ == "__main__":
    main()
