"""Plan a pod run from any machine: compile the real train and eval steps for a TPU topology ahead of
time (no TPU needed, only libtpu installed) and report whether they fit, in the manner of MaxText's
`train_compile.py`.

    python train.py --config=configs/14b.py --compile_only --topology=v5p:4x4x4 --config.mesh.fsdp=-1

The report gives, per device: argument, output, temporary and peak memory against the chip's HBM;
FLOPs and bytes accessed per step (XLA's cost analysis of the partitioned program), and the matmul
FLOPs counted from the step's jaxpr; a roofline step time, max(FLOPs / peak, bytes / bandwidth), and the
model FLOPs utilisation it implies (the paper's 6(VD + 13D^2L) FLOPs per token); and the compile time.

XLA's TPU cost analysis under-counts some matmuls: with the weights sharded over fsdp, the partitioner
fuses the all-gather into a windowed matmul whose FLOPs it reports as one window's. Measured with libtpu
0.0.42 for a [4096 tokens x 4096] @ [4096 x 4096] matmul per chip: 1/8 of its FLOPs on v5p:2x4x4, 1/2 on
v5p:2x2x2 and v5e:2x4, all of them on v5p:4x4x4; its gradient matmuls are counted in full. So the roofline
takes the larger of XLA's count and the jaxpr's matmul count (`matmul_flops`: every dot_general, scan
bodies times their length, the rematerialised forward included), which needs no compile. `compile_only`
returns the report; the caller exits non-zero when the step does not fit.

libtpu is an optional extra (`pip install -e .[tpu-aot]`), needed only here.
"""

import contextlib
import dataclasses
import logging
import math
import os
import re
import sys
import tempfile
import time

import jax
import ml_collections
from jax.extend import core as jax_core

from rwkv_jax.model import ModelConfig, family_of
from rwkv_jax.train import program as program_lib
from rwkv_jax.train import sharding, train_config

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: float       # per chip
    peak_flops: float      # dense bf16 FLOP/s per chip
    hbm_bandwidth: float   # bytes/s per chip


# Per-chip figures from Google Cloud's TPU system-architecture pages (docs.cloud.google.com/tpu/docs/
# v4, v5e, v5p, v6e), keyed by the device_kind libtpu reports.
CHIPS: dict[str, Chip] = {
    "TPU v4": Chip(32 * GIB, 275e12, 1228e9),        # v4: 32 GiB HBM2, 275 TFLOP/s bf16, 1,228 GB/s
    "TPU v5 lite": Chip(16e9, 197e12, 819e9),         # v5e: 16 GB HBM2, 197 TFLOP/s bf16, 819 GB/s
    "TPU v5": Chip(95e9, 459e12, 2765e9),             # v5p: 95 GB HBM2e, 459 TFLOP/s bf16, 2,765 GB/s
    "TPU v6 lite": Chip(32e9, 918e12, 1640e9),        # v6e: 32 GB HBM, 918 TFLOP/s bf16, 1,640 GB/s
}


def topology_devices(topology: str):
    """Compile-only TPU devices of a topology such as 'v5e:2x2' or 'v5p:4x4x4' (needs libtpu)."""
    # libtpu allows one process per machine unless told otherwise; compile-only use touches no TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ImportError("--compile_only needs libtpu: pip install -e .[tpu-aot] "
                          "(or pip install -r requirements-dev.txt)") from None
    from jax.experimental import topologies
    try:
        with _stderr_to_log("libtpu"):  # its init errors about the TPU host it is not on
            return topologies.get_topology_desc(topology, "tpu").devices
    except Exception as e:  # noqa: BLE001 - libtpu's errors for a bad name are generic runtime errors
        raise ValueError(f"--topology={topology!r} is not a TPU topology libtpu knows ({e}); use names such as "
                         "v5e:2x2, v5e:4x4, v5p:2x2x2, v5p:4x4x4, v6e:2x4, v4:2x2x2") from None


