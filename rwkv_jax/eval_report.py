"""Evaluation reports as files and text: the console table, PREFIX.json, PREFIX.md and PREFIX.png (loss
against token position, log axis). The numbers come from rwkv_jax.evaluation."""

import json
import os
from pathlib import Path

import numpy as np


def _fmt(x, digits=4):
    return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def _summary_rows(report: dict) -> list[tuple[str, str]]:
    if "accuracy" in report:  # LAMBADA
        rows = [("examples", _fmt(report["examples"])), ("accuracy", _fmt(report["accuracy"])),
                ("perplexity", _fmt(report["perplexity"])),
                ("mean target tokens", _fmt(report["mean_target_tokens"], 2))]
    else:
        rows = [("documents", _fmt(report["documents"])), ("tokens", _fmt(report["tokens"])),
                ("loss (nats/token)", _fmt(report["loss"])), ("perplexity", _fmt(report["perplexity"])),
                ("bits per byte", _fmt(report["bits_per_byte"]))]
    for key, value in report.get("mode_check", {}).items():
        rows.append((f"mode check: {key.replace('_', ' ')}", f"{value:.3g}" if "diff" in key else _fmt(value)))
    return rows


def format_table(report: dict) -> str:
    """The report as plain text: the summary, then the loss by position bucket."""
    head = [f"checkpoint: {report.get('checkpoint', '-')}", f"data: {report.get('data', '-')}",
            f"mode: {report['mode']}"]
    rows = _summary_rows(report)
    width = max(len(k) for k, _ in rows)
    lines = head + [f"  {k:<{width}}  {v}" for k, v in rows]
    if report.get("loss_by_position"):
        lines += ["", f"  {'positions':>13}  {'tokens':>10}  {'loss':>8}"]
        lines += [f"  {b['positions']:>13}  {b['tokens']:>10}  {b['loss']:>8.4f}" for b in report["loss_by_position"]]
    return "\n".join(lines)


def to_markdown(report: dict, plot_name: str | None = None) -> str:
    lines = ["# Evaluation report", "", f"- checkpoint: `{report.get('checkpoint', '-')}`",
             f"- data: {report.get('data', '-')}", f"- mode: {report['mode']}", "",
             "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in _summary_rows(report)]
    if report.get("loss_by_position"):
        lines += ["", "## Loss by token position (0-based, log-spaced buckets)", "",
                  "| positions | tokens | loss (nats) |", "| --- | ---: | ---: |"]
        lines += [f"| {b['positions']} | {b['tokens']} | {b['loss']:.4f} |" for b in report["loss_by_position"]]
    if plot_name:
        lines += ["", f"![loss by position]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot_loss_by_position(report: dict, path) -> None:
    """Loss against token position, log x axis (the paper's long-context figure): the per-position mean,
    lightly smoothed, and the bucket means."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    per_pos = np.asarray(report["loss_per_position"], np.float64)
    counts = np.asarray(report["tokens_per_position"], np.float64)
    x = np.arange(1, len(per_pos) + 1)  # position + 1, so that position 0 shows on a log axis
    # smoothed over +-10% of the position (a window of constant width on the log axis), token-weighted
    sums_cum = np.concatenate([[0.0], np.cumsum(per_pos * counts)])
    counts_cum = np.concatenate([[0.0], np.cumsum(counts)])
    half = (np.arange(len(per_pos)) * 0.1).astype(np.int64)
    lo, hi = np.arange(len(per_pos)) - half, np.minimum(np.arange(len(per_pos)) + half + 1, len(per_pos))
    smooth = (sums_cum[hi] - sums_cum[lo]) / np.maximum(counts_cum[hi] - counts_cum[lo], 1)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(x, per_pos, lw=0.5, alpha=0.2, label="per position")
    ax.plot(x, smooth, lw=1.2, label="per position, smoothed (+-10%)")
    buckets = report["loss_by_position"]
    ax.plot([(b["first"] + min(b["last"], len(per_pos) - 1)) / 2 + 1 for b in buckets],
            [b["loss"] for b in buckets], "o-", lw=1.5, label="log-spaced buckets")
    ax.set_xscale("log")
    ax.set_xlabel("token position + 1 (within the document)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{Path(str(report.get('checkpoint', ''))).name}: loss by position ({report['tokens']:,} tokens)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, prefix) -> list[str]:
    """PREFIX.json, PREFIX.md and (with positions) PREFIX.png; returns the paths written."""
    prefix = str(prefix)
    for suffix in (".json", ".md", ".png"):
        prefix = prefix.removesuffix(suffix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    paths = [prefix + ".json", prefix + ".md"]
    plot = None
    if report.get("loss_per_position"):
        plot = prefix + ".png"
        plot_loss_by_position(report, plot)
        paths.append(plot)
    Path(prefix + ".json").write_text(json.dumps(report, indent=1))
    Path(prefix + ".md").write_text(to_markdown(report, os.path.basename(plot) if plot else None))
    return paths
