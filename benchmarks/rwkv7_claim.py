"""The claim experiment of issue 28: RWKV-7 against RWKV-4 at equal size, data and seed, on long documents.

    python benchmarks/rwkv7_claim.py --out=/tmp/rwkv7-claim              # everything, then docs/rwkv7_claim.*
    python benchmarks/rwkv7_claim.py --out=/tmp/rwkv7-claim --steps=20   # a smoke run (figures meaningless)

Models: configs/tiny.py (RWKV-4, 1,906,688 parameters) and configs/rwkv7_tiny.py (RWKV-7, 1,976,320: +3.7%),
both 4 x 128, sentencepiece vocab 4096, window T = 128, batch 16, 600 steps, seed 0, their own schedules and
inits as the configs set them. Both read the same tokens: the same corpus, tokenizer settings, data seed and
batch shapes (tests/test_rwkv7_train.py checks the sizes).

Corpus (as docs/long_context.md's evidence): the Python standard library's .py files over 24 KiB, test
directories left out, for training (10% of it the in-training validation split); the first --heldout files of
12-24 KiB (sorted by path, none in training) held out for evaluation.

Steps: build the two text folders; `train.py` each config (eval every 50 steps on the validation split);
`eval.py` each run on the held-out documents with the state carried through each document out to 8 x T
(--eval_len=1024), the second with --compare against the first; then one PNG of both validation curves.
Writes into docs/: rwkv7_claim.md/.json/.png (eval.py's report: loss by position, both models) and
rwkv7_claim_curves.png (validation loss against step). Expected time on the project's 2-core CPU, nothing
else running: 10 to 15 minutes, an estimate (RWKV-4 tiny trains at ~12k tokens/s there, docs/performance.md,
so ~2 minutes for its 1.2M tokens; RWKV-7 tiny's step is unmeasured, assumed up to 3x slower; two
evaluations of 150 x 1024 tokens, the corpus and tokenizer once); the runs print their own ETA.
"""

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"RWKV-4 (configs/tiny.py)": ("tiny", "rwkv4"), "RWKV-7 (configs/rwkv7_tiny.py)": ("rwkv7_tiny", "rwkv7")}


def split_stdlib(train_dir: Path, heldout_dir: Path, n_heldout: int) -> tuple[int, int]:
    """Copy the standard library's long .py files (> 24 KiB) to train_dir and n_heldout of 12-24 KiB to
    heldout_dir, test directories left out; returns (training files, held-out files)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py")
                   if not any(part in ("test", "tests", "idle_test") or part.startswith("site-packages")
                              for part in p.relative_to(stdlib).parts))
    train = [p for p in files if p.stat().st_size > 24 * 1024]
    heldout = [p for p in files if 12 * 1024 <= p.stat().st_size <= 24 * 1024][:n_heldout]
    for folder, chosen in ((train_dir, train), (heldout_dir, heldout)):
        folder.mkdir(parents=True, exist_ok=True)
        for p in chosen:
            shutil.copy(p, folder / str(p.relative_to(stdlib)).replace("/", "__"))
    return len(train), len(heldout)


def call(args: list[str]) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def plot_curves(workdirs: dict[str, Path], path: Path, window: int) -> None:
    """Validation loss (and the smoothed training loss, thin) against step, both runs on one axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, workdir), color in zip(workdirs.items(), ("tab:blue", "tab:red")):
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
        train = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
        evals = {r["step"]: r["eval_loss"] for r in records if r["kind"] == "eval"}
        steps = sorted(train)
        smooth = [sum(train[s] for s in steps[max(0, i - 19):i + 1]) / len(steps[max(0, i - 19):i + 1])
                  for i in range(len(steps))]
        ax.plot(steps, smooth, color=color, alpha=0.35, linewidth=1, label=f"{label}, train (20-step mean)")
        ax.plot(sorted(evals), [evals[s] for s in sorted(evals)], "o-", color=color, label=f"{label}, validation")
    ax.set_xlabel("step (16 x 128 tokens each)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"RWKV-7 vs RWKV-4, tiny, same tokens and seed (window T = {window})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="working directory (corpus copies, runs, intermediate reports)")
    p.add_argument("--steps", type=int, default=600, help="training steps of each run (the configs': 600)")
    p.add_argument("--heldout", type=int, default=150, help="held-out documents")
    p.add_argument("--eval_len", type=int, default=1024, help="tokens per held-out document: 8 x T = 1024")
    p.add_argument("--doc", default=str(ROOT / "docs" / "rwkv7_claim"), help="report prefix (docs/rwkv7_claim)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    train_dir, heldout_dir = out / "long_py", out / "heldout_py"
    if not train_dir.exists():
        n_train, n_heldout = split_stdlib(train_dir, heldout_dir, args.heldout)
        print(f"corpus: {n_train} training files, {n_heldout} held-out files", flush=True)
    workdirs, reports = {}, []
    for i, (label, (config, name)) in enumerate(RUNS.items()):
        workdir = out / "runs" / name
        workdirs[label] = workdir
        call(["train.py", f"--config=configs/{config}.py", f"--workdir={workdir}",
              "--config.data.source=text", f"--config.data.text_files={train_dir}",
              f"--config.data.data_dir={out / 'data'}", "--config.data.validation_fraction=0.1",
              f"--config.train.num_steps={args.steps}", "--config.train.eval_every=50", "--config.train.seed=0"])
        last = i == len(RUNS) - 1
        report = args.doc if last else str(out / "eval" / name)
        call(["eval.py", f"--checkpoint={workdir}", f"--text_files={heldout_dir}", f"--eval_len={args.eval_len}",
              f"--label={label}", f"--report={report}", *([f"--compare={','.join(reports)}"] if last else [])])
        reports.append(f"{report}.json")
    plot_curves(workdirs, Path(f"{args.doc}_curves.png"), window=128)
    print(f"written: {args.doc}.md/.json/.png, {args.doc}_curves.png")


if __name__ == "__main__":
    main()
