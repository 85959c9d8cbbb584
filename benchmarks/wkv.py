"""Benchmark the WKV forms x unroll: forward and forward+backward time, each jitted, in one process.

    python benchmarks/wkv.py                      # B=8, T=1024, C=768 fp32; sequential unroll 1..16,
                                                  # parallel, chunked L=32, a scan of wkv_step
    python benchmarks/wkv.py --version=7          # WKV-7 (ops/wkv7.py), 12 heads of 64: sequential,
                                                  # chunked L=16,32,64, a scan of wkv7_step
    python benchmarks/wkv.py --quick              # tiny shapes, a smoke run
    python benchmarks/wkv.py -B 4 -T 2048 -C 1024 --unrolls 1,4 --chunk-lens 32 --rounds 3 --repeats 10
    python benchmarks/wkv.py --resets 0.01        # each form also with document resets at 1% of positions

Steady state is the median of `--repeats` calls, each ended with `block_until_ready`, in wall time and in
process CPU time (the steadier figure on a shared machine); with `--rounds` > 1
every row is measured once per round, rounds interleaved (so a load change hits all rows alike), and the
table shows the fastest round. Compile time is the first call (trace + compile + one run) minus the steady
state. Ratios are to `--baseline` (default: the form and unroll that form='auto' uses here), so >1 is
slower. The last lines name the fastest row and the default. Runs on whatever backend JAX picks; nothing
here assumes CPU. The load average is printed before and after: on a shared machine, compare only rows of
one run.
"""

import argparse
import functools
import inspect
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.model import ModelConfig, family
from rwkv_jax.ops import wkv7 as wkv7_ops
from rwkv_jax.ops.wkv4 import default_form, empty_state, wkv_chunked, wkv_parallel, wkv_sequential, wkv_step

