"""Compile-only planning for TPU topologies on this CPU (needs libtpu, installed by requirements-dev.txt)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    import libtpu  # noqa: F401
    HAVE_LIBTPU = True
except ImportError:
    HAVE_LIBTPU = False

needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e .[tpu-aot])")


def compile_only(*args, timeout=1500):
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    return subprocess.run([sys.executable, "train.py", "--compile_only", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@needs_libtpu
def test_tiny_config_compiles_for_a_v5e_2x2_and_reports_its_plan():
    result = compile_only("--config=configs/tiny.py", "--topology=v5e:2x2", "--config.mesh.fsdp=4",
                          "--config.mesh.data=1")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "4 x TPU v5 lite" in out and "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in out
    assert "FITS" in out and "roofline MFU" in out
    train_row = next(line for line in out.splitlines() if re.match(r"\s+train\s+[0-9.]+\s", line))
    argument, output, temp, peak, flops, matmuls, bytes_, roofline, compile_s = map(float, train_row.split()[1:])
    # tiny: 4 x 128, vocab 4096: about 2.9M parameters, fp32 + two Adam moments, sharded 4 ways.
    assert 0 < argument < 0.05 and peak >= argument and flops > 1e9 and bytes_ > 1e7 and compile_s > 0
    # The jaxpr's matmul count, from the architecture: 13 D^2 multiply-adds per token per layer and V D for the
    # head, 3x for forward and backward; the head's forward runs twice (the loss chunk is rematerialised).
    V, D, L, tokens_per_device = 4096, 128, 4, 16 * 128 / 4
    expected = 2 * (3 * 13 * D * D * L + 4 * V * D) * tokens_per_device
    assert abs(matmuls - expected) < 0.01 * expected, (matmuls, expected)


def test_matmul_flops_counts_scan_bodies_per_trip_and_the_backward():
    import jax
    import jax.numpy as jnp

    from rwkv_jax.train.aot import matmul_flops

    def f(x_BD, w_DD):  # three matmuls in a scan, then a sum
        return jax.lax.scan(lambda c, _: (c @ w_DD, None), x_BD, None, length=3)[0].sum()

    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    one = 2 * 4 * 8 * 8
    assert matmul_flops(jax.make_jaxpr(f)(x, w).jaxpr) == 3 * one
    # the gradient with respect to w: forward, then two matmuls per step backward
    assert matmul_flops(jax.make_jaxpr(jax.grad(f, argnums=1))(x, w).jaxpr) == 9 * one


def test_compile_only_needs_a_topology():
    result = compile_only("--config=configs/tiny.py", timeout=120)
    assert result.returncode == 2 and "--compile_only needs --config and --topology" in result.stderr


@needs_libtpu
def test_a_bad_topology_name_is_one_clear_error():
    result = compile_only("--config=configs/tiny.py", "--topology=v5e:banana", timeout=300)
    assert result.returncode != 0 and "is not a TPU topology" in result.stderr + result.stdout


@needs_libtpu
@pytest.mark.slow
def test_169m_plans_on_v5e_2x4_and_an_oversized_plan_fails_naming_the_shortfall():
    result = compile_only("--config=configs/169m.py", "--topology=v5e:2x4", "--config.mesh.fsdp=-1",
                          "--config.mesh.data=1", "--config.train.batch_size=16", "--config.train.microbatches=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FITS" in result.stdout
    assert "scan_layers=True" in result.stdout  # the config's 'auto', resolved for the TPU, not this CPU
    # 1.5B replicated on every chip (pure data parallelism): fp32 params + Adam + grads do not fit 16 GB.
    result = compile_only("--config=configs/1b5.py", "--topology=v5e:2x2", "--config.mesh.data=-1",
                          "--config.train.batch_size=4", "--config.train.microbatches=1")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "DOES NOT FIT" in result.stdout and "short by" in result.stdout and "fsdp" in result.stdout


def test_hbm_overflow_is_read_from_libtpus_error():
    """libtpu stops compiling a program over the chip's memory with a generic error; compile_only reads
    the sizes out of it to report the shortfall (the slow test above runs the real case)."""
    from rwkv_jax.train import aot
    message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
               "Used memory 25.11G of 15.75G hbm. Used memory for HLO temporaries (24.91G) exceeds available "
               "HBM (15.75G).")
    assert aot._hbm_overflow(message) == (24.91, 15.75)
    assert aot._hbm_overflow("(512M) exceeds available HBM (1G)") == (0.5, 1.0)
    assert aot._hbm_overflow("INTERNAL: something else") is None
    assert "short by 9.16 GiB" in aot._shortfall_advice(24.91 - 15.75)
