"""Where the bytes of a train step go: the compiled TPU program's fusions, custom calls (Pallas kernels),
collectives and copies ranked by the bytes each moves per chip, with the model source line each comes from,
and totals by part of the model. Compiled ahead of time on this machine, as `train.py --compile_only` does
(rwkv_jax/train/aot.py: the same program, the same cost probes; needs libtpu).

    python benchmarks/hlo_bytes.py --config=configs/430m.py --topology=v5e:2x4 \\
        --config.train.batch_size=64 --config.train.microbatches=1 --config.mesh.fsdp=-1 --config.mesh.data=1

An instruction's bytes are its operands' sizes plus its result's, as XLA's cost model counts a fusion
(it counts a sliced operand as the part read; here the whole operand: fusions that read a slice of a
big array come out larger than XLA says). Its FLOPs are those of the dots and convolutions inside it.

Loops: XLA's cost analysis counts a loop body once. Here each instruction is weighted by the trips of the
loops around it, read from the loop's condition (`counter < constant`): the layer scan, the microbatch
and loss-chunk loops, and the windowed matmul loops the partitioner makes for weights sharded over fsdp
(whose bytes XLA's total also counts once). The ranked table is the real step's, weighted. The per-part
table is made from aot.py's loop-free 1- and 2-layer probes: per layer = c2 - c1, extrapolated to n_layer
as c1 + (n_layer - 1)(c2 - c1) (aot.py's estimate of the step's bytes, the "XLA" column), next to the
same sums of this script's byte model, once per loop body and loop-weighted.

Parts come from each instruction's source stack (HLO metadata stack frames): the innermost model function
on it (TimeMix, ChannelMix, Block's layernorms and residual adds, the WKV kernels, the embedding and ln0,
the head and loss, the optimizer) and the pass (fwd, bwd, remat: the rematerialised forward).
"""

import dataclasses
import math
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_jax.train import aot, sharding  # noqa: E402
from rwkv_jax.train import metrics as metrics_lib  # noqa: E402
from rwkv_jax.train import program as program_lib  # noqa: E402

_FLAGS = {}  # defined when run as a program (importing this module, as tests/test_hlo_bytes.py does, defines none)


def _define_flags() -> None:
    _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "training config file", lock_config=False)
    _FLAGS["topology"] = flags.DEFINE_string("topology", "v5e:2x4", "TPU topology to compile for")
    _FLAGS["top"] = flags.DEFINE_integer("top", 40, "instructions in the ranked table")
    _FLAGS["probes"] = flags.DEFINE_bool("probes", True, "compile the 1- and 2-layer probes for the per-part table")
    _FLAGS["dump"] = flags.DEFINE_string("dump", "", "directory to write the compiled HLO texts into")
    _FLAGS["nested"] = flags.DEFINE_bool(
        "nested_slices", False, "count an operand that a nested fusion only slices as the slices read; XLA's cost "
        "model (the default here) counts it whole, e.g. the stacked [n_layer, ...] block inputs read by each "
        "layer's remat fusions: 1B5 on v5e:4x4, 2.79e11 loop-weighted bytes per chip as XLA counts, 1.85e11 so")


# Whether a fusion's operand read only by a nested fusion's slices counts as those slices (--nested_slices).
LOOK_INTO_NESTED = [False]

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
               "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%(\S+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%(\S+) .*\{\s*$")
# Instructions that move no data of their own (the *-done half of an async pair is counted at its start).
NO_BYTES = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id", "replica-id",
            "after-all", "opt-barrier", "copy-done", "collective-permute-done", "all-gather-done",
            "all-reduce-done", "slice-done", "async-done", "send-done", "recv-done", "while", "conditional",
            "call", "iota"}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")


def arrays(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(type_str)]


def nbytes(type_str: str) -> float:
    return sum(DTYPE_BYTES[d] * math.prod(s) for d, s in arrays(type_str))


def short_type(type_str: str) -> str:
    return ",".join(f"{d}[{','.join(map(str, s))}]" for d, s in arrays(type_str))


@dataclasses.dataclass
class Instr:
    name: str
    type: str
    opcode: str
    operands: list[str]
    attrs: str
    args: str = ""          # the text between the opcode's parentheses
    root: bool = False

    def attr(self, key: str) -> str | None:
        m = re.search(key + r"=(%?[\w.\-]+)", self.attrs)
        return m.group(1).lstrip("%") if m else None


