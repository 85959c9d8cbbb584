"""Benchmark the WKV forms: forward and forward+backward time, each jitted, in one process.

    python benchmarks/wkv.py                      # B=8, T=1024, C=768, chunked at 32 (+ 16, 64)
    python benchmarks/wkv.py --quick              # tiny shapes, a smoke run
    python benchmarks/wkv.py -B 4 -T 2048 -C 1024 --chunk-len 64 --extra-chunk-lens 32,128 --repeats 20

Compile time is the first call (trace + compile + one run) minus the steady-state time; steady state is the
median of `--repeats` calls, each ended with `block_until_ready`. Ratios are to the sequential form (>1 is
slower). Runs on whatever backend JAX picks (CPU, GPU, TPU); nothing here assumes CPU.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.ops.wkv import wkv


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-B", "--batch", type=int, default=8)
    parser.add_argument("-T", "--seq-len", type=int, default=1024)
    parser.add_argument("-C", "--channels", type=int, default=768)
    parser.add_argument("--chunk-len", type=int, default=32, help="chunk length of the main 'chunked' row")
    parser.add_argument("--extra-chunk-lens", default="16,64",
                        help="comma-separated chunk lengths benchmarked as extra rows ('' for none)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steady-state calls per measurement")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of k, v")
    parser.add_argument("--forms", default="sequential,parallel,chunked",
                        help="comma-separated subset of sequential,parallel,chunked")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 3 repeats (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.channels, args.repeats = 2, 64, 32, 3
    return args


def make_inputs(B, T, C, dtype, seed):
    """Realistic RWKV-4 ranges: raw time_decay in [-5, 1] (w = -exp(time_decay)), time_first ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    time_decay = jnp.asarray(rng.uniform(-5.0, 1.0, C), jnp.float32)
    time_first = jnp.asarray(rng.normal(size=C), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, C)), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, C)), dtype)
    y_cotangent = jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32)
    return time_decay, time_first, k, v, y_cotangent


def time_call(fn, args, repeats):
    """(first call seconds, median steady-state seconds, first output)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def benchmark_form(form, chunk_len, inputs, repeats):
    time_decay, time_first, k, v, y_cotangent = inputs
    run = functools.partial(wkv, form=form, chunk_len=chunk_len)

    @jax.jit
    def forward(time_decay, time_first, k, v):
        return run(time_decay, time_first, k, v)

    @jax.jit
    def forward_backward(time_decay, time_first, k, v, y_cotangent):
        def loss(time_decay, time_first, k, v):
            y, _ = run(time_decay, time_first, k, v)
            return jnp.sum(y.astype(jnp.float32) * y_cotangent)
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(time_decay, time_first, k, v)

    fwd_first, fwd, (y, _) = time_call(forward, (time_decay, time_first, k, v), repeats)
    bwd_first, bwd, _ = time_call(forward_backward, (time_decay, time_first, k, v, y_cotangent), repeats)
    return dict(compile_fwd=fwd_first - fwd, fwd=fwd, compile_bwd=bwd_first - bwd, bwd=bwd, y=y)


def main(argv=None):
    args = parse_args(argv)
    B, T, C = args.batch, args.seq_len, args.channels
    device = jax.devices()[0]
    print(f"jax {jax.__version__} | backend {jax.default_backend()} | device {device.device_kind} "
          f"(x{jax.device_count()}, timing on {device})")
    print(f"B={B} T={T} C={C} k,v dtype={args.dtype} repeats={args.repeats} (median)")

    rows = []
    for form in [f.strip() for f in args.forms.split(",") if f.strip()]:
        if form == "chunked":
            extra = [int(x) for x in args.extra_chunk_lens.split(",") if x.strip()]
            rows += [("chunked", L) for L in [args.chunk_len] + [L for L in extra if L != args.chunk_len]]
        else:
            rows.append((form, args.chunk_len))

    inputs = make_inputs(B, T, C, jnp.dtype(args.dtype), args.seed)
    results = {}
    for form, chunk_len in rows:
        name = f"chunked L={chunk_len}" if form == "chunked" else form
        try:
            results[name] = benchmark_form(form, chunk_len, inputs, args.repeats)
        except Exception as error:  # e.g. out of memory at a large chunk length: report and go on
            results[name] = error
        print(f"  done: {name}", flush=True)

    base = results.get("sequential")
    base = None if isinstance(base, Exception) else base
    header = ("form", "compile fwd s", "fwd ms", "fwd / seq", "compile fwd+bwd s", "fwd+bwd ms", "fwd+bwd / seq")
    lines = [header]
    for name, r in results.items():
        if isinstance(r, Exception):
            lines.append((name, f"failed: {type(r).__name__}: {str(r).splitlines()[0][:80]}", "", "", "", "", ""))
            continue
        fwd_ratio = f"{r['fwd'] / base['fwd']:.2f}" if base else "-"
        bwd_ratio = f"{r['bwd'] / base['bwd']:.2f}" if base else "-"
        lines.append((name, f"{r['compile_fwd']:.2f}", f"{r['fwd'] * 1e3:.1f}", fwd_ratio,
                      f"{r['compile_bwd']:.2f}", f"{r['bwd'] * 1e3:.1f}", bwd_ratio))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for i, line in enumerate(lines):
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")

    print("\ncompile = first call (trace + compile + run) - median steady-state run; where a run takes longer than "
          "the compile, values near 0 (even negative) are within run-to-run noise.")
    if base:  # sanity: every form computes the same y
        def max_diff(y):
            return float(jnp.max(jnp.abs(y.astype(jnp.float32) - base["y"].astype(jnp.float32))))
        diffs = ", ".join(f"{name}: {max_diff(r['y']):.1e}" for name, r in results.items()
                          if name != "sequential" and not isinstance(r, Exception))
        print(f"max |y - y_sequential|: {diffs}")


if __name__ == "__main__":
    main()
