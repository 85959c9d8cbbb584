"""Training observability: the workdir's metrics.jsonl, TensorBoard events, a console line with ETA, and
a PNG of the loss curves at the end (paths: rwkv_jax.io.workdir). Only process 0 writes; the others keep the
records in memory only. Also the one bits-per-byte formula of the project."""

import json
import math
import os
import time
from pathlib import Path

import jax

from rwkv_jax.io.workdir import Workdir

# Dense bf16 peak FLOP/s per device, for MFU. Matched against `device_kind` by substring.
PEAK_FLOPS_BY_DEVICE_KIND = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
}


def flops_per_token(vocab_size: int, d_model: int, n_layer: int) -> float:
    """The paper's training cost of RWKV-4: 6 (V D + 13 D^2 L) FLOPs per token (the trainer asks the model's
    Family: `family_of(config).flops_per_token(config)`, the same for RWKV-4)."""
    return 6.0 * (vocab_size * d_model + 13 * d_model ** 2 * n_layer)


def peak_flops_per_device(configured: float = 0.0) -> float | None:
    """`configured` when > 0, else the table's value for the first device (None when unknown, e.g. CPU)."""
    if configured > 0:
        return configured
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_FLOPS_BY_DEVICE_KIND.items() if name in kind), None)


def bits_per_byte(total_nats: float, num_bytes: int) -> float | None:
    """Bits per UTF-8 byte of the scored text: total loss in nats / ln 2 / bytes (None without bytes)."""
    return total_nats / math.log(2) / num_bytes if num_bytes else None


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
    def __init__(self, workdir, *, total_steps: int, tokens_per_step: int, flops_per_token: float,
                 peak_flops: float | None, num_devices: int, is_main: bool = True):
        self.workdir = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.num_devices = num_devices
        self.is_main = is_main
        self.train_records: list[dict] = []
        self.eval_records: list[dict] = []
        self._start = time.time()
        self._last = (None, None)  # (step, time) of the last logged train step
        self._jsonl = open(self.workdir.metrics_path, "a") if is_main else None
        self._tb = None
        if is_main:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.workdir.tensorboard_dir))

    def _write(self, record: dict) -> None:
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def train(self, step: int, values: dict) -> dict:
        """Record train metrics at `step` (optimizer steps done); throughput since the last record."""
        now = time.time()
        last_step, last_time = self._last
        self._last = (step, now)
        tokens_per_sec = (step - last_step) * self.tokens_per_step / (now - last_time) if last_step is not None \
            else None
        mfu = None
        if tokens_per_sec and self.peak_flops:
            mfu = tokens_per_sec * self.flops_per_token / (self.peak_flops * self.num_devices)
        record = {"kind": "train", "step": step, **{k: float(v) for k, v in values.items()},
                  "tokens_per_sec": tokens_per_sec, "mfu": mfu, "elapsed_sec": now - self._start}
        self.train_records.append(record)
        self._write(record)
        if self.is_main:
            rate = f"{tokens_per_sec:,.0f} tok/s" if tokens_per_sec else "compiling"
            eta = ""
            if tokens_per_sec:
                eta = f" eta {_duration((self.total_steps - step) * self.tokens_per_step / tokens_per_sec)}"
            mfu_text = f" mfu {mfu:.1%}" if mfu is not None else ""
            print(f"step {step}/{self.total_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                  f"gnorm {record['grad_norm']:.3f} {rate}{mfu_text} elapsed {_duration(now - self._start)}{eta}",
                  flush=True)
        return record

    def eval(self, step: int, loss: float, bits_per_byte: float | None, tokens: int) -> dict:
        record = {"kind": "eval", "step": step, "eval_loss": loss, "eval_bits_per_byte": bits_per_byte,
                  "eval_tokens": tokens, "elapsed_sec": time.time() - self._start}
        self.eval_records.append(record)
        self._write(record)
        if self.is_main:
            bpb = f" bits/byte {bits_per_byte:.4f}" if bits_per_byte is not None else ""
            print(f"eval at step {step}: loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.2f}){bpb} "
                  f"over {tokens:,} tokens", flush=True)
        return record

    def close(self) -> None:
        """Flush the writers and draw DIR/loss.png."""
        if not self.is_main:
            return
        self._jsonl.close()
        self._tb.close()
        if self.train_records:
            self._plot()

    def _plot(self) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        records = _all_records(self.workdir.metrics_path)  # the whole run, resumes included
        fig, ax = plt.subplots(figsize=(7, 4))
        train = [r for r in records if r["kind"] == "train"]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        evals = [r for r in records if r["kind"] == "eval"]
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.workdir.loss_plot_path, dpi=120)
        plt.close(fig)


def drop_records_after(path: Path, step: int) -> None:
    """Keep the records of metrics.jsonl up to `step` (none when 0), the run's restored step: a resumed run
    writes the steps after it again, and each step is then in the file once. A half-written last line (a
    killed run) goes too. Rewritten atomically (a temporary file renamed over it)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if line.endswith("\n") and 0 < step and record.get("step", step + 1) <= step:
            kept.append(line)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


def _all_records(path: Path) -> list[dict]:
    """Records of metrics.jsonl, keeping for each (kind, step) the last written (older runs could hold a
    step twice)."""
    latest = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        latest[(record["kind"], record["step"])] = record
    return sorted(latest.values(), key=lambda r: r["step"])
