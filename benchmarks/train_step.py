"""Benchmark the training step (forward + backward + clipped Adam update): rwkv_jax against Hugging Face
transformers' RwkvForCausalLM (PyTorch), same shapes, side by side in one process.

    python benchmarks/train_step.py                                  # tiny (16 x 128) and 169m (1 x 128)
    python benchmarks/train_step.py --shapes=169m --big-batch=2 --big-seq=256 --steps=5
    python benchmarks/train_step.py --peak-flops=2e12 --hf=off      # on a GPU: jax only, MFU vs given peak
    python benchmarks/train_step.py --shapes=169m --hf=off --trainable=all,lora
                                                    # LoRA rank 16 (base frozen) against full fine-tuning
    python benchmarks/train_step.py --shapes=169m,rwkv7_168m --big-batch=2 --big-seq=512 --hf=off
                                                                    # RWKV-7 against RWKV-4 (issue 28)

Shapes: 'tiny' is configs/tiny.py's model (4 x 128, vocab 4096) at --tiny-batch x --tiny-seq; '169m' is the
paper's 12 x 768, vocab 50277 at --big-batch x --big-seq. 'rwkv7_tiny' and 'rwkv7_168m' are
configs/rwkv7_tiny.py's and configs/rwkv7_168m.py's RWKV-7 models at the same batch and length as 'tiny' and
'169m'; with both of a pair in one run the output ends with the RWKV-7 / RWKV-4 ratios (tokens/s, MFU, first
step). HF transformers has no RWKV-7: its peer runs for the RWKV-4 shapes only.

Each step is timed on its own (ended with block_until_ready / a synchronous torch step) after --warmup
steps (the first jax one compiles); the table shows the median. tokens/s = B * T / median step time.
MFU = tokens/s * FLOPs per token / (peak FLOP/s x devices), with each generation's own count (printed per
row; `flops_per_token` of rwkv_jax/model/rwkv4.py and rwkv7.py): RWKV-4 6 (V D + 13 D^2 L), the paper's
training cost, the same for both implementations; RWKV-7 6 x the weights a token is multiplied by (head,
projections, channel mix, LoRAs) plus the WKV-7 recurrence's 30 L D N. The peak is --peak-flops, else the
table in rwkv_jax/train/metrics.py for GPUs/TPUs, else (CPU) a probe: the best time of a large jnp.dot in the
model's dtype on this machine.

Fairness on CPU: torch gets as many intra-op threads as XLA:CPU uses (the schedulable CPUs), both fp32, or
with --dtype=bfloat16 both mixed precision (fp32 weights, bf16 matmuls: torch.autocast for HF).
HF on CPU runs its Python-loop WKV (its CUDA kernel needs a GPU); in train mode HF does not rescale
(rescale_every only applies in eval mode). On a GPU/TPU jax backend HF is skipped unless --hf=on (the
installed torch runs on CPU, so the ratio would compare different hardware).
"""

import argparse
import contextlib
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import probes

from rwkv_jax.model import ModelConfig, family_of
from rwkv_jax.ops import wkv4 as wkv_ops
from rwkv_jax.train import metrics, optim, sharding, train_step

# The model shapes of configs/tiny.py, configs/169m.py, configs/rwkv7_tiny.py and configs/rwkv7_168m.py, with
# their scan_layers settings ('auto': stacked and scanned on GPU/TPU, a list on CPU).
SHAPES = {"tiny": dict(vocab_size=4096, n_layer=4, d_model=128),
          "169m": dict(vocab_size=50277, n_layer=12, d_model=768, scan_layers="auto"),
          "rwkv7_tiny": dict(version=7, vocab_size=4096, n_layer=4, d_model=128, head_size=32, d_gate_lora=32,
                             emb_init_scale=1e-4),
          "rwkv7_168m": dict(version=7, vocab_size=50304, n_layer=12, d_model=768, head_size=64,
                             emb_init_scale=1e-4, scan_layers="auto")}
