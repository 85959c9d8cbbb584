"""This machine's two ceilings, probed in the calling process: the matmul rate (FLOP/s) and the memory
bandwidth (bytes/s), the limits every benchmark here reports its figures against."""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _times(fn, *args, repeats: int, warmup: int = 1, fresh_args=None) -> list[float]:
    """Seconds of `repeats` calls of `fn(*args)` (each blocked on), after `warmup` untimed calls.
    `fresh_args`: a function giving each call its own arguments, called before the clock starts (for a
    function that donates its inputs)."""
    arguments = (lambda: args) if fresh_args is None else fresh_args
    for _ in range(warmup):
        jax.block_until_ready(fn(*arguments()))
    times = []
    for _ in range(repeats):
        call_args = arguments()
        start = time.perf_counter()
        result = jax.block_until_ready(fn(*call_args))
        times.append(time.perf_counter() - start)
        # Freed only now: a large output dropped before the clock stops adds its unmapping to the time
        # (about 0.2 ms per MB here), which the train loop, keeping its outputs as the next state, never pays.
        del result
    return times


def kept_outputs(fn, *args):
    """A call of jit(fn)(*args) that writes its outputs over the previous call's (donated), as the train step
    on CPU writes its gradients (train_step._StepWithGradientBuffers): without this, large outputs land in
    newly mapped memory and the time includes faulting every page of them."""
    jitted = jax.jit(lambda buffers, *args: fn(*args), donate_argnums=0, keep_unused=True)
    # The first buffers as the outputs will be (placed on the device): uncommitted zeros would make the
    # second call compile again.
    holder = [jax.device_put(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(fn, *args)),
                             jax.devices()[0])]

    def call():
        holder[0] = jitted(holder[0], *args)
        return holder[0]
    return call


def best_time(fn, *args, repeats: int = 5) -> float:
    return min(_times(fn, *args, repeats=repeats))


def median_time(fn, *args, repeats: int = 5, warmup: int = 1, fresh_args=None) -> float:
    return statistics.median(_times(fn, *args, repeats=repeats, warmup=warmup, fresh_args=fresh_args))


def matmul_flops(n: int = 2048, dtype=jnp.float32) -> float:
    """FLOP/s of the best of five n x n jnp.dot calls on the default device, in `dtype` with an fp32 result
    (for bf16: the product XLA:CPU runs on AMX / AVX512-BF16 where the CPU has them)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return 2 * n ** 3 / best_time(dot, a, b)


def memory_bandwidth(n_bytes: int = 512 * 2**20) -> float:
    """Bytes/s (read + write) of the faster of two in-place passes over an fp32 array far larger than the
    caches: a numpy copy into an existing array (one thread) and XLA's elementwise pass writing over its
    donated input (all threads). The DRAM ceiling every bytes-based limit here is measured against."""
    a = np.random.default_rng(0).standard_normal(n_bytes // 4).astype(np.float32)
    b = np.empty_like(a)
    copy = 2 * n_bytes / best_time(np.copyto, b, a)
    return max(copy, xla_elementwise_bandwidth(n_bytes, in_place=True))


def xla_elementwise_bandwidth(n_bytes: int = 512 * 2**20, *, in_place: bool = False) -> float:
    """Bytes/s (read + write) of XLA's elementwise pass over an fp32 array far larger than the caches.

    `in_place`: the input is donated and the output takes its buffer, as the train step's state does.
    Otherwise each call writes a newly allocated buffer, as an undonated jitted call's outputs and XLA's
    temporaries are: XLA:CPU maps such large buffers afresh for each call (Linux, glibc), and the first
    write to every 4 KiB page faults, which held this pass to about a fifth of the in-place one on the
    2-core machine of this project."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal(n_bytes // 4), jnp.float32)
    if not in_place:
        return 2 * n_bytes / best_time(jax.jit(lambda x: x * 1.000001 + 1e-7), x)
    fn = jax.jit(lambda x: x * 1.000001 + 1e-7, donate_argnums=0)
    holder = [fn(x)]

    def step():  # each call's output is the next call's (donated) input
        holder[0] = fn(holder[0])
        return holder[0]
    return 2 * n_bytes / best_time(step)
