"""The pod table: every paper size compiled ahead of time for a TPU topology a user would pick, on this
machine (needs libtpu). Each row runs `train.py --compile_only` in its own process and the table is
printed as Markdown (and written as JSON with --json).

    python benchmarks/pod_table.py                         # all six RWKV-4 sizes
    python benchmarks/pod_table.py --sizes=169m,430m --extra=--config.model.wkv_form=pallas
    python benchmarks/pod_table.py --sizes=rwkv7            # all five RWKV-7 sizes
    python benchmarks/pod_table.py --sizes=rwkv7_421m,rwkv7_1b5 --extra=--config.model.wkv_form=chunked

Each RWKV-7 size runs on the topology, batch, mesh and window (1024 tokens; its configs train on 4096) of
the RWKV-4 size nearest it, so that the two generations' rows compare.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# size -> (topology, global batch in sequences of 1024 tokens, mesh overrides)
PLANS = {
    "169m": ("v5e:2x4", 64, ["--config.mesh.data=-1", "--config.mesh.fsdp=1"]),
    "430m": ("v5e:2x4", 64, ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]),
    "1b5": ("v5e:4x4", 64, ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]),
    "3b": ("v5p:2x2x2", 64, ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]),
    "7b": ("v5p:2x4x4", 128, ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]),
    "14b": ("v5p:4x4x4", 256, ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]),
}
RWKV7_PLANS = {"rwkv7_168m": "169m", "rwkv7_421m": "430m", "rwkv7_1b5": "1b5", "rwkv7_2b9": "3b", "rwkv7_7b2": "7b"}
PLANS.update({size: (*PLANS[like][:2], [*PLANS[like][2], "--config.train.seq_len=1024"])  # the RWKV-4 windows
              for size, like in RWKV7_PLANS.items()})
GROUPS = {"rwkv4": [size for size in PLANS if size not in RWKV7_PLANS], "rwkv7": list(RWKV7_PLANS)}

ROW = re.compile(r"^\s+train\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)"
                 r"\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+([0-9.]+)")


def run(size: str, extra: list[str]) -> dict:
    topology, batch, mesh = PLANS[size]
    cmd = [sys.executable, "train.py", f"--config=configs/{size}.py", "--compile_only", f"--topology={topology}",
           f"--config.train.batch_size={batch}", "--config.train.microbatches=1", *mesh, *extra]
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    out = result.stdout
    row = {"size": size, "topology": topology, "batch": batch, "exit": result.returncode,
           "wall_s": time.time() - start, "command": " ".join(cmd[1:])}
    mesh_line = re.search(r"mesh (\{[^}]*\})", out)
    row["mesh"] = mesh_line.group(1) if mesh_line else "?"
    m = next((ROW.match(line) for line in out.splitlines() if ROW.match(line)), None)
    if m:
        row.update(peak_gib=float(m.group(4)), xla_flops=float(m.group(5)), matmul_flops=float(m.group(6)),
                   bytes=float(m.group(7)), roofline_s=float(m.group(8)), compile_s=float(m.group(9)))
    mfu = re.search(r"roofline MFU ([0-9.]+)%", out)
    row["mfu"] = float(mfu.group(1)) if mfu else None
    row["fits"] = "FITS" in out and "DOES NOT FIT" not in out
    hbm = re.search(r", ([0-9.]+) GiB HBM", out)
    row["hbm_gib"] = float(hbm.group(1)) if hbm else None
    if not m:
        row["error"] = (result.stderr.strip().splitlines() or ["?"])[-1]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="rwkv4",
                   help=f"comma-separated config names ({', '.join(PLANS)}) or groups ({', '.join(GROUPS)})")
    p.add_argument("--extra", action="append", default=[], help="extra train.py flag (repeatable)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    sizes = [size for name in args.sizes.split(",") for size in GROUPS.get(name, [name])]
    unknown = [size for size in sizes if size not in PLANS]
    if unknown:
        p.error(f"unknown --sizes {unknown}: choose from {', '.join([*PLANS, *GROUPS])}")
    rows = []
    for size in sizes:
        row = run(size, args.extra)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| size | topology | mesh | global batch | fits | peak GiB/chip (HBM) | XLA FLOPs/chip | "
          "matmul FLOPs/chip | bytes/chip | roofline s | roofline MFU | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "peak_gib" not in r:
            print(f"| {r['size']} | {r['topology']} | {r['mesh']} | {r['batch']} | error: {r.get('error')} ||||||||")
            continue
        print(f"| {r['size']} | {r['topology']} | {r['mesh']} | {r['batch']} x 1024 | {'yes' if r['fits'] else 'NO'} | "
              f"{r['peak_gib']:.2f} ({r['hbm_gib']:.1f}) | {r['xla_flops']:.3g} | {r['matmul_flops']:.3g} | "
              f"{r['bytes']:.3g} | "
              f"{r['roofline_s']:.3f} | "
              f"{r['mfu']:.1f}% | {r['compile_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