PAIRS = {"rwkv7_tiny": "tiny", "rwkv7_168m": "169m"}  # RWKV-7 shape -> the RWKV-4 shape it is compared with


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,169m", help=f"comma-separated subset of {','.join(SHAPES)}")
    p.add_argument("--tiny-batch", type=int, default=16)
    p.add_argument("--tiny-seq", type=int, default=128)
    p.add_argument("--big-batch", type=int, default=1, help="169m batch (raise it on a GPU, e.g. 16)")
    p.add_argument("--big-seq", type=int, default=128, help="169m sequence length (e.g. 1024 on a GPU)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first jax one compiles)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"),
                   help="compute dtype (master weights are fp32); bfloat16 runs HF under torch.autocast(bf16)")
    p.add_argument("--wkv-form", default="auto", help="rwkv_jax WKV form: auto|sequential|parallel|chunked")
    p.add_argument("--scan-layers", default="config", choices=("config", "on", "off"),
                   help="rwkv_jax layers stacked and scanned (lax.scan), or a list; config: as configs/tiny.py "
                        "(a list) and configs/169m.py ('auto': a list on CPU, scanned on GPU/TPU) have them")
    p.add_argument("--peak-flops", type=float, default=0.0,
                   help="peak FLOP/s per device for MFU; 0: device table, or a matmul probe on CPU")
    p.add_argument("--probe-size", type=int, default=2048, help="n of the n x n fp32 matmul probe")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads; 0: the CPUs XLA:CPU uses (schedulable CPUs)")
    p.add_argument("--trainable", default="all",
                   help="rwkv_jax: 'all' (full fine-tuning), 'lora' (adapters on a frozen model, optim.trainable) "
                        "or 'all,lora': both, one after the other in this process, with LoRA's ratio to full")
    p.add_argument("--lora-rank", type=int, default=16, help="with --trainable=lora: the adapters' rank")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    p.add_argument("--hf", default="auto", choices=("auto", "on", "off"),
                   help="run the HF transformers peer; auto: only when jax runs on CPU")
    args = p.parse_args(argv)
    args.trainable = [t.strip() for t in args.trainable.split(",") if t.strip()]
    if not args.trainable or set(args.trainable) - {"all", "lora"}:
        p.error(f"--trainable takes all, lora or all,lora; got {','.join(args.trainable)!r}")
    return args


def schedulable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def median_step_time(step, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `steps` calls after `warmup` calls); `step()` blocks."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def random_tokens(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)


def bench_jax(shape: dict, batch: int, seq: int, args, trainable: str = "all") -> dict:
    if args.scan_layers != "config":
        shape = dict(shape, scan_layers=args.scan_layers == "on")
    model_config = ModelConfig.from_dict(dict(shape, dtype=args.dtype, wkv_form=args.wkv_form))
    shape = {k: v for k, v in shape.items() if k in ("vocab_size", "n_layer", "d_model")}
    form = wkv_ops.default_form() if model_config.wkv_form == "auto" else model_config.wkv_form  # resolved
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    optim_config = optim.default_optim_config()
    optimizer = optim.make_optimizer(optim_config, 1000)
    optim_config.trainable, optim_config.lora_rank = trainable, args.lora_rank
    graphdef, init, _, shardings = train_step.train_state_factory(model_config, optimizer, mesh, seed=0,
                                                                  trainable=trainable,
                                                                  lora=optim.lora_spec(optim_config))
    step_fn = train_step.make_train_step(graphdef, optimizer, optim.learning_rate(optim_config, 1000), shardings,
                                         mesh, l2wrap_factor=optim_config.l2wrap_factor, trainable=trainable)
    tokens = random_tokens(shape["vocab_size"], batch, seq)
    batch_sharding = sharding.batch_sharding(mesh)
    data = {"inputs": jax.device_put(tokens[:, :-1], batch_sharding),
            "targets": jax.device_put(tokens[:, 1:], batch_sharding)}
    holder = {"state": init()}
    losses = []

    def step():
        holder["state"], m = step_fn(holder["state"], data)
        jax.block_until_ready((holder["state"], m))
        losses.append(float(m["loss"]))

    first, median = median_step_time(step, args.warmup, args.steps)
    assert all(np.isfinite(losses)), losses
    del holder["state"]
    return {"first_s": first, "step_s": median, "loss0": losses[0],
            "note": f"{model_config.dtype} compute, WKV {form}, "
                    f"layers {'scanned' if model_config.scan_layers else 'unrolled'}"
                    + (f", LoRA rank {args.lora_rank} (base frozen)" if trainable == "lora" else "")}