DEFAULT_UNROLL = inspect.signature(wkv_sequential).parameters["unroll"].default
ROW_FORMS = ("sequential", "parallel", "chunked", "scan")
ROW_FORMS_7 = ("sequential", "chunked", "scan")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", type=int, default=4, choices=(4, 7), help="the RWKV generation's WKV")
    parser.add_argument("--head-size", type=int, default=64, help="RWKV-7: channels per head")
    parser.add_argument("-B", "--batch", type=int, default=8)
    parser.add_argument("-T", "--seq-len", type=int, default=1024)
    parser.add_argument("-C", "--channels", type=int, default=768)
    parser.add_argument("--forms", default=None,
                        help="comma-separated rows: sequential, parallel, chunked, and 'scan' (a lax.scan over "
                             "wkv_step differentiated by JAX's autodiff: the recurrence without the "
                             "hand-written backward); default all of them (RWKV-7: sequential, chunked, "
                             "scan)")
    parser.add_argument("--unrolls", default="1,2,4,8,16", help="unroll values of the sequential form")
    parser.add_argument("--chunk-lens", default=None,
                        help="chunk lengths of the chunked form, e.g. 16,32,64 (default 32; RWKV-7: 16,32,64)")
    parser.add_argument("--baseline", default=None,
                        help="row name the ratios are taken to (default: what form='auto' runs here)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steady-state calls per measurement")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the fastest is shown")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of k, v")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resets", type=float, default=0.0,
                        help="> 0: also run each form (but the scan of wkv_step) with document resets at this "
                             "fraction of positions (random), as rows of their own")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: B=2 T=64 C=32, unrolls 1 and the default, chunk length 16, 3 repeats")
    args = parser.parse_args(argv)
    if not 0 <= args.resets < 1:
        parser.error(f"--resets is a fraction of positions in [0, 1), got {args.resets}")
    seven = args.version == 7
    args.forms = args.forms or ",".join(ROW_FORMS_7 if seven else ROW_FORMS)
    args.chunk_lens = args.chunk_lens or ("16,32,64" if seven else "32")
    if args.quick:
        args.batch, args.seq_len, args.channels, args.repeats = 2, 64, 2 * args.head_size if seven else 32, 3
        args.unrolls, args.chunk_lens = f"1,{DEFAULT_UNROLL}", "16,32" if seven else "16"
    if seven and (args.head_size < 1 or args.channels % args.head_size):
        parser.error(f"--channels={args.channels} must be a multiple of --head-size={args.head_size}")
    for name in ("batch", "seq_len", "channels", "repeats", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    known = ROW_FORMS_7 if seven else ROW_FORMS
    unknown = [form for form in names(args.forms) if form not in known]
    if unknown:
        parser.error(f"unknown --forms {unknown}: choose from {', '.join(known)}")
    try:
        row_names = [name for name, _ in rows_to_run(args)]
    except ValueError as error:
        parser.error(f"--unrolls and --chunk-lens take comma-separated integers >= 1: {error}")
    args.baseline = args.baseline or default_row_name(args.version)
    if args.baseline not in row_names:
        parser.error(f"--baseline {args.baseline!r} is not among the rows {row_names}: pass --baseline "
                     "or include its form in --forms")
    return args


def names(text):
    return [x.strip() for x in text.split(",") if x.strip()]


def int_list(text):
    values = [int(x) for x in names(text)]
    if any(value < 1 for value in values):
        raise ValueError(f"got {text!r}")
    return values


def _scan_over_time(step, state, streams_BT):
    """`step(state, *inputs at t) -> (y_t, state)` as a `lax.scan` over time-major copies of [B, T, ...]
    streams: (y [B, T, ...], final state), for autodiff."""
    def body(state, xs):
        y, state = step(state, *xs)
        return state, y
    state, y_T = jax.lax.scan(body, state, tuple(x.swapaxes(0, 1) for x in streams_BT))
    return y_T.swapaxes(0, 1), state


def scan_of_steps(time_decay, time_first, k_BTC, v_BTC):
    """The recurrence as a scan over `wkv_step`."""
    return _scan_over_time(lambda state, k, v: wkv_step(time_decay, time_first, k, v, state),
                           empty_state(k_BTC.shape[0], k_BTC.shape[2]), (k_BTC, v_BTC))


def scan_of_steps_7(r, w, k, v, a, b):
    """WKV-7 as a scan over `wkv7_step`."""
    B, _, H, N = r.shape
    y, state = _scan_over_time(lambda state, *xs: wkv7_ops.wkv7_step(*xs, state),
                               jnp.zeros((B, H, N, N), jnp.float32), (r, w, k, v, a, b))
    return y.astype(v.dtype), state


def rows_to_run(args):
    """[(row name, fn(*inputs) -> (y, state))] in table order; inputs as `make_inputs` gives them."""
    if args.version == 7:
        return rows_to_run_7(args)
    rows = []
    for form in names(args.forms):
        if form == "sequential":
            rows += [(f"sequential unroll={u}", functools.partial(wkv_sequential, unroll=u))
                     for u in int_list(args.unrolls)]
        elif form == "parallel":
            rows.append(("parallel", wkv_parallel))
        elif form == "chunked":
            rows += [(f"chunked L={L}", functools.partial(wkv_chunked, chunk_len=L)) for L in int_list(args.chunk_lens)]
        elif form == "scan":
            rows.append(("scan of wkv_step (autodiff)", scan_of_steps))
    return rows


def rows_to_run_7(args):
    rows = []
    for form in names(args.forms):
        if form == "sequential":
            rows.append(("sequential", wkv7_ops.wkv7_sequential))
        elif form == "chunked":
            rows += [(f"chunked L={L}", functools.partial(wkv7_ops.wkv7_chunked, chunk_len=L))
                     for L in int_list(args.chunk_lens)]
        elif form == "scan":
            rows.append(("scan of wkv7_step (autodiff)", scan_of_steps_7))
    return rows


def default_row_name(version=4):
    """The row the models run on this backend with model.wkv_form='auto' and the default chunk length."""
    if version == 7:
        form = family(7).default_wkv_form(jax.default_backend())
        return f"chunked L={ModelConfig.wkv_chunk_len}" if form == "chunked" else form
    form = default_form()
    return f"sequential unroll={DEFAULT_UNROLL}" if form == "sequential" else form


def make_inputs(B, T, C, dtype, seed):
    """(inputs, y cotangent). Realistic RWKV-4 ranges: raw time_decay in [-5, 1] (w = -exp(time_decay)),
    time_first ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    time_decay = jnp.asarray(rng.uniform(-5.0, 1.0, C), jnp.float32)
    time_first = jnp.asarray(rng.normal(size=C), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, C)), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, C)), dtype)
    y_cotangent = jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32)
    return (time_decay, time_first, k, v), y_cotangent


def make_inputs_7(B, T, C, head_size, dtype, seed):
    """(inputs (r, w, k, v, a, b) [B, T, H, N], y cotangent) in the ranges the RWKV-7 model makes: w =
    exp(-e^-0.5 sigmoid(x)) over its whole range (0.545, 1), a = -kk and b = kk * iclr with kk unit-norm
    per head and iclr = sigmoid(x)."""
    rng = np.random.default_rng(seed)
    shape = (B, T, C // head_size, head_size)
    normal = lambda: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    w = np.exp(-np.exp(-0.5) * sigmoid(3 * normal()))
    kk = normal()
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    r, k, v = normal(), normal(), normal()
    inputs = tuple(jnp.asarray(x, dtype) for x in (r, w, k, v, -kk, kk * sigmoid(normal())))
    return inputs, jnp.asarray(normal())


def time_call(fn, args, repeats):
    """(first call seconds, median steady-state seconds, median process CPU seconds per call, first output).

    CPU time (all threads of this process, user + system) stays near the wall time of a single-threaded
    loop on a quiet machine and, unlike wall time, barely grows when other processes share the cores."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return first, statistics.median(times), statistics.median(cpu_times), out


def compile_row(run):
    """Jitted forward and forward+backward (gradients into every input: time_decay, time_first, k, v; or
    RWKV-7's r, w, k, v, a, b) of one row."""
    @jax.jit
    def forward(inputs):
        return run(*inputs)

    @jax.jit
    def forward_backward(inputs, y_cotangent):
        def loss(inputs):
            y, _ = run(*inputs)
            return jnp.sum(y.astype(jnp.float32) * y_cotangent)
        return jax.value_and_grad(loss)(inputs)

    return forward, forward_backward


def measure(fns, inputs, repeats):
    forward, forward_backward = fns
    inputs, y_cotangent = inputs
    fwd_first, fwd, fwd_cpu, (y, _) = time_call(forward, (inputs,), repeats)
    bwd_first, bwd, bwd_cpu, _ = time_call(forward_backward, (inputs, y_cotangent), repeats)
    return dict(compile_fwd=fwd_first - fwd, fwd=fwd, fwd_cpu=fwd_cpu, compile_bwd=bwd_first - bwd, bwd=bwd,
                bwd_cpu=bwd_cpu, y=y)


def load():
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def print_table(lines):
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for i, line in enumerate(lines):
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")


def main(argv=None):
    args = parse_args(argv)
    B, T, C = args.batch, args.seq_len, args.channels
    device = jax.devices()[0]
    print(f"jax {jax.__version__} | backend {jax.default_backend()} | device {device.device_kind} "
          f"(x{jax.device_count()}, timing on {device}) | {os.cpu_count()} CPUs | {load()}")
    what = f"RWKV-7, {C // args.head_size} heads of {args.head_size}, inputs" if args.version == 7 else "k,v"
    print(f"B={B} T={T} C={C} {what} dtype={args.dtype} | median of {args.repeats} calls, "
          f"best of {args.rounds} round(s)")

    rows = rows_to_run(args)
    if args.resets:  # the same forms with a reset mask: the cost of document resets (config.data.reset_at_eot)
        reset_BT = jnp.asarray(np.random.default_rng(args.seed + 1).random((B, T)) < args.resets)
        rows += [(f"{name} + resets {args.resets:g}", functools.partial(run, reset_BT=reset_BT))
                 for name, run in rows if run not in (scan_of_steps, scan_of_steps_7)]
    baseline = args.baseline
    inputs = (make_inputs_7(B, T, C, args.head_size, jnp.dtype(args.dtype), args.seed) if args.version == 7
              else make_inputs(B, T, C, jnp.dtype(args.dtype), args.seed))
    compiled = {name: compile_row(run) for name, run in rows}
    results: dict = {}
    for round_index in range(args.rounds):
        for name, _ in rows:
            if isinstance(results.get(name), Exception):
                continue
            try:
                r = measure(compiled[name], inputs, args.repeats)
            except Exception as error:  # e.g. out of memory at a large chunk length: report and go on
                results[name] = error
                continue
            best = results.get(name)
            if best is None:
                results[name] = r
            else:  # keep the fastest round of each; compile times are those of the first round
                for key in ("fwd", "bwd", "fwd_cpu", "bwd_cpu"):
                    best[key] = min(best[key], r[key])
            print(f"  round {round_index + 1}: {name}: fwd {r['fwd'] * 1e3:.1f} ms (cpu {r['fwd_cpu'] * 1e3:.1f}), "
                  f"fwd+bwd {r['bwd'] * 1e3:.1f} ms (cpu {r['bwd_cpu'] * 1e3:.1f}) | {load()}", flush=True)

    base = results.get(baseline)
    base = None if isinstance(base, Exception) else base
    header = ("row", "fwd ms", "fwd / base", "fwd+bwd ms", "fwd+bwd / base", "fwd cpu ms", "fwd+bwd cpu ms",
              "compile fwd s", "compile fwd+bwd s")
    lines = [header]
    for name, r in results.items():
        if isinstance(r, Exception):
            lines.append((name, f"failed: {type(r).__name__}: {str(r).splitlines()[0][:80]}")
                         + ("",) * (len(header) - 2))
            continue
        ratio = (lambda key: f"{r[key] / base[key]:.2f}") if base else (lambda key: "-")
        lines.append((name + (" (base)" if name == baseline else ""), f"{r['fwd'] * 1e3:.1f}", ratio("fwd"),
                      f"{r['bwd'] * 1e3:.1f}", ratio("bwd"), f"{r['fwd_cpu'] * 1e3:.1f}", f"{r['bwd_cpu'] * 1e3:.1f}",
                      f"{r['compile_fwd']:.2f}", f"{r['compile_bwd']:.2f}"))
    print()
    print_table(lines)
    print(f"\n{load()}")
    print("ms: median wall time per call, fastest round; cpu ms: process CPU time per call (all threads). "
          "compile = first call (trace + compile + run) - median steady-state run.")

    ok = {name: r for name, r in results.items() if not isinstance(r, Exception)}
    if ok:
        def fastest(key):
            return min(ok, key=lambda name: ok[name][key])
        print(f"fastest forward+backward: {fastest('bwd')} (wall), {fastest('bwd_cpu')} (CPU time); "
              f"fastest forward: {fastest('fwd')} (wall), {fastest('fwd_cpu')} (CPU time)")
        print("(CPU time adds up all threads: it favours single-threaded rows; on a quiet machine trust wall time)")
    print(f"default here (form='auto' on {jax.default_backend()}): {default_row_name(args.version)}")
    if base:  # sanity: every row computes the same y
        def max_diff(y):
            return float(jnp.max(jnp.abs(y.astype(jnp.float32) - base["y"].astype(jnp.float32))))
        print("max |y - y_base|: " + ", ".join(f"{name}: {max_diff(r['y']):.1e}" for name, r in ok.items()
                                               if name != baseline and "+ resets" not in name))
    if args.json:
        import json
        row = lambda name: {"label": name, "fwd_ms": 1e3 * ok[name]["fwd"], "fwdbwd_ms": 1e3 * ok[name]["bwd"]}  # noqa: E731
        reference = "scan" if "scan" in ok else next(iter(ok))
        with open(args.json, "w") as f:
            json.dump({"shape": [B, T, C], "rows": [row(name) for name in ok],
                       "default": row(default_row_name(args.version)),
                       "baseline": row(reference)}, f, indent=2)


if __name__ == "__main__":
    main()