@contextlib.contextmanager
def _stderr_to_log(name: str):
    """Inside: what is written to file descriptor 2 (C++ libraries' own logging) goes to INFO records of
    logger `name` (the log file) instead of the console."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", errors="replace").splitlines():
                if line.strip():
                    logging.getLogger(name).info("%s", line)


def _chip_of(devices, topology: str) -> tuple[Chip, int]:
    """(the chip's figures, devices per chip) for the topology's devices."""
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise ValueError(f"no HBM/FLOP figures for device kind {kind!r}; known: {sorted(CHIPS)}")
    dims = topology.split(":")[-1].split("x")
    chips = math.prod(int(d) for d in dims)
    return CHIPS[kind], max(1, len(devices) // chips)


def device_chip(devices, topology: str) -> Chip:
    """The figures of one device of `topology` (a chip's, divided among the devices of a chip)."""
    chip, per_chip = _chip_of(devices, topology)
    return Chip(chip.hbm_bytes / per_chip, chip.peak_flops / per_chip, chip.hbm_bandwidth / per_chip)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per program
        cost = cost[0]
    return dict(cost or {})


def _sub_jaxprs(params: dict):
    for value in params.values():
        for x in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(x, jax_core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax_core.Jaxpr):
                yield x


def matmul_flops(jaxpr) -> float:
    """FLOPs of every dot_general in `jaxpr` (2 per multiply-add), nested jaxprs included: a scan's body
    counts `length` times, a cond its costliest branch. Elementwise work and Pallas kernels are left out
    (the WKV kernel's FLOPs are O(T C) per row, against O(T D^2) for the matmuls)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in contracting)
            continue
        inner = [matmul_flops(j) for j in _sub_jaxprs(eqn.params)]
        if eqn.primitive.name == "cond":
            total += max(inner, default=0.0)
        elif eqn.primitive.name == "scan":
            total += eqn.params["length"] * sum(inner)
        else:
            total += sum(inner)
    return total


def _analyse(compiled) -> dict:
    mem = compiled.memory_analysis()
    cost = _cost(compiled)
    argument, output = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    flops, bytes_accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    return {
        "argument_gib": argument / GIB, "output_gib": output / GIB, "temp_gib": temp / GIB,
        "alias_gib": alias / GIB, "peak_gib": (argument + output - alias + temp) / GIB,
        "flops": flops, "bytes": bytes_accessed,
    }


def compile_steps(config: ml_collections.ConfigDict, mesh, probe: ModelConfig | None = None,
                  steps: tuple[str, ...] = ("train", "eval"), **loop_free):
    """(compiled, seconds, abstract state, matmul FLOPs per device), the first, second and last keyed by step
    name: the `steps` of `config` as the trainer builds them (program.build for 'tpu'), compiled for `mesh`.
    With `probe`, a cost probe: that model, and the `loop_free` microbatches, loss chunk and bptt windows."""
    t = config.train
    program = program_lib.build(config, mesh, "tpu", model_config=probe, **loop_free)
    abstract_state = program.abstract_state
    tokens = jax.ShapeDtypeStruct((t.batch_size, t.seq_len * t.bptt_windows), jax.numpy.int32,
                                  sharding=sharding.batch_sharding(mesh))
    # The batches of config.data.reset_at_eot also carry the reset mask (bool [B, T]).
    resets = {"reset": tokens.update(dtype=jax.numpy.bool_)} if config.data.get("reset_at_eot") else {}
    calls = {"train": (program.train_step, (abstract_state, {"inputs": tokens, "targets": tokens, **resets})),
             "eval": (program.eval_step, (abstract_state.params,
                                          {"inputs": tokens, "targets": tokens, "mask": tokens, **resets},
                                          abstract_state.initial_state))}
    compiled, seconds, matmuls = {}, {}, {}
    for name in steps:
        fn, args = calls[name]
        start = time.perf_counter()
        traced = fn.trace(*args)  # one trace gives both the program and the jaxpr the matmuls are counted in
        compiled[name] = traced.lower().compile()
        seconds[name] = time.perf_counter() - start
        matmuls[name] = matmul_flops(traced.jaxpr.jaxpr) / mesh.devices.size
    return compiled, seconds, abstract_state, matmuls


def cost_probes(config: ml_collections.ConfigDict, mesh, model_config: ModelConfig,
                steps: tuple[str, ...] = ("train", "eval")) -> list[dict]:
    """The compiled `steps` of the 1- and 2-layer cost probes of `config`: its model unrolled (no layer
    scan) over the whole batch in one microbatch, one loss chunk and one bptt window, so the programs have
    no loops. A cost of the n-layer step is then c1 + (n_layer - 1) * (c2 - c1)."""
    t = config.train
    step_len = t.seq_len * t.bptt_windows
    probes = []
    for n in (1, 2):
        small = dataclasses.replace(model_config, n_layer=n, scan_layers=False)
        probes.append(compile_steps(config, mesh, small, steps, microbatches=1,
                                    loss_chunk_tokens=t.batch_size * step_len, bptt_windows=1)[0])
    return probes


def compile_only(config: ml_collections.ConfigDict, topology: str, *, estimate_costs: bool = True,
                 log=print) -> dict:
    """Compile the train and eval steps `config` describes for `topology`; returns the report.
    `estimate_costs`: count the FLOPs and bytes of scanned layers and microbatch loops by extrapolating
    from 1- and 2-layer compiles (two more, small, compiles); without it they are XLA's loop-body-once
    counts, and only the memory figures are exact."""
    devices = topology_devices(topology)
    per_device = device_chip(devices, topology)
    mesh = sharding.make_mesh(config.mesh, devices)
    # Every value checked as the trainer checks it, the batch split against this mesh: one line naming the
    # field rather than XLA's partitioning error after the compile. Nothing is read (resuming=True: no
    # train.init_from needs to exist here).
    train_config.validate(config, mesh, resuming=True)
    # 'auto' choices are made for the target, not for the CPU this compiles on.
    model_config = program_lib.resolve(config, "tpu")
    t = config.train
    log(f"compile-only for {topology}: {len(devices)} x {devices[0].device_kind}, mesh {dict(mesh.shape)}; "
        f"model {model_config.n_layer} x {model_config.d_model} ({model_config.dtype}, scan_layers="
        f"{model_config.scan_layers}, remat={model_config.remat}, WKV {model_config.wkv_form}); batch "
        f"{t.batch_size} x {t.seq_len} as {t.microbatches} microbatch(es)")

    try:
        compiled, seconds, abstract_state, matmuls = compile_steps(config, mesh)
    except Exception as e:  # noqa: BLE001 - libtpu reports an over-budget program as a generic runtime error
        overflow = _hbm_overflow(str(e))
        if overflow is None:
            raise
        needed, available = overflow
        log(f"per device ({devices[0].device_kind}, {per_device.hbm_bytes / GIB:.1f} GiB HBM): XLA stopped "
            f"compiling: the step's temporaries need {needed:.2f} GiB where {available:.2f} GiB are free")
        log(f"train step: DOES NOT FIT\n{_shortfall_advice(needed - available)}")
        return {"topology": topology, "devices": len(devices), "device_kind": devices[0].device_kind,
                "mesh": dict(mesh.shape), "hbm_gib_per_device": per_device.hbm_bytes / GIB, "fits": False,
                "temp_gib_needed": needed, "temp_gib_free": available}
    report = {"topology": topology, "devices": len(devices), "device_kind": devices[0].device_kind,
              "mesh": dict(mesh.shape), "batch_size": t.batch_size, "seq_len": t.seq_len,
              "microbatches": t.microbatches, "hbm_gib_per_device": per_device.hbm_bytes / GIB,
              "n_params": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))}
    for name in ("train", "eval"):
        report[name] = _analyse(compiled[name]) | {"compile_s": seconds[name], "matmul_flops": matmuls[name]}
        log(f"  {name} step compiled in {seconds[name]:.1f}s")

    step_len = t.seq_len * t.bptt_windows  # tokens of each row per step
    has_loops = (model_config.scan_layers or t.microbatches > 1 or t.bptt_windows > 1
                 or t.batch_size * step_len > t.loss_chunk_tokens)
    if estimate_costs and has_loops:
        # XLA's cost analysis counts a loop body once, not once per trip, so the FLOPs and bytes of
        # scanned layers, microbatches and loss chunks come out too small. The layers are identical:
        # compile 1- and 2-layer unrolled models over the whole batch in one microbatch and one loss
        # chunk and one bptt window (no loops), and extrapolate linearly to n_layer.
        probes = cost_probes(config, mesh, model_config)
        L = model_config.n_layer
        for name in ("train", "eval"):
            (c1, c2) = (_cost(p[name]) for p in probes)
            for key, out in (("flops", "flops"), ("bytes accessed", "bytes")):
                one, two = float(c1.get(key, 0.0)), float(c2.get(key, 0.0))
                report[name][out] = one + (L - 1) * (two - one)
        log("  FLOPs and bytes extrapolated from 1- and 2-layer compiles without loops (XLA counts a loop "
            "body once)")

    for name in ("train", "eval"):
        s = report[name]
        s["roofline_flops"] = max(s["flops"], s["matmul_flops"])
        s["roofline_s"] = max(s["roofline_flops"] / per_device.peak_flops, s["bytes"] / per_device.hbm_bandwidth)
    tokens_per_device = t.batch_size * step_len / len(devices)
    model_flops = family_of(model_config).flops_per_token(model_config) * tokens_per_device
    train = report["train"]
    train["model_flops"] = model_flops
    train["roofline_mfu"] = model_flops / per_device.peak_flops / train["roofline_s"] if train["roofline_s"] else 0.0
    report["costs_estimated"] = estimate_costs
    report["fits"] = train["peak_gib"] <= report["hbm_gib_per_device"] and report["eval"]["peak_gib"] <= \
        report["hbm_gib_per_device"]
    log(format_report(report))
    return report


def _shortfall_advice(short_gib: float) -> str:
    return (f"short by {short_gib:.2f} GiB per device: shard parameters and optimizer state wider "
            "(--config.mesh.fsdp=-1), raise --config.train.microbatches, turn on --config.model.remat=True, "
            "or pick a topology with more chips")


_OVERFLOW = re.compile(r"\(([0-9.]+)([KMG])\) exceeds available HBM \(([0-9.]+)([KMG])\)")


def _hbm_overflow(message: str) -> tuple[float, float] | None:
    """(GiB needed, GiB free) from libtpu's error for a program over the chip's memory, e.g. "Used memory
    ... for HLO temporaries (24.91G) exceeds available HBM (15.75G)"; None for any other error."""
    m = _OVERFLOW.search(message)
    if m is None:
        return None
    scale = {"K": 2.0**-20, "M": 2.0**-10, "G": 1.0}
    return float(m.group(1)) * scale[m.group(2)], float(m.group(3)) * scale[m.group(4)]


def format_report(r: dict) -> str:
    hbm = r["hbm_gib_per_device"]
    lines = [f"per device ({r['device_kind']}, {hbm:.1f} GiB HBM):",
             "  step   argument GiB  output GiB  temp GiB  peak GiB  XLA FLOPs  matmul FLOPs     bytes  "
             "roofline s  compile s"]
    for name in ("train", "eval"):
        s = r[name]
        lines.append(f"  {name:<5} {s['argument_gib']:>12.2f} {s['output_gib']:>11.2f} {s['temp_gib']:>9.2f} "
                     f"{s['peak_gib']:>9.2f} {s['flops']:>10.3g} {s['matmul_flops']:>13.3g} {s['bytes']:>9.3g} "
                     f"{s['roofline_s']:>11.4f} {s['compile_s']:>10.1f}")
    t = r["train"]
    if not r["costs_estimated"]:
        lines.append("XLA FLOPs and bytes count each loop body once (--noestimate_costs)")
    if t["matmul_flops"] > t["flops"]:
        lines.append(f"XLA counted {t['flops'] / t['matmul_flops']:.0%} of the train step's matmul FLOPs (windowed "
                     "matmuls over sharded weights count one window): the roofline uses the matmul count")
    lines.append(f"train step: roofline MFU {100 * t['roofline_mfu']:.1f}% ({t['model_flops']:.3g} model FLOPs per "
                 f"device per step); {'FITS' if r['fits'] else 'DOES NOT FIT'}")
    if not r["fits"]:
        worst = max(r["train"]["peak_gib"], r["eval"]["peak_gib"])
        lines.append(_shortfall_advice(worst - hbm))
    return "\n".join(lines)