def bench_hf(shape: dict, batch: int, seq: int, args) -> dict:
    import torch
    shape = {k: v for k, v in shape.items() if k in ("vocab_size", "n_layer", "d_model")}
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(0)
    D = shape["d_model"]
    config = RwkvConfig(vocab_size=shape["vocab_size"], context_length=max(seq, 1024), hidden_size=D,
                        num_hidden_layers=shape["n_layer"], attention_hidden_size=D, intermediate_size=4 * D,
                        tie_word_embeddings=False, use_cache=False)
    model = RwkvForCausalLM(config).float()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=6e-4, betas=(0.9, 0.99), eps=1e-8)
    tokens = torch.from_numpy(random_tokens(shape["vocab_size"], batch, seq).astype(np.int64))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    losses = []

    # --dtype=bfloat16: torch's mixed precision on CPU (fp32 weights, bf16 matmuls), as rwkv_jax's bf16 compute.
    bf16 = args.dtype == "bfloat16"
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step():
        with precision:
            logits = model(input_ids=inputs, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    first, median = median_step_time(step, args.warmup, args.steps)
    assert all(np.isfinite(losses)), losses
    return {"first_s": first, "step_s": median, "loss0": losses[0],
            "note": f"{'bf16 autocast' if bf16 else 'fp32'}, Python-loop WKV (CPU)"}


def main(argv=None):
    args = parse_args(argv)
    backend = jax.default_backend()
    device = jax.devices()[0]
    n_devices = jax.device_count()
    run_hf = args.hf == "on" or (args.hf == "auto" and backend == "cpu")
    jax_threads = schedulable_cpus() if backend == "cpu" else None
    torch_threads = None
    if run_hf:
        import torch
        torch.set_num_threads(args.threads or schedulable_cpus())
        torch_threads = torch.get_num_threads()
        import transformers
        hf_version = f"torch {torch.__version__}, transformers {transformers.__version__}"

    if args.peak_flops > 0:
        peak, peak_source = args.peak_flops, "--peak-flops"
    elif metrics.peak_flops_per_device() is not None:
        peak, peak_source = metrics.peak_flops_per_device(), f"table entry for {device.device_kind} (dense bf16)"
    else:
        # The peak of the dtype the model multiplies in: bf16 products run several times faster than fp32
        # ones on CPUs with AMX or AVX512-BF16.
        dtype = "bfloat16" if args.dtype == "bfloat16" else "float32"
        peak = probes.matmul_flops(args.probe_size, jnp.dtype(dtype))
        peak_source = f"probe: best {args.probe_size}^3 {dtype} jnp.dot (fp32 result)"

    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    print(f"host: {platform.node()} {platform.processor() or platform.machine()}, {schedulable_cpus()} schedulable CPUs"
          f"{load}")
    print(f"jax {jax.__version__}: backend {backend}, {n_devices} x {device.device_kind}"
          + (f", XLA:CPU threads {jax_threads}" if jax_threads else ""))
    if run_hf:
        print(f"HF peer: {hf_version}, torch threads {torch_threads}")
    print(f"peak FLOP/s per device for MFU: {peak:.3e} ({peak_source})")
    print(f"timing: {args.warmup} warmup step(s), median of {args.steps}; optimizer Adam(0.9, 0.99) + clip 1.0")
    print(flush=True)

    rows = []
    for name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        shape = SHAPES[name]
        batch, seq = (args.tiny_batch, args.tiny_seq) if name.endswith("tiny") else (args.big_batch, args.big_seq)
        label = f"{name} {shape['n_layer']}x{shape['d_model']} V{shape['vocab_size']} B{batch} T{seq}"
        model_config = ModelConfig.from_dict(shape)
        fpt = family_of(model_config).flops_per_token(model_config)  # each generation's own count
        results = {"rwkv_jax" if trainable == "all" else "rwkv_jax LoRA": bench_jax(shape, batch, seq, args, trainable)
                   for trainable in args.trainable}
        with_hf = run_hf and model_config.version == 4  # HF transformers has RWKV-4 only
        if with_hf:
            results["HF transformers"] = bench_hf(shape, batch, seq, args)
        for impl, r in results.items():
            tps = batch * seq / r["step_s"]
            devices = n_devices if impl.startswith("rwkv_jax") else 1
            rows.append({"impl": impl, "name": name, "shape": label, "tps": tps, "mfu": tps * fpt / (peak * devices),
                         "flops_per_token": fpt, "step_ms": r["step_s"] * 1e3, "first_s": r["first_s"],
                         "loss0": r["loss0"], "note": f"{r['note']}, {fpt:.4g} FLOPs/token", "ratio": None})
        if with_hf:
            hf_row = rows[-1]
            for jax_row in rows[-len(results):-1]:
                jax_row["ratio"] = jax_row["tps"] / hf_row["tps"]
        if len(args.trainable) == 2:
            full, lora = rows[-len(results):][:2]
            print(f"LoRA rank {args.lora_rank} / full fine-tuning, {label}: step time "
                  f"{lora['step_ms'] / full['step_ms']:.2f}x, first step {lora['first_s'] / full['first_s']:.2f}x",
                  flush=True)
        print(f"done: {label}", flush=True)

    header = f"{'impl':<16} | {'shape':<34} | {'tokens/s':>10} | {'MFU':>7} | {'step ms':>9} | {'1st step s':>10} | " \
             f"{'rwkv_jax/HF':>11} | {'loss@1':>6} | notes"
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""
        print(f"{r['impl']:<16} | {r['shape']:<34} | {r['tps']:>10,.0f} | {r['mfu']:>7.2%} | {r['step_ms']:>9.1f} | "
              f"{r['first_s']:>10.1f} | {ratio:>11} | {r['loss0']:>6.3f} | {r['note']}")
    pairs = versus(rows)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "peak_source": peak_source, "rows": rows, "pairs": pairs}, f, indent=2)
    return rows


