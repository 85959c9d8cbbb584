"""Evaluation reports as files and text: the console table, PREFIX.json, PREFIX.md and PREFIX.png (loss
against token position, log axis). The numbers come from rwkv_jax.infer.evaluation.

A report may carry other reports' loss by position under 'compare' (eval.py --compare=A.json,B.json): the
tables gain their bucket losses as columns and the PNG draws every curve, each named by its 'label'."""

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


def label_of(report: dict) -> str:
    """The name of a report's curve: its --label, else the checkpoint's file or directory name."""
    return report.get("label") or Path(str(report.get("checkpoint", ""))).name or "report"


def compare_part(other: dict, path) -> dict:
    """What a report keeps of another one it is compared with (eval.py --compare): its label, source and
    loss by position. ValueError if `other` has no loss by position."""
    if not isinstance(other, dict) or not other.get("loss_per_position") or not other.get("loss_by_position"):
        raise ValueError(f"--compare {path}: not an eval.py report with loss by position (a LAMBADA report, or "
                         "another file?): give the PREFIX.json of a perplexity evaluation")
    keys = ("checkpoint", "data", "loss", "tokens", "loss_by_position", "loss_per_position", "tokens_per_position")
    return {"report": str(path), "label": label_of(other), **{k: other.get(k) for k in keys}}


def _compared(report: dict) -> list[tuple[str, dict[str, float]]]:
    """(label, bucket losses by bucket name) of each compared report."""
    return [(c["label"], {b["positions"]: b["loss"] for b in c.get("loss_by_position", [])})
            for c in report.get("compare") or []]


def format_table(report: dict) -> str:
    """The report as plain text: the summary, then the loss by position bucket (and the compared ones')."""
    head = [f"checkpoint: {report.get('checkpoint', '-')}", f"data: {report.get('data', '-')}",
            f"mode: {report['mode']}"]
    rows = _summary_rows(report)
    width = max(len(k) for k, _ in rows)
    lines = head + [f"  {k:<{width}}  {v}" for k, v in rows]
    if report.get("loss_by_position"):
        others = _compared(report)
        title = "".join(f"  {'loss (' + label + ')':>12}" for label, _ in others)
        lines += ["", f"  {'positions':>13}  {'tokens':>10}  {'loss':>8}{title}"]
        for b in report["loss_by_position"]:
            extra = "".join(f"  {_fmt(losses.get(b['positions'])):>{max(12, len(label) + 7)}}"
                            for label, losses in others)
            lines.append(f"  {b['positions']:>13}  {b['tokens']:>10}  {b['loss']:>8.4f}{extra}")
    return "\n".join(lines)


def to_markdown(report: dict, plot_name: str | None = None) -> str:
    lines = ["# Evaluation report", "", f"- checkpoint: `{report.get('checkpoint', '-')}`",
             f"- data: {report.get('data', '-')}", f"- mode: {report['mode']}", "",
             "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in _summary_rows(report)]
    if report.get("loss_by_position"):
        others = _compared(report)
        lines += ["", "## Loss by token position (0-based, log-spaced buckets)", ""]
        if others:
            lines += ["Compared with " + ", ".join(f"`{c['report']}` ({c['label']})" for c in report["compare"])
                      + ".", ""]
        lines += ["| positions | tokens | loss (nats)" + (f", {label_of(report)}" if others else "") + " |"
                  + "".join(f" loss (nats), {label} |" for label, _ in others),
                  "| --- | ---: | ---: |" + " ---: |" * len(others)]
        lines += [f"| {b['positions']} | {b['tokens']} | {b['loss']:.4f} |"
                  + "".join(f" {_fmt(losses.get(b['positions']))} |" for _, losses in others)
                  for b in report["loss_by_position"]]
    if plot_name:
        lines += ["", f"![loss by position]({plot_name})"]
    return "\n".join(lines) + "\n"


def _smoothed(per_pos: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The per-position loss smoothed over +-10% of the position (a window of constant width on the log
    axis), token-weighted."""
    sums_cum = np.concatenate([[0.0], np.cumsum(per_pos * counts)])
    counts_cum = np.concatenate([[0.0], np.cumsum(counts)])
    half = (np.arange(len(per_pos)) * 0.1).astype(np.int64)
    lo, hi = np.arange(len(per_pos)) - half, np.minimum(np.arange(len(per_pos)) + half + 1, len(per_pos))
    return (sums_cum[hi] - sums_cum[lo]) / np.maximum(counts_cum[hi] - counts_cum[lo], 1)


def plot_loss_by_position(report: dict, path) -> None:
    """Loss against token position, log x axis (the paper's long-context figure): the per-position mean,
    lightly smoothed, and the bucket means; with compared reports, every curve (smoothed and buckets)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    curves = [report] + list(report.get("compare") or [])
    for i, curve in enumerate(curves):
        per_pos = np.asarray(curve["loss_per_position"], np.float64)
        counts = np.asarray(curve["tokens_per_position"], np.float64)
        x = np.arange(1, len(per_pos) + 1)  # position + 1, so that position 0 shows on a log axis
        name, color = (label_of(curve) + ": " if len(curves) > 1 else ""), f"C{i}"
        if len(curves) == 1:
            ax.plot(x, per_pos, lw=0.5, alpha=0.2, color="C0", label="per position")
            color = "C1"
        ax.plot(x, _smoothed(per_pos, counts), lw=1.2, color=color, label=f"{name}per position, smoothed (+-10%)")
        buckets = curve["loss_by_position"]
        ax.plot([(b["first"] + min(b["last"], len(per_pos) - 1)) / 2 + 1 for b in buckets],
                [b["loss"] for b in buckets], "o-", lw=1.5, color="C2" if len(curves) == 1 else color,
                alpha=1.0 if len(curves) == 1 else 0.6, label=f"{name}log-spaced buckets")
    ax.set_xscale("log")
    ax.set_xlabel("token position + 1 (within the document)")
    ax.set_ylabel("loss (nats/token)")
    title = " vs ".join(label_of(c) for c in curves)
    ax.set_title(f"{title}: loss by position ({report['tokens']:,} tokens)", fontsize=10 if len(curves) == 1 else 8,
                 wrap=True)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="medium" if len(curves) == 1 else "x-small")
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
