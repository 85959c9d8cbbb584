#!/usr/bin/env bash
# One accelerator run (under 8 minutes on one H100/H200): the Pallas WKV kernel's correctness on the
# device first (PASS/FAIL), then WKV fwd and fwd+bwd of every form at B=16 T=1024 C=1024 bf16 (on GPU also
# the Triton kernel at other block sizes), training steps of 169M and 430M with the kernel and with the associative scan, and RNN decode at batch 1 and 64;
# one table at the end.
#
#     bash benchmarks/device.sh                               # on the device, from anywhere
#     RWKV_DEVICE_SECTIONS=check,wkv bash benchmarks/device.sh  # only the kernel check and WKV (~2 min)
#     RWKV_DEVICE_BENCH_SMALL=1 RWKV_DEVICE_BENCH_LIMIT_SCALE=10 bash benchmarks/device.sh  # CPU dry run
#
# (The dry run uses tiny shapes and interprets the kernel, whose compiles are slow on a CPU: scale the
# per-section time limits.)
#
# Installs nothing: it uses the machine's python3 and its preinstalled JAX (CUDA or TPU build). Each
# section runs in its own process under its own time limit, so a failure, an out-of-memory or a hang in
# one is reported and the rest still run.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
RESULTS="$(mktemp -d)/results.jsonl"
START=$SECONDS

SECTIONS=",${RWKV_DEVICE_SECTIONS:-check,wkv,train,decode},"  # which sections run (the table always)

section() {  # section NAME LIMIT_S ARGS...
  local name=$1 limit=$(( $2 * ${RWKV_DEVICE_BENCH_LIMIT_SCALE:-1} ))
  shift 2
  case "$SECTIONS" in *",${1#--section=},"*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s, at $((SECONDS - START))s)"
  timeout -k 5 "$limit" python3 benchmarks/device_bench.py --results="$RESULTS" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then echo "=== $name: FAILED (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))"; fi
}

python3 -c 'import jax; print("jax", jax.__version__, "devices:", jax.devices())' || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

section "kernel check" 60 --section=check
section "WKV forms" 240 --section=wkv
section "train 169m kernel" 60 --section=train --model=169m --form=pallas
section "train 169m scan" 60 --section=train --model=169m --form=parallel
section "train 430m kernel" 75 --section=train --model=430m --form=pallas
section "train 430m scan" 75 --section=train --model=430m --form=parallel
section "decode" 40 --section=decode
python3 benchmarks/device_bench.py --results="$RESULTS" --section=table
echo "total $((SECONDS - START))s"