def versus(rows: list[dict]) -> list[dict]:
    """RWKV-7 against RWKV-4 (rwkv_jax rows of a PAIRS pair, run in this process): the ratios of tokens/s, of
    MFU (each by its own FLOP count) and of the first step's time (the compile), printed and returned."""
    ours = {r["name"]: r for r in rows if r["impl"] == "rwkv_jax"}
    pairs = []
    for v7, v4 in PAIRS.items():
        if v7 in ours and v4 in ours:
            a, b = ours[v7], ours[v4]
            pairs.append({"rwkv7": a["shape"], "rwkv4": b["shape"], "tps_ratio": a["tps"] / b["tps"],
                          "mfu_ratio": a["mfu"] / b["mfu"], "first_step_ratio": a["first_s"] / b["first_s"],
                          "flops_per_token": {"rwkv7": a["flops_per_token"], "rwkv4": b["flops_per_token"]}})
    for p in pairs:
        print(f"\nRWKV-7 / RWKV-4: {p['rwkv7']} against {p['rwkv4']}: tokens/s {p['tps_ratio']:.2f}x, MFU "
              f"{p['mfu_ratio']:.2f}x (FLOPs/token {p['flops_per_token']['rwkv7']:.4g} vs "
              f"{p['flops_per_token']['rwkv4']:.4g}), first step (compile) {p['first_step_ratio']:.2f}x the time")
    return pairs


if __name__ == "__main__":
    main()
