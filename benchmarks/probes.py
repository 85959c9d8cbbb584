"""This machine's two ceilings, probed in the calling process: the matmul rate (FLOP/s) and the memory
bandwidth (bytes/s), the limits every benchmark here reports its figures against."""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _times(fn, *args, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of `repeats` calls of `fn(*args)` (each blocked on), after `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def best_time(fn, *args, repeats: int = 5) -> float:
    return min(_times(fn, *args, repeats=repeats))


def median_time(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
    return statistics.median(_times(fn, *args, repeats=repeats, warmup=warmup))


def matmul_flops(n: int = 2048) -> float:
    """FLOP/s of the best of five n x n fp32 jnp.dot calls on the default device."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), jnp.float32)
    return 2 * n ** 3 / best_time(jax.jit(jnp.dot), a, b)


def memory_bandwidth(n_bytes: int = 512 * 2**20) -> float:
    """Bytes/s of the best of five copies of an fp32 array far larger than the caches (numpy, counting the
    bytes read and the bytes written): the DRAM ceiling. (XLA:CPU's own elementwise passes reach about a
    third of it on the 2-core machine of this project: see `xla_elementwise_bandwidth`.)"""
    a = np.random.default_rng(0).standard_normal(n_bytes // 4).astype(np.float32)
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - start)
    return 2 * n_bytes / min(times)


def xla_elementwise_bandwidth(n_bytes: int = 512 * 2**20) -> float:
    """Bytes/s (read + write) of XLA's elementwise pass over an fp32 array far larger than the caches."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal(n_bytes // 4), jnp.float32)
    return 2 * n_bytes / best_time(jax.jit(lambda x: x * 1.000001 + 1e-7), x)
