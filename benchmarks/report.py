"""One performance table for this machine: every benchmark in benchmarks/, each figure beside its peer's,
the ratio, and the limit it is measured against (FLOPs over the probed matmul peak, bytes over the
probed memory bandwidth; both probed here, in this process).

    python benchmarks/report.py                 # the full table (about 20 minutes on 2 CPU cores)
    python benchmarks/report.py --quick         # small shapes, a smoke run

Each benchmark runs in its own process (`python benchmarks/X.py ... --json FILE`) so that one's memory
and threads do not disturb the next. Writes the table as Markdown into docs/performance.md, between the
lines `<!-- report.py: begin -->` and `<!-- report.py: end -->` (the rest of the page is kept), headed by
the date, the machine (CPU model, cores, memory) and the commit; a --quick run leaves the page alone unless
--doc names it. Also writes benchmarks/results/<host>.json (every figure), <host>.md (the table) and
<host>.png (each figure as a fraction of its limit), and prints the table.
Run it on a quiet machine: the load average is recorded beside the figures.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- report.py: begin -->", "<!-- report.py: end -->"


def run(script: str, *flags: str) -> dict:
    """Run benchmarks/<script> with --json and return what it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, str(HERE / script), *flags, f"--json={out}"]
        print(f"$ {' '.join(cmd[1:])}", flush=True)
        start = time.time()
        result = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
        if result.returncode != 0 or not out.exists():
            print(result.stdout[-2000:], result.stderr[-3000:], sep="\n")
            raise RuntimeError(f"{script} failed (exit {result.returncode})")
        print(f"  done in {time.time() - start:.0f}s", flush=True)
        return json.loads(out.read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes: check that everything runs")
    p.add_argument("--out", default=str(HERE / "results"), help="directory for <host>.json and <host>.png")
    p.add_argument("--rescore", default="", help="a <host>.json of an earlier run: keep its figures, probe the "
                   "ceilings again and rewrite the table (after a change of probe)")
    p.add_argument("--doc", default=None, help="the Markdown page whose report.py section gets the table "
                   f"(default: {DOC.relative_to(ROOT)}; a --quick run writes it only when this is given)")
    args = p.parse_args(argv)

    sys.path.insert(0, str(HERE))
    import jax
    import probes
    load_before = os.getloadavg()
    peak, bandwidth = probes.matmul_flops(), probes.memory_bandwidth()
    xla_bandwidth = probes.xla_elementwise_bandwidth()
    print(f"probed: matmul {peak / 1e9:.1f} GFLOP/s, memory {bandwidth / 1e9:.1f} GB/s (in place; XLA's pass into "
          f"fresh buffers {xla_bandwidth / 1e9:.1f} GB/s); load {load_before}", flush=True)
    if args.rescore:
        return _rescore(json.loads(Path(args.rescore).read_text()), peak, bandwidth, xla_bandwidth, args)

    rows = []  # (group, figure, ours, peer, peer name, unit, limit, limit basis)

    def add(group, figure, ours, unit, peer=None, peer_name="", limit=None, basis=""):
        rows.append({"group": group, "figure": figure, "ours": ours, "unit": unit, "peer": peer,
                     "peer_name": peer_name, "limit": limit, "basis": basis})

    # --- WKV ---------------------------------------------------------------------------------------
    B, T, C = (2, 256, 128) if args.quick else (8, 1024, 768)
    wkv = run("wkv.py", f"--batch={B}", f"--seq-len={T}", f"--channels={C}", "--forms=sequential,parallel,scan",
              "--unrolls=1,2", "--rounds=2")
    wkv_bytes_fwd = 3 * B * T * C * 4           # read k, v; write y
    wkv_bytes_bwd = wkv_bytes_fwd + 5 * B * T * C * 4  # and read k, v, dy; write dk, dv
    best = wkv["default"]
    add("WKV", f"forward, {best['label']} (CPU default), B={B} T={T} C={C}", best["fwd_ms"], "ms",
        peer=wkv["baseline"]["fwd_ms"], peer_name=wkv["baseline"]["label"],
        limit=1e3 * wkv_bytes_fwd / bandwidth, basis="bytes (k, v in; y out) / bandwidth")
    add("WKV", f"forward+backward, {best['label']}", best["fwdbwd_ms"], "ms",
        peer=wkv["baseline"]["fwdbwd_ms"], peer_name=wkv["baseline"]["label"],
        limit=1e3 * wkv_bytes_bwd / bandwidth, basis="bytes (k, v, dy in; y, dk, dv out) / bandwidth")

    # --- Training step -------------------------------------------------------------------------------
    # 169M as configs/169m.py lays it out (scan_layers='auto': a list of layers on CPU, stacked and scanned on
    # GPU/TPU), and once at B=1 T=128 the other way: what the stacked layout costs or saves here.
    other = "on" if jax.default_backend() == "cpu" else "off"
    shapes = [("tiny", "16", "128", "config")] if args.quick else [
        ("tiny", "16", "128", "config"), ("169m", "1", "128", "config"), ("169m", "1", "128", other),
        ("169m", "2", "512", "config"), ("169m", "1", "1024", "config")]
    for name, batch, seq, scan in shapes:
        flags = [f"--shapes={name}", f"--peak-flops={peak}", f"--scan-layers={scan}"]
        flags += [f"--tiny-batch={batch}", f"--tiny-seq={seq}"] if name == "tiny" else \
            [f"--big-batch={batch}", f"--big-seq={seq}"]
        if args.quick:
            flags += ["--steps=2", "--warmup=1"]
        r = run("train_step.py", *flags)["rows"]
        ours = next(x for x in r if x["impl"] == "rwkv_jax")
        hf = next((x for x in r if x["impl"] != "rwkv_jax"), None)
        name = {"config": name, "on": f"{name} (layers stacked)", "off": f"{name} (layers unstacked)"}[scan]
        add("train step", f"{name} B={batch} T={seq}: tokens/s (MFU {ours['mfu']:.0%})", ours["tps"], "tokens/s",
            peer=hf["tps"] if hf else None, peer_name="HF transformers",
            limit=ours["tps"] / ours["mfu"] if ours["mfu"] else None, basis="6(VD+13D^2L) FLOPs / matmul peak")
        add("train step", f"{name} B={batch} T={seq}: first step (compile) s", ours["first_s"], "s",
            peer=hf["first_s"] if hf else None, peer_name="HF transformers")

    # --- LoRA against full fine-tuning: the same model and batch, the base frozen (optim.trainable='lora') ---
    name, batch, seq = ("tiny", "16", "128") if args.quick else ("169m", "1", "128")
    size_flags = [f"--tiny-batch={batch}", f"--tiny-seq={seq}"] if name == "tiny" else \
        [f"--big-batch={batch}", f"--big-seq={seq}"]
    both = {x["impl"]: x for x in run("train_step.py", f"--shapes={name}", f"--peak-flops={peak}", "--hf=off",
                                      "--trainable=all,lora", "--lora-rank=16", *size_flags,
                                      *(["--steps=2", "--warmup=1"] if args.quick else []))["rows"]}
    lora, full = both["rwkv_jax LoRA"], both["rwkv_jax"]   # one process, one after the other
    add("train step", f"{name} B={batch} T={seq}: LoRA rank 16 step ms (base frozen)", lora["step_ms"], "ms",
        peer=full["step_ms"], peer_name="full fine-tuning (same process)")

    rwkv7_versus_rwkv4(add, peak, args.quick)

    # --- Where a 169M step goes ----------------------------------------------------------------------
    quick = ["--vocab=4096", "--d_model=128", "--n_layer=4", "--steps=2"] if args.quick else []
    prof = run("profile_step.py", *quick)
    sec, lim = prof["seconds"], prof["limits_s"]
    add("169M step parts", "optimizer update (clip, Adam, apply) ms", 1e3 * sec["update"], "ms",
        limit=1e3 * prof["update_bytes"] / bandwidth, basis="7 x 4 bytes x params / bandwidth")
    for part in ("fwd+bwd", "head+CE", "WKV", "matmuls"):
        add("169M step parts", f"{part} ms ({100 * sec[part] / sec['step']:.0f}% of the step)", 1e3 * sec[part], "ms",
            limit=1e3 * lim[part] if part in lim else None, basis="FLOPs / matmul peak" if part in lim else "")

    # --- Data and generation -------------------------------------------------------------------------
    data = run("data.py", "--seconds=1" if args.quick else "--seconds=3")
    add("data", "batch production, tokens/s (one thread)", data["tokens_per_s"], "tokens/s",
        peer=data["step_tokens_169m"], peer_name="tokens one 169M step needs")
    gen = run("generate.py", *(["--quick"] if args.quick else []))
    # The embedding is a lookup: per token, decode reads (and prefill multiplies by) the other weights.
    n_params = gen["n_params"] - gen.get("vocab", 50277) * gen.get("d_model", 768)
    decode_b1 = gen["decode_b1"]
    add("generate", "decode tokens/s, batch 1", decode_b1["rwkv_jax"], "tokens/s", peer=decode_b1.get("official"),
        peer_name="official rwkv", limit=bandwidth / (4 * n_params),
        basis="read every fp32 weight but the embedding once / bandwidth")
    batch_key = next(k for k in gen if k.startswith("decode_b") and k != "decode_b1")
    add("generate", f"decode tokens/s, batch {batch_key[8:]}", gen[batch_key]["rwkv_jax"], "tokens/s",
        peer=gen[batch_key].get("hf"), peer_name="HF transformers")
    add("generate", "prefill tokens/s", gen["prefill"]["rwkv_jax"], "tokens/s", peer=gen["prefill"].get("official"),
        peer_name="official rwkv", limit=peak / (2 * n_params), basis="2 x (params - embedding) FLOPs / matmul peak")

    # --- Output ----------------------------------------------------------------------------------------
    host = platform.node() or "host"
    meta = {"host": host, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "jax": jax.__version__, "backend": jax.default_backend(), "peak_flops": peak, "bandwidth": bandwidth,
            "xla_elementwise_bandwidth": xla_bandwidth, "load_before": load_before, "load_after": os.getloadavg(),
            "quick": args.quick, **_machine()}
    _write(rows, meta, args)


def rwkv7_versus_rwkv4(add, peak: float, quick: bool) -> None:
    """Issue 28's comparison: the training step of rwkv7_168m against RWKV-4's 169m at B=2 T=512 (--quick:
    the tiny configs at B=2 T=32), both in one train_step.py process, without the HF peer. Rows: RWKV-7's
    tokens/s with RWKV-4's as the peer (the ratio column is RWKV-7 / RWKV-4), each MFU by its own FLOP
    count per token (stated in the figure), and the first step's (compile) time."""
    v4, v7, batch, seq = ("tiny", "rwkv7_tiny", "2", "32") if quick else ("169m", "rwkv7_168m", "2", "512")
    flags = [f"--shapes={v4},{v7}", f"--peak-flops={peak}", "--hf=off"]
    flags += [f"--tiny-batch={batch}", f"--tiny-seq={seq}"] if quick else [f"--big-batch={batch}", f"--big-seq={seq}"]
    if quick:
        flags += ["--steps=2", "--warmup=1"]
    rows = {r["name"]: r for r in run("train_step.py", *flags)["rows"]}
    new, old = rows[v7], rows[v4]
    add("RWKV-7 train step", f"{v7} B={batch} T={seq}: tokens/s (MFU {new['mfu']:.0%} at "
        f"{new['flops_per_token']:.3g} FLOPs/token)", new["tps"], "tokens/s", peer=old["tps"],
        peer_name=f"RWKV-4 {v4}, MFU {old['mfu']:.0%} at {old['flops_per_token']:.3g} FLOPs/token",
        limit=new["tps"] / new["mfu"] if new["mfu"] else None, basis="RWKV-7's FLOPs per token / matmul peak")
    add("RWKV-7 train step", f"{v7} B={batch} T={seq}: first step (compile) s", new["first_s"], "s",
        peer=old["first_s"], peer_name=f"RWKV-4 {v4}")


def _rescore(old: dict, peak, bandwidth, xla_bandwidth, args):
    """The figures of an earlier run against newly probed ceilings: limits from bytes scale with the
    bandwidth, limits from FLOPs with the matmul peak."""
    meta, rows = old["meta"], old["rows"]
    for r in rows:
        if not r.get("limit"):
            continue
        scale = bandwidth / meta["bandwidth"] if "bandwidth" in r["basis"] else peak / meta["peak_flops"]
        r["limit"] = r["limit"] * scale if r["unit"] == "tokens/s" else r["limit"] / scale
    meta.update(peak_flops_rescored=peak, bandwidth=bandwidth, xla_elementwise_bandwidth=xla_bandwidth,
                rescored=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    meta["peak_flops"] = peak
    _write(rows, meta, args)


def _write(rows, meta, args):
    host, peak, bandwidth = meta["host"], meta["peak_flops"], meta["bandwidth"]
    load_before = meta["load_before"]
    lines = [f"{meta['date']}, {host}: {meta['cpus']} CPUs, jax {meta['jax']} ({meta['backend']}); probed matmul "
             f"{peak / 1e9:.1f} GFLOP/s, memory {bandwidth / 1e9:.1f} GB/s (the faster in-place pass of a numpy copy "
             f"and XLA over a donated array; XLA's pass into fresh buffers "
             f"{meta.get('xla_elementwise_bandwidth', 0) / 1e9:.1f} GB/s); load average {load_before[0]:.1f} before, "
             f"{meta['load_after'][0]:.1f} after"
             + (f"; limits re-probed {meta['rescored']}" if 'rescored' in meta else ""),
             "",
             "| group | figure | rwkv_jax | peer | ratio | limit | of limit | limit from |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        higher_is_better = r["unit"] in ("tokens/s",)
        ratio = None
        if r["peer"]:
            ratio = r["ours"] / r["peer"] if higher_is_better else r["peer"] / r["ours"]
        frac = None
        if r["limit"]:
            frac = r["ours"] / r["limit"] if higher_is_better else r["limit"] / r["ours"]
        r["ratio"], r["fraction_of_limit"] = ratio, frac
        peer = f"{r['peer']:,.1f} ({r['peer_name']})" if r["peer"] else ""
        ratio_s = f"{ratio:.2f}x" if ratio else ""
        limit_s = f"{r['limit']:,.1f}" if r["limit"] else ""
        frac_s = f"{frac:.0%}" if frac else ""
        lines.append(f"| {r['group']} | {r['figure']} | {r['ours']:,.1f} {r['unit']} | {peer} | {ratio_s} | "
                     f"{limit_s} | {frac_s} | {r['basis']} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{host}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"{host}.md").write_text(table + "\n")
    _plot(rows, out / f"{host}.png", meta)
    print(f"\nwritten: {out / (host + '.json')}, {out / (host + '.md')}, {out / (host + '.png')}")
    doc = Path(args.doc) if args.doc else (None if meta.get("quick") else DOC)
    if doc is not None:
        _write_doc(doc, table, meta)
        print(f"written: the report.py section of {doc}")


def _machine() -> dict:
    """The CPU model and memory (from /proc), and the commit the figures are of (-dirty: uncommitted changes to
    tracked files)."""
    cpu_model, mem_gib = platform.processor() or platform.machine(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 2**20
                break
    except OSError:
        pass
    def git(*a):
        r = subprocess.run(["git", *a], cwd=ROOT, text=True, capture_output=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if commit != "unknown" and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {"cpu_model": cpu_model, "mem_gib": mem_gib, "commit": commit}


def _write_doc(doc: Path, table: str, meta: dict):
    """Replace the text between BEGIN and END in doc with the table (append the section if doc has no markers;
    create doc if it does not exist)."""
    mem = f", {meta['mem_gib']:.0f} GiB" if meta.get("mem_gib") else ""
    head = (f"Generated by `python benchmarks/report.py`{' --quick' if meta.get('quick') else ''} on {meta['date']}: "
            f"{meta.get('cpu_model', 'unknown CPU')}, {meta['cpus']} cores{mem} ({meta['host']}); "
            f"commit {meta.get('commit', 'unknown')}.")
    section = f"{BEGIN}\n{head}\n\n{table}\n{END}"
    text = doc.read_text() if doc.exists() else "# Performance\n"
    if BEGIN in text and END in text.split(BEGIN, 1)[1]:
        before, rest = text.split(BEGIN, 1)
        text = before + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def _plot(rows, path, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [r for r in rows if r.get("fraction_of_limit")]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(shown) + 1.5))
    labels = [f"{r['group']}: {r['figure']}" for r in shown]
    ax.barh(range(len(shown)), [r["fraction_of_limit"] for r in shown], color="tab:blue")
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("fraction of the limit (1 = at the FLOP or bandwidth ceiling)")
    ax.set_title(f"rwkv_jax on {meta['host']} ({meta['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
