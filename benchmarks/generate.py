"""Benchmark generation on one machine, in one run: prefill (parallel mode) and decode (RNN mode) tokens/s
of rwkv_jax, the official `rwkv` pip package (torch, 'cpu fp32') and HF transformers' RwkvForCausalLM, all
on the same random fp32 weights of the 169M shape (12 x 768, vocab 50277), with ratios; and rwkv_jax's
decode latency at position 4000 over that at position 10 (an RNN: about 1). With --version=7, the RWKV-7
(x070) model of the same shape (the 168M Pile model's, head size 64) against the official package's
RWKV_x070 (RWKV_V7_ON=1); HF transformers has no RWKV-7.

    python benchmarks/generate.py                   # prefill 512 tokens, decode 64 (batch 1 and 16)
    python benchmarks/generate.py --version=7       # RWKV-7, against the official package
    python benchmarks/generate.py --quick           # tiny shapes, a smoke run
    python benchmarks/generate.py --prefill_len=1024 --decode_tokens=128 --long_pos=8000

Timings are the median of --repeats runs after a warm-up run (compilation excluded); the torch peers, which
need no compilation and are slow, get a short warm-up and --peer_repeats runs. Decode is greedy, a
fresh state per run. rwkv_jax decodes inside one jitted loop (`rwkv_jax.infer.generation`, no streaming callback);
the peers decode one Python call per token, as their APIs do. The official package has no batch dimension,
so its batch-16 decode is not measured. The torch peers run with the faster of 1
thread and all cores (measured first; --torch_threads fixes it), as oversubscribed OpenMP threads are slow.
"""

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", type=int, default=4, choices=(4, 7), help="the RWKV generation")
    p.add_argument("--vocab", type=int, default=50277)
    p.add_argument("--d_model", type=int, default=768)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--prefill_len", type=int, default=512)
    p.add_argument("--decode_tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="the larger decode batch")
    p.add_argument("--short_pos", type=int, default=10)
    p.add_argument("--long_pos", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per rwkv_jax measurement")
    p.add_argument("--peer_repeats", type=int, default=1,
                   help="timed runs per peer measurement (after a short warm-up run; the peers are slow)")
    p.add_argument("--peers", default="official,hf", help="comma-separated subset of official,hf ('' for none)")
    p.add_argument("--torch_threads", type=int, default=0,
                   help="torch threads for the peers (0: the faster of 1 and all cores, measured)")
    p.add_argument("--quick", action="store_true", help="tiny model and lengths (smoke test)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.version == 7:
        args.peers = ",".join(p for p in args.peers.split(",") if p != "hf")  # no RWKV-7 in transformers
    if args.quick:
        args.vocab, args.d_model, args.n_layer = 300, 64, 2
        args.prefill_len, args.decode_tokens, args.batch, args.long_pos, args.repeats = 64, 8, 4, 200, 1
    return args


# RWKV-7's per-channel vectors: ranges like a trained model's (decays over their whole range)
_X070_RANGES = {"w0": (-6, 2), "a0": (-1, 1), "v0": (-0.5, 1.5), "k_k": (0.75, 0.95), "k_a": (0.9, 1.1)}


def random_official_tensors(vocab, d_model, n_layer, seed=0, version=4) -> dict[str, np.ndarray]:
    """Official-named fp32 tensors, every one random in a realistic range (the official inits zero several
    matrices, which would make the work unrepresentative)."""
    from rwkv_jax.model import ModelConfig, family
    rng = np.random.default_rng(seed)
    config = ModelConfig(version=version, vocab_size=vocab, d_model=d_model, n_layer=n_layer)
    out = {}
    for name, (_, _, shape) in family(version).weights_layout(config).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _X070_RANGES:
            x = rng.uniform(*_X070_RANGES[leaf], shape)
        elif re.fullmatch(r"x_[rwkvag]", leaf):
            x = rng.uniform(0, 1, shape)
        elif leaf == "r_k":
            x = 0.1 * rng.standard_normal(shape)
        elif re.fullmatch(r"[wavg][12]", leaf):  # LoRA matrices: small
            x = 0.3 * rng.standard_normal(shape) / np.sqrt(shape[0])
        elif name.endswith("time_decay"):
            x = rng.uniform(-3, 1, shape)
        elif name.endswith("time_first"):
            x = rng.standard_normal(shape)
        elif "time_mix" in name:
            x = rng.uniform(0, 1, shape)
        elif len(shape) == 1:  # LayerNorm
            x = (1.0 if name.endswith("weight") else 0.0) + 0.2 * rng.standard_normal(shape)
        else:
            x = rng.standard_normal(shape, np.float32) / np.sqrt(shape[-1]) * (3.0 if name == "emb.weight" else 1.0)
        out[name] = np.asarray(x, np.float32)
    return out


def timed(fn, repeats, warmup=None):
    (warmup or fn)()  # warm-up (compilation, first-call allocations)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_jax(tensors, args, prompt, results):
    from rwkv_jax.infer import generation as gen_lib
    from rwkv_jax.io.weights import model_from_official
    from rwkv_jax.model import state_rows
    model = model_from_official(tensors)
    T, N, B = args.prefill_len, args.decode_tokens, args.batch
    state = logits = None

    def prefill():
        nonlocal state, logits
        state, logits = gen_lib.prefill(model, [prompt], chunk=T)
        jax.block_until_ready(logits)
    results["prefill"]["rwkv_jax"] = T / timed(prefill, args.repeats)

    def decode(st, lg):
        rows = state_rows(st)
        return lambda: gen_lib.generate_tokens(model, [[]] * rows, state=st, logits=lg, max_new_tokens=N,
                                               temperature=0, stop_at_eot=False)
    results["decode_b1"]["rwkv_jax"] = N / timed(decode(state, logits), args.repeats)
    state_B = jax.tree.map(lambda x: jnp.repeat(x, B, axis=1), state)
    results[f"decode_b{B}"]["rwkv_jax"] = B * N / timed(decode(state_B, jnp.repeat(logits, B, axis=0)), args.repeats)
    # latency per decoded token after short_pos and after long_pos prompt tokens; the two are timed in
    # alternation (median of 2 x repeats each) so that a change in the machine's load hits both alike
    rng = np.random.default_rng(1)
    runs = {}
    for pos in (args.short_pos, args.long_pos):
        chunk = min(T, pos) if pos % min(T, pos) == 0 else pos // -(-pos // T)  # few distinct shapes to compile
        st, lg = gen_lib.prefill(model, [rng.integers(0, args.vocab, pos).tolist()], chunk=chunk)
        runs[pos] = decode(st, lg)
        runs[pos]()  # warm-up
    times = {pos: [] for pos in runs}
    for _ in range(2 * args.repeats):
        for pos, run in runs.items():
            times[pos] += _time_calls(run, 1)
    results["latency"] = {pos: statistics.median(t) / N for pos, t in times.items()}


def pick_torch_threads(step, args, name, results):
    """Set torch's thread count to the faster of 1 and all cores for `step` (a few timed calls each): on a
    machine shared with other jobs, torch's OpenMP threads can run several times slower than one thread."""
    import torch
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    else:
        best = None
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            step()
            t = statistics.median(_time_calls(step, 3))
            if best is None or t < best[0]:
                best = (t, threads)
        torch.set_num_threads(best[1])
    results.setdefault("torch_threads", {})[name] = torch.get_num_threads()


def _time_calls(fn, n):
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench_official(pth, args, prompt, results):
    import torch
    if args.version == 7:
        os.environ["RWKV_V7_ON"] = "1"  # before the package is imported: its x070 class
    from rwkv import model as official
    if args.version == 7:
        model = official.RWKV_x070(model=str(pth).removesuffix(".pth"), strategy="cpu fp32")
    else:
        model = official.RWKV(model=str(pth), strategy="cpu fp32", verbose=False)
    T, N = args.prefill_len, args.decode_tokens
    holder = {}
    with torch.no_grad():
        holder["out"], holder["state"] = model.forward(prompt[:4], None)

    def decode(n):
        def run():
            with torch.no_grad():
                out, state = holder["out"], [s.clone() for s in holder["state"]]
                for _ in range(n):
                    out, state = model.forward([int(out.argmax())], state)
        return run

    def prefill():
        with torch.no_grad():
            holder["out"], holder["state"] = model.forward(prompt, None)
    pick_torch_threads(decode(1), args, "official", results)
    results["prefill"]["official"] = T / timed(prefill, args.peer_repeats, lambda: model.forward(prompt[:8], None))
    results["decode_b1"]["official"] = N / timed(decode(N), args.peer_repeats, decode(2))


def bench_hf(hf_dir, args, prompt, results):
    import torch
    from transformers import RwkvForCausalLM
    model = RwkvForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    T, N, B = args.prefill_len, args.decode_tokens, args.batch
    holder = {}
    with torch.no_grad():
        holder["out"] = model(torch.tensor([prompt[:4]]), use_cache=True)

    def decode(rows, n):
        def run():
            with torch.no_grad():
                out = holder["out"]
                logits = out.logits[:, -1].repeat(rows, 1)
                state = [s.repeat_interleave(rows, dim=0) for s in out.state]  # copies: HF updates in place
                for _ in range(n):
                    token = logits.argmax(-1, keepdim=True)
                    out = model(token, state=state, use_cache=True)
                    logits, state = out.logits[:, -1], out.state
        return run

    def prefill():
        with torch.no_grad():
            holder["out"] = model(torch.tensor([prompt]), use_cache=True)
    pick_torch_threads(decode(1, 1), args, "hf", results)
    results["prefill"]["hf"] = T / timed(prefill, args.peer_repeats,
                                        lambda: model(torch.tensor([prompt[:8]]), use_cache=True))
    results["decode_b1"]["hf"] = N / timed(decode(1, N), args.peer_repeats, decode(1, 2))
    results[f"decode_b{B}"]["hf"] = B * N / timed(decode(B, N), args.peer_repeats, decode(B, 2))


def main(argv=None):
    args = parse_args(argv)
    import torch

    from rwkv_jax.io import weights
    start = time.time()
    tensors = random_official_tensors(args.vocab, args.d_model, args.n_layer, version=args.version)
    n_params = sum(x.size for x in tensors.values())
    prompt = np.random.default_rng(0).integers(0, args.vocab, args.prefill_len).tolist()
    B = args.batch
    results = {"prefill": {}, "decode_b1": {}, f"decode_b{B}": {}}
    peers = [p for p in args.peers.split(",") if p]
    print(f"RWKV-{args.version}, {n_params / 1e6:.1f}M parameters ({args.n_layer} x {args.d_model}, vocab "
          f"{args.vocab}), fp32; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU threads", flush=True)
    bench_jax(tensors, args, prompt, results)
    print(f"  rwkv_jax done ({time.time() - start:.0f}s): {results}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "official" in peers:
            weights.write_pth(tensors, Path(tmp) / "model.pth")
            bench_official(Path(tmp) / "model.pth", args, prompt, results)
            print(f"  official rwkv done ({time.time() - start:.0f}s): {results}", flush=True)
        if "hf" in peers:
            weights.write_hf_dir(tensors, Path(tmp) / "hf")
            bench_hf(Path(tmp) / "hf", args, prompt, results)
            print(f"  HF transformers done ({time.time() - start:.0f}s)", flush=True)

    def cell(x):
        return f"{x:,.1f}" if x is not None else "n/a"

    def ratio(row, peer):
        a, b = results[row].get("rwkv_jax"), results[row].get(peer)
        return f"{a / b:.2f}x" if a and b else "n/a"
    rows = [("prefill", f"prefill tokens/s ({args.prefill_len} tokens, batch 1)"),
            ("decode_b1", f"decode tokens/s (batch 1, {args.decode_tokens} tokens)"),
            (f"decode_b{B}", f"decode tokens/s (batch {B}, {args.decode_tokens} steps)")]
    head = ["", "rwkv_jax", "rwkv (official)", "HF transformers", "jax / official", "jax / HF"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in rows:
        r = results[key]
        lines.append(f"| {label} | {cell(r.get('rwkv_jax'))} | {cell(r.get('official'))} | {cell(r.get('hf'))} | "
                     f"{ratio(key, 'official')} | {ratio(key, 'hf')} |")
    lat = results["latency"]
    print()
    print("\n".join(lines))
    print(f"\nrwkv_jax decode latency (batch 1): {lat[args.short_pos] * 1e3:.2f} ms/token at position "
          f"{args.short_pos}, {lat[args.long_pos] * 1e3:.2f} ms/token at position {args.long_pos}: "
          f"ratio {lat[args.long_pos] / lat[args.short_pos]:.3f}")
    print(f"torch threads (peers): {results.get('torch_threads', {})}; jax: XLA's CPU thread pool")
    print(f"(total {time.time() - start:.0f}s)")
    results["n_params"] = int(n_params)
    results["vocab"], results["d_model"] = args.vocab, args.d_model
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
