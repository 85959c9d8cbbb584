"""benchmarks/hlo_bytes.py's reading of a compiled module: bytes, FLOPs and loop trips per instruction."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp


def _load_benchmark(name: str):
    """benchmarks/NAME.py as a module, without putting benchmarks/ on the import path of every later test."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hlo_bytes = _load_benchmark("hlo_bytes")


def test_instructions_in_a_loop_count_its_trips():
    def f(x, w):
        return jax.lax.fori_loop(0, 5, lambda i, x: jnp.tanh(x @ w), x)

    text = jax.jit(f).lower(jnp.ones((64, 128)), jnp.ones((128, 128))).compile().as_text()
    rows = hlo_bytes.rows_of(text)
    matmuls = [r for r in rows if r.flops]
    assert len(matmuls) == 1, rows
    (matmul,) = matmuls
    assert matmul.trips == 5
    assert matmul.flops == 2 * 64 * 128 * 128
    assert matmul.bytes == 4 * (64 * 128 + 128 * 128 + 64 * 128)  # operands and result, fp32
    assert matmul.result == "f32[64,128]"


def test_shapes_and_sizes():
    assert hlo_bytes.nbytes("(bf16[8,1024]{1,0:T(8,128)}, f32[2]{0}, /*index=2*/pred[])") == 8 * 1024 * 2 + 8 + 1
    assert hlo_bytes.short_type("bf16[8,1024]{1,0:T(8,128)(2,1)S(1)}") == "bf16[8,1024]"