def _split_operands(rest: str) -> tuple[str, str]:
    """(the operand list, the attributes after it) of the text after an opcode's '('."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return rest[:i], rest[i + 1:]
    return rest, ""


class Module:
    """The computations of an HLO module's text, and its stack-frame tables."""

    def __init__(self, text: str):
        self.comps: dict[str, list[Instr]] = {}
        self.entry = None
        current = None
        for line in text.splitlines():
            if current is None:
                m = _COMP.match(line)
                if m:
                    current = m.group(1)
                    self.comps[current] = []
                    if line.startswith("ENTRY"):
                        self.entry = current
                continue
            if line.startswith("}"):
                current = None
                continue
            m = _INSTR.match(line)
            if m:
                operands, attrs = _split_operands(m.group(5))
                self.comps[current].append(Instr(m.group(2), m.group(3), m.group(4),
                                                 re.findall(r"%([\w.\-]+)", operands), attrs, operands,
                                                 bool(m.group(1))))
        self.types = {i.name: i.type for comp in self.comps.values() for i in comp}
        self._frames(text)

    def _frames(self, text: str):
        def table(name):
            m = re.search(r"\n" + name + r"\n(.*?)\n\n", text, re.S)
            return m.group(1).splitlines() if m else []
        files = {int(n): v.strip('"') for n, v in (line.split(" ", 1) for line in table("FileNames"))}
        funcs = {int(n): v.strip('"') for n, v in (line.split(" ", 1) for line in table("FunctionNames"))}
        self.locations, self.frames = {}, {}
        for line in table("FileLocations"):
            d = dict(re.findall(r"(\w+)=(\d+)", line))
            self.locations[int(line.split()[0])] = (files[int(d["file_name_id"])], funcs[int(d["function_name_id"])],
                                                    int(d["line"]))
        for line in table("StackFrames"):
            d = dict(re.findall(r"(\w+)=(\d+)", line))
            # parent_frame_id is printed one above the frame id it names (0: none)
            self.frames[int(line.split()[0])] = (int(d["file_location_id"]), int(d["parent_frame_id"]) - 1)

    def stack(self, frame: int | None) -> list[tuple[str, str, int]]:
        """(file, function, line) from the innermost frame out."""
        out, seen = [], set()
        while frame and frame in self.frames and frame not in seen:
            seen.add(frame)
            loc, frame = self.frames[frame]
            out.append(self.locations[loc])
        return out

    def trips(self, while_instr: Instr) -> int:
        """A while loop's trip count: XLA's known_trip_count, else the constant its condition compares the
        counter against (`i < n`, counting from 0), else 1."""
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_instr.attrs)
        if m:
            return int(m.group(1))
        cond = self.comps.get(while_instr.attr("condition") or "", [])
        return self._const_trip(cond)

    @staticmethod
    def _const_trip(cond: list[Instr]) -> int:
        consts = {i.name: i.const for i in cond if i.opcode == "constant" and getattr(i, "const", None) is not None}
        for i in cond:
            if i.opcode == "compare" and "direction=LT" in i.attrs:
                for op in i.operands:
                    if op in consts:
                        return max(1, consts[op])
        return 1

    def fusion_bytes(self, comp_name: str, operand_types: list[str], result: str) -> float:
        """A fusion's bytes as XLA's cost model counts them: an operand only sliced counts the slices read,
        the buffer a dynamic-update-slice writes in place counts only the update (read and written)."""
        comp = self.comps[comp_name]
        by_name = {i.name: i for i in comp}
        users = defaultdict(list)
        for i in comp:
            for n, o in enumerate(i.operands):
                users[o].append((i, n))
        total = 0.0
        for i in comp:
            if i.opcode == "parameter":
                k = int(i.args.strip() or 0)
                full = nbytes(operand_types[k]) if k < len(operand_types) else nbytes(i.type)
                total += self._param_read(comp_name, i, full, users)
        root = next((i for i in comp if i.root), comp[-1] if comp else None)
        elements = [by_name.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
        out = 0.0
        for e in elements:
            if e is None:
                continue
            if e.opcode == "parameter":
                continue
            if e.opcode == "dynamic-update-slice":
                out += 2 * nbytes(by_name[e.operands[1]].type) if e.operands[1] in by_name else nbytes(e.type)
            else:
                out += nbytes(e.type)
        return total + out if comp else sum(nbytes(t) for t in operand_types) + nbytes(result)

    def _param_read(self, comp_name: str, param: Instr, full: float, users: dict | None = None) -> float:
        """The bytes a fused computation reads of its parameter `param` (`full`: the operand's size): the
        slices taken of it, nothing where it is updated in place or passed through, the reads of the
        nested fusions it goes into; else all of it."""
        if users is None:
            users = defaultdict(list)
            for i in self.comps[comp_name]:
                for n, o in enumerate(i.operands):
                    users[o].append((i, n))
        read = 0.0
        for u, n in _through_bitcasts(param.name, users):
            if u.opcode in ("slice", "dynamic-slice") and n == 0:
                read += nbytes(u.type)
            elif (u.opcode == "dynamic-update-slice" and n == 0) or (u.root and u.opcode == "tuple"):
                pass  # updated in place, or passed through (a loop's carried buffer)
            elif u.opcode == "fusion" and u.attr("calls") in self.comps and LOOK_INTO_NESTED[0]:
                inner = next((i for i in self.comps[u.attr("calls")]
                              if i.opcode == "parameter" and int(i.args.strip() or 0) == n), None)
                read += full if inner is None else self._param_read(u.attr("calls"), inner, full)
            else:
                return full
        return min(full, read)

    def flops(self, comp_name: str) -> float:
        total = 0.0
        for i in self.comps.get(comp_name, []):
            if i.opcode == "dot":
                lhs = arrays(self.types.get(i.operands[0], ""))
                dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", i.attrs)
                if lhs and dims:
                    k = math.prod(lhs[0][1][int(d)] for d in dims.group(1).split(",") if d)
                    total += 2.0 * math.prod(arrays(i.type)[0][1]) * k
            elif i.opcode == "convolution":
                rhs = arrays(self.types.get(i.operands[1], ""))
                labels = re.search(r"dim_labels=\w+_(\w+)->", i.attrs)
                if rhs and labels and "o" in labels.group(1):
                    shape = rhs[0][1]
                    out = math.prod(arrays(i.type)[0][1])
                    total += 2.0 * out * math.prod(shape) / shape[labels.group(1).index("o")]
            elif i.opcode == "fusion" and i.attr("calls"):
                total += self.flops(i.attr("calls"))
        return total


def _through_bitcasts(name: str, users: dict):
    """The (user, operand index) pairs of `name` in a fused computation, looking through bitcasts."""
    for u, n in users.get(name, []):
        if u.opcode == "bitcast":
            yield from _through_bitcasts(u.name, users)
        else:
            yield u, n


def _attach_constants(text: str, module: Module):
    """Scalar integer constants' values, on their Instr (for loop trip counts)."""
    for comp in module.comps.values():
        for i in comp:
            if i.opcode == "constant":
                i.const = int(i.args) if re.fullmatch(r"-?\d+", i.args.strip()) and "[]" in i.type else None


@dataclasses.dataclass
class Row:
    name: str
    opcode: str
    operands: str
    result: str
    bytes: float         # once
    flops: float         # once
    trips: int           # loop trips around it
    part: str
    phase: str
    source: str


PART_ORDER = ["embedding + ln0", "layernorms + residual", "time-mix", "WKV", "channel-mix", "head + loss",
              "optimizer", "collectives", "other"]


def classify(instr: Instr, op_name: str, stack: list[tuple[str, str, int]]) -> tuple[str, str, str]:
    """(part, phase, source) of an instruction."""
    phase = "remat" if "rematted_computation" in op_name else "bwd" if "transpose(" in op_name else "fwd"
    ours = [(f, fn, ln) for f, fn, ln in stack if "/rwkv_jax/" in f]
    # The projection's caller, not the shared product helper of model/layers.py.
    ours = [x for x in ours if not (x[0].endswith("model/layers.py") and "dot" in x[1])] or ours
    source = f"{ours[0][0].split('/rwkv_jax/')[-1]}:{ours[0][2]} {ours[0][1]}" if ours else ""
    funcs = [fn for _, fn, _ in ours]
    files = [f for f, _, _ in stack]
    if instr.opcode.startswith(COLLECTIVES):
        part = "collectives"
    elif "wkv" in op_name or any("/ops/wkv" in f for f in files):
        part = "WKV"
    elif any(fn.startswith("TimeMix.") for fn in funcs):
        part = "time-mix"
    elif any(fn.startswith("ChannelMix.") for fn in funcs):
        part = "channel-mix"
    elif any(fn.startswith("Block.") for fn in funcs):
        part = "layernorms + residual"
    elif any(fn in ("chunked_token_losses", "_chunk_loss", "_chunk_loss_fwd", "_chunk_loss_bwd", "RWKV.head_operands")
             or fn.startswith("chunked_token_losses.") for fn in funcs):
        part = "head + loss"
    elif any(fn.startswith("RWKV.hidden") for fn in funcs):
        part = "embedding + ln0"
    elif any("/optax/" in f for f in files) or any("optim.py" in f for f in files):
        part = "optimizer"
    else:
        part = "other"
    return part, phase, source


def rows_of(text: str) -> list[Row]:
    """Every data-moving instruction of a compiled module, with the loop trips around it."""
    module = Module(text)
    _attach_constants(text, module)
    rows: list[Row] = []

    def walk(comp: str, trips: int, seen: tuple):
        for i in module.comps.get(comp, []):
            if i.opcode == "while":
                body = i.attr("body")
                if body and body not in seen:
                    walk(body, trips * module.trips(i), seen + (body,))
                continue
            if i.opcode == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", i.attrs)
                for b in re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else []:
                    walk(b, trips, seen + (b,))
                for key in ("true_computation", "false_computation"):
                    if i.attr(key):
                        walk(i.attr(key), trips, seen)
                continue
            if i.opcode in ("call", "async-start") and (i.attr("to_apply") or i.attr("calls")):
                walk(i.attr("to_apply") or i.attr("calls"), trips, seen)
                continue
            if i.opcode in NO_BYTES:
                continue
            if i.opcode == "custom-call" and re.search(r'custom_call_target="(AllocateBuffer|ConcatBitcast)"', i.attrs):
                continue  # an allocation; a concatenation of adjacent buffers by bitcast
            operand_types = [module.types.get(o, "") for o in i.operands]
            result = i.type
            if i.opcode.endswith("-start"):
                elements = re.findall(r"\w+\[[0-9,]*\]", i.type)  # (operand, result, context...)
                result = elements[1] if len(elements) > 1 else i.type
            size = sum(nbytes(t) for t in operand_types) + nbytes(result)
            if i.opcode in ("slice-start", "slice", "dynamic-slice"):
                size = 2 * nbytes(result)  # the part read, and written
            if i.opcode == "fusion" and i.attr("calls") in module.comps:
                size = module.fusion_bytes(i.attr("calls"), operand_types, result)
            op_name = (re.search(r'op_name="([^"]*)"', i.attrs) or [None, ""])[1]
            frame = re.search(r"stack_frame_id=(\d+)", i.attrs)
            part, phase, source = classify(i, op_name, module.stack(int(frame.group(1)) if frame else None))
            target = re.search(r'custom_call_target="([^"]*)"', i.attrs)
            label = i.opcode if i.opcode != "custom-call" else f"custom-call {target.group(1) if target else ''}"
            flops = _instr_flops(module, i)
            big = [short_type(t) for t in operand_types if nbytes(t) >= 2**20]  # the small ones left out
            results = [f"{d}[{','.join(map(str, sh))}]" for d, sh in arrays(result)]
            big_results = [r for r in results if nbytes(r) >= 2**20]
            rows.append(Row(i.name, label, " ".join(big), ",".join(big_results or results[:1]),
                            size, flops, trips, part, phase, source or op_name[-60:]))

    walk(module.entry, 1, ())
    return rows


def _instr_flops(module: Module, i: Instr) -> float:
    module.comps["__one__"] = [i]
    try:
        return module.flops("__one__")
    finally:
        del module.comps["__one__"]


def part_sums(rows: list[Row], weighted: bool) -> dict[str, float]:
    sums = defaultdict(float)
    for r in rows:
        sums[r.part] += r.bytes * (r.trips if weighted else 1)
    return sums


def main(argv):
    del argv
    config = _FLAGS['config'].value
    LOOK_INTO_NESTED[0] = _FLAGS['nested'].value
    start = time.perf_counter()
    devices = aot.topology_devices(_FLAGS['topology'].value)
    chip = aot.device_chip(devices, _FLAGS['topology'].value)
    mesh = sharding.make_mesh(config.mesh, devices)
    model_config = program_lib.resolve(config, "tpu")
    t = config.train
    L = model_config.n_layer
    print(f"{_FLAGS['topology'].value}: mesh {dict(mesh.shape)}; model {L} x {model_config.d_model} "
          f"({model_config.dtype}, "
          f"remat={model_config.remat}, WKV {model_config.wkv_form}); batch {t.batch_size} x {t.seq_len} as "
          f"{t.microbatches} microbatch(es)", flush=True)
    compiled, _, _, matmuls = aot.compile_steps(config, mesh, steps=("train",))
    text = compiled["train"].as_text()
    xla_bytes = float(aot._cost(compiled["train"]).get("bytes accessed", 0.0))
    if _FLAGS['dump'].value:
        Path(_FLAGS['dump'].value).mkdir(parents=True, exist_ok=True)
        (Path(_FLAGS['dump'].value) / "train.hlo.txt").write_text(text)
    rows = rows_of(text)
    once = sum(r.bytes for r in rows)
    weighted = sum(r.bytes * r.trips for r in rows)
    print(f"\ntrain step as compiled: {len(rows)} data-moving instructions; bytes per chip: XLA {xla_bytes:.3g} "
          f"(loop bodies once), this count {once:.3g} once, {weighted:.3g} loop-weighted "
          f"(compiled in {time.perf_counter() - start:.0f}s)")

    top = sorted(rows, key=lambda r: -r.bytes * r.trips)[:_FLAGS['top'].value]
    print(f"\nTop {len(top)} by bytes per chip per step (loop-weighted), of {weighted:.3g}:\n")
    print("| # | instruction | op | trips | bytes/step | % | GFLOP/step | part | pass | source | "
          "operands of 1 MiB and more -> result |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, r in enumerate(top, 1):
        b = r.bytes * r.trips
        print(f"| {n} | {r.name} | {r.opcode} | {r.trips} | {b:.3g} | {100 * b / weighted:.1f} | "
              f"{r.flops * r.trips / 1e9:.3g} | {r.part} | {r.phase} | {r.source} | {r.operands} -> {r.result} |")

    step_sums = part_sums(rows, True)
    if not _FLAGS['probes'].value:
        _print_parts({"step (weighted)": step_sums}, weighted)
        return
    probes = aot.cost_probes(config, mesh, model_config, steps=("train",))
    probe_rows = [rows_of(p["train"].as_text()) for p in probes]
    probe_xla = [float(aot._cost(p["train"]).get("bytes accessed", 0.0)) for p in probes]
    if _FLAGS['dump'].value:
        for n, p in zip((1, 2), probes):
            (Path(_FLAGS['dump'].value) / f"probe{n}.hlo.txt").write_text(p["train"].as_text())
    columns = {}
    for label, w in (("once", False), ("weighted", True)):
        s1, s2 = (part_sums(r, w) for r in probe_rows)
        columns[f"per layer ({label})"] = {k: s2.get(k, 0) - s1.get(k, 0) for k in set(s1) | set(s2)}
        columns[f"{L} layers ({label})"] = {k: s1.get(k, 0) + (L - 1) * (s2.get(k, 0) - s1.get(k, 0))
                                           for k in set(s1) | set(s2)}
    columns["step as compiled (weighted)"] = step_sums
    xla_total = probe_xla[0] + (L - 1) * (probe_xla[1] - probe_xla[0])
    print(f"\nBytes per chip by part: from the 1- and 2-layer probes (XLA's own count of them: {probe_xla[0]:.3g}, "
          f"{probe_xla[1]:.3g}; extrapolated to {L} layers {xla_total:.3g}, compile_only's figure)\n")
    _print_parts(columns, None)
    flops_total = matmuls["train"]
    for label, b in (("XLA's bytes (compile_only)", xla_total),
                     ("the probes' weighted bytes", sum(columns[f"{L} layers (weighted)"].values())),
                     ("the step's weighted bytes", weighted)):
        roof = max(flops_total / chip.peak_flops, b / chip.hbm_bandwidth)
        model_flops = metrics_lib.flops_per_token(model_config.vocab_size, model_config.d_model, L) * \
            t.batch_size * t.seq_len * t.bptt_windows / len(devices)
        print(f"roofline with {label} {b:.3g}: {roof:.4f} s, MFU {100 * model_flops / chip.peak_flops / roof:.1f}% "
              f"(matmul FLOPs {flops_total:.3g} per chip)")
    print(f"\ntotal time {time.perf_counter() - start:.0f}s")


def _print_parts(columns: dict[str, dict[str, float]], total: float | None):
    names = list(columns)
    print("| part | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    parts = PART_ORDER + sorted({k for c in columns.values() for k in c} - set(PART_ORDER))
    for p in parts:
        if any(c.get(p) for c in columns.values()):
            print(f"| {p} | " + " | ".join(f"{columns[n].get(p, 0):.3g}" for n in names) + " |")
    print("| total | " + " | ".join(f"{sum(columns[n].values()):.3g}" for n in names) + " |")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)
