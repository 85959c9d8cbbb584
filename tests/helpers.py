"""Helpers shared by the test modules (a test module imports from here, from tests.peers, or takes a
fixture of tests/conftest.py; never from another test module):

  * the WKV float64 references and inputs (test_wkv, test_wkv_pallas, test_resets; WKV-7: test_wkv7,
    test_wkv7_pallas) and the sharded Pallas
    probe (test_wkv_pallas, test_resets);
  * a byte-level HF tokenizer file (test_generate, test_eval, test_commands, test_state_tuning);
  * tiny training runs, in-process and as `python train.py` subprocesses, and what they leave in their
    workdir (test_train, test_train_failures, test_resets, test_state_tuning, test_streams);
  * random train states and their checkpoints, with the 8-device child process of test_checkpoint.
"""

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rwkv_jax.io.checkpoint import Checkpointer
from rwkv_jax.model import ModelConfig
from rwkv_jax.ops.wkv4 import WKVState, empty_state
from rwkv_jax.train import optim, sharding, train_step

REPO = Path(__file__).resolve().parents[1]


# --- WKV: inputs, float64 references, comparisons ---------------------------------------------------------

WKV_B, WKV_C = 2, 8  # test_wkv's batch and channels: the defaults of make_inputs and extreme_inputs
WKV_GRAD_NAMES = ("time_decay", "time_first", "k", "v", "state.a", "state.b", "state.p")


def grad_args(x, seed):
    """Positional arguments of `value_and_grads` for inputs x (empty state if x has none) and random weights."""
    rng = np.random.default_rng(seed)
    batch, T, channels = x["k"].shape
    r = {"y": rng.normal(size=(batch, T, channels)), "a": rng.normal(size=(batch, channels)),
         "b": rng.normal(size=(batch, channels)), "p": rng.normal(size=(batch, channels))}
    r = {name: jnp.asarray(value, jnp.float32) for name, value in r.items()}
    state = x.get("state") or empty_state(batch, channels)
    return (x["time_decay"], x["time_first"], x["k"], x["v"], *state, r)


def make_inputs(seed, T, *, batch=WKV_B, channels=WKV_C, with_state=True):
    """Moderate fp32 inputs: raw time_decay in [-3, 0.5] (w in [-1.65, -0.05]) so that an initial state
    still matters after tens of tokens, time_first, k, v ~ N(0, 1); a random initial state with b > 0 (it is
    a denominator) and p ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    x = dict(time_decay=rng.uniform(-3.0, 0.5, channels), time_first=rng.normal(size=channels),
             k=rng.normal(size=(batch, T, channels)), v=rng.normal(size=(batch, T, channels)))
    if with_state:
        x["state"] = WKVState(rng.normal(size=(batch, channels)), rng.uniform(0.5, 2.0, (batch, channels)),
                              rng.normal(size=(batch, channels)))
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), x)


def extreme_inputs(seed, T, *, batch=WKV_B, channels=WKV_C, dtype=jnp.float32):
    """k, v uniform in [-60, 60], raw time_decay in [-8, 6] (w from -3e-4 to -403), time_first in [-10, 10]."""
    rng = np.random.default_rng(seed)
    return dict(time_decay=jnp.asarray(rng.uniform(-8, 6, channels), dtype),
                time_first=jnp.asarray(rng.uniform(-10, 10, channels), dtype),
                k=jnp.asarray(rng.uniform(-60, 60, (batch, T, channels)), dtype),
                v=jnp.asarray(rng.uniform(-60, 60, (batch, T, channels)), dtype))


def reference_wkv(time_decay, time_first, k, v, state=None):
    """float64 WKV straight from the definition, without any rescaling:

        y_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{p0 + t w} a0 + e^{u + k_t} v_t)
            / (sum_{i<t} e^{(t-1-i) w + k_i}     + e^{p0 + t w} b0 + e^{u + k_t}),   w = -exp(time_decay).

    Returns y, the unscaled final numerator and denominator (a*e^p and b*e^p of the final state), and the
    final running-maximum exponent p = max(p0 + T w, max_i k_i + (T-1-i) w) that every form keeps.
    O(T^2) and without overflow guard: for moderate inputs and T.
    """
    w, u = -np.exp(np.asarray(time_decay, np.float64)), np.asarray(time_first, np.float64)
    k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
    batch, T, channels = k.shape
    if state is None:
        a0 = b0 = np.zeros((batch, channels))
        p0 = np.full((batch, channels), -np.inf)
    else:
        a0, b0, p0 = (np.asarray(s, np.float64) for s in state)

    def sums(t):  # everything before token t: tokens 0..t-1 decayed, and the initial state decayed t steps
        lag = (t - 1 - np.arange(t))[:, None]  # [t, 1]
        weight = np.exp(lag * w + k[:, :t])    # [B, t, C]
        initial = np.exp(p0 + t * w)           # [B, C]; 0 for an empty state
        return (weight * v[:, :t]).sum(1) + initial * a0, weight.sum(1) + initial * b0

    y = np.empty((batch, T, channels))
    for t in range(T):
        num, den = sums(t)
        bonus = np.exp(u + k[:, t])
        y[:, t] = (num + bonus * v[:, t]) / (den + bonus)
    num, den = sums(T)
    p = np.maximum(p0 + T * w, (k + (T - 1 - np.arange(T))[:, None] * w).max(axis=1))
    return y, num, den, p


def reference_recurrence(time_decay, time_first, k, v):
    """float64 WKV from an empty state by the unscaled recurrence (num <- e^w num + e^k v): O(T), for long
    sequences. float64 holds every term for |k| <= 60, |u| <= 10 (e^70 ~ 3e30, e^-70 ~ 4e-31)."""
    w, u = -np.exp(np.asarray(time_decay, np.float64)), np.asarray(time_first, np.float64)
    k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
    num = den = np.zeros((k.shape[0], k.shape[2]))
    y = np.empty(k.shape)
    for t in range(k.shape[1]):
        bonus = np.exp(u + k[:, t])
        y[:, t] = (num + bonus * v[:, t]) / (den + bonus)
        num, den = np.exp(w) * num + np.exp(k[:, t]) * v[:, t], np.exp(w) * den + np.exp(k[:, t])
    return y


def assert_close(actual, desired, rtol, atol=0.0, err_msg=""):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(desired, np.float64),
                               rtol=rtol, atol=atol, err_msg=err_msg)


def assert_state_close(actual: WKVState, desired: WKVState, rtol, atol, err_msg=""):
    for name, x, y in zip(WKVState._fields, actual, desired):
        assert x.dtype == jnp.float32, f"state.{name} is {x.dtype}"
        assert_close(x, y, rtol, atol, err_msg=f"{err_msg} state.{name}")


# --- WKV-7: inputs and float64 references (test_wkv7, test_wkv7_pallas) ------------------------------------

WKV7_H, WKV7_N = 2, 64  # heads and head size of wkv7_inputs by default
WKV7_W_MIN = float(np.exp(-np.exp(-0.5)))  # 0.5453: the model's smallest decay, exp(-exp(-0.5) sigmoid(inf))


def wkv7_inputs(B, T, seed=0, decay="mixed", heads=WKV7_H, N=WKV7_N):
    """Inputs as the RWKV-7 model makes them: kk unit-norm per head, a = -kk, b = kk * iclr with iclr in
    (0, 1), w = exp(-exp(-0.5) sigmoid(z)); `decay` picks z: 'fast' (w near 0.545), 'slow' (w near 1) or
    'mixed' (the whole range). Returns the six [B, T, H, N] fp32 streams and an initial state."""
    rng = np.random.default_rng(seed)
    shape = (B, T, heads, N)
    z = {"mixed": rng.normal(0, 3, shape), "fast": rng.uniform(8, 12, shape),
         "slow": rng.uniform(-16, -12, shape)}[decay]
    w = np.exp(-np.exp(-0.5) / (1 + np.exp(-z)))
    kk = rng.normal(size=shape)
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    iclr = rng.uniform(0.02, 0.98, shape)
    r, k, v = rng.normal(0, 0.5, shape), rng.normal(0, 0.5, shape), rng.normal(0, 1, shape)
    state = rng.normal(0, 0.3, (B, heads, N, N))
    streams = [x.astype(np.float32) for x in (r, w, k, v, -kk, kk * iclr)]
    return streams, state.astype(np.float32)


def wkv7_reference(r, w, k, v, a, b, state, reset_BT=None, reset_state=None):
    """The recurrence in float64 numpy, token by token: S = S diag(w) + (S a) b^T + v k^T, y = S r."""
    r, w, k, v, a, b, S = (np.asarray(x, np.float64) for x in (r, w, k, v, a, b, state))
    ys = []
    for t in range(r.shape[1]):
        if reset_BT is not None:
            R = np.zeros_like(S) if reset_state is None else np.broadcast_to(reset_state, S.shape)
            S = np.where(reset_BT[:, t, None, None, None], R, S)
        Sa = np.einsum("bhij,bhj->bhi", S, a[:, t])
        vk = np.einsum("bhi,bhj->bhij", v[:, t], k[:, t])
        S = S * w[:, t, :, None, :] + Sa[..., None] * b[:, t, :, None, :] + vk
        ys.append(np.einsum("bhij,bhj->bhi", S, r[:, t]))
    return np.stack(ys, axis=1), S


def _wkv7_scan_reference(r, w, k, v, a, b, state):
    """The same recurrence as a plain lax.scan (for float64 autodiff gradients)."""
    def token(S, x):
        r, w, k, v, a, b = x
        Sa = jnp.einsum("bhij,bhj->bhi", S, a)
        S = S * w[:, :, None, :] + Sa[..., None] * b[:, :, None, :] + v[..., None] * k[:, :, None, :]
        return S, jnp.einsum("bhij,bhj->bhi", S, r)
    S, y = jax.lax.scan(token, state, tuple(jnp.moveaxis(x, 1, 0) for x in (r, w, k, v, a, b)))
    return jnp.moveaxis(y, 0, 1), S


def wkv7_reference_grads(streams, state, dy, dS):
    """float64 cotangents of (r, w, k, v, a, b, state) for output cotangents (dy, dS)."""
    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (*streams, state)]
        _, pullback = jax.vjp(_wkv7_scan_reference, *args)
        return [np.asarray(g) for g in pullback((jnp.asarray(dy, jnp.float64), jnp.asarray(dS, jnp.float64)))]


def rel_err(actual, expected):
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


# --- The Pallas kernel sharded over 4 simulated CPU devices (tests/scripts/wkv_pallas_sharded_probe.py) --

def run_sharded_probe(*args) -> dict:
    """tests/scripts/wkv_pallas_sharded_probe.py on 4 simulated CPU devices; its JSON line."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=4"]))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "wkv_pallas_sharded_probe.py"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def assert_sharded_probe_matches(out: dict) -> None:
    for name in ("sharded", "dispatcher"):
        assert out[name]["y"] <= 1e-5 and max(out[name]["state"]) <= 1e-5, out[name]
        for grad_name, diff, scale in zip(WKV_GRAD_NAMES, out[name]["grads"], out["grad_scale"]):
            assert diff <= 2e-6 * scale + 1e-6, f"{name} d loss / d {grad_name}: {diff} (scale {scale})"


# --- Tokenizers --------------------------------------------------------------------------------------

def write_byte_tokenizer(path) -> str:
    """A lossless byte-level HF tokenizers JSON: <|endoftext|> = 0, then the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return str(path)


# --- Tiny training runs: configs, in-process and on the command line, from one dict of overrides ------

SUBPROCESS_TIMEOUT_S = 300


def tiny_overrides(env: dict, **extra) -> dict:
    """Overrides of configs/tiny.py for a 2 x 32 model, vocab 512, 4 x 32 tokens a step, trained on env's
    corpus with its data dir (conftest's train_env); `extra` as section__field=value."""
    overrides = {
        "data.source": "text", "data.text_files": str(env["corpus"]), "data.data_dir": str(env["data_dir"]),
        "data.sp_vocab_size": 512, "data.validation_fraction": 0.2,
        "model.vocab_size": 512, "model.d_model": 32, "model.n_layer": 2,
        "train.seq_len": 32, "train.batch_size": 4, "train.log_every": 1, "train.eval_every": 10,
        "train.eval_batches": 2, "optim.warmup_steps": 5, "checkpoint.every_steps": 2, "checkpoint.keep": 3,
    }
    overrides.update({k.replace("__", "."): v for k, v in extra.items()})
    return overrides


def make_config(overrides: dict, config_name: str = "tiny"):
    """configs/<config_name>.py with `overrides` ({"section.field": value}) applied."""
    spec = importlib.util.spec_from_file_location(f"{config_name}_config", REPO / "configs" / f"{config_name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        section, field = key.split(".")
        setattr(config[section], field, value)
    return config


def cli_args(workdir: Path, overrides: dict, config_name: str = "tiny") -> list[str]:
    return [sys.executable, "train.py", f"--config=configs/{config_name}.py", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def subprocess_env(root: Path) -> dict:
    """CPU, and a persistent compilation cache shared by the runs of this module: the reruns of a killed
    run reuse the executables (which the bit-exact comparisons then also cover)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


class Run:
    """`python train.py --config=configs/<config_name>.py ...` in the background, stdout and stderr to files."""

    count = 0

    def __init__(self, workdir: Path, overrides: dict, config_name: str = "tiny"):
        Run.count += 1
        self.workdir = workdir
        self.out_path = workdir.parent / f"{workdir.name}.{Run.count}.stdout"
        self.err_path = workdir.parent / f"{workdir.name}.{Run.count}.stderr"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cli_args(workdir, overrides, config_name), cwd=REPO, stdout=out, stderr=err,
                                         env=subprocess_env(workdir.parent))

    def wait_for_step(self, step: int, timeout_s: float = SUBPROCESS_TIMEOUT_S) -> int:
        """Poll metrics.jsonl until a train step >= `step` is logged; returns the latest logged step."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            steps = [r["step"] for r in read_records(self.workdir) if r["kind"] == "train"]
            if steps and max(steps) >= step:
                return max(steps)
            if self.proc.poll() is not None:
                pytest.fail(f"train.py exited ({self.proc.returncode}) before step {step}:\n{self.stderr[-3000:]}")
            time.sleep(0.005)
        self.proc.kill()
        pytest.fail(f"no step {step} within {timeout_s}s")

    def finish(self, timeout_s: float = SUBPROCESS_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()


def read_records(workdir: Path) -> list[dict]:
    """Every complete line of metrics.jsonl, in order (a resumed run appends, rewriting some steps)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def by_step(records: list[dict], kind: str = "train") -> dict[int, dict]:
    return {r["step"]: r for r in records if r["kind"] == kind}  # the last written per step


def assert_same_train_records(records: list[dict], reference: dict[int, dict]):
    """Every train record (also those of a killed run) equals the reference's, float for float."""
    for r in records:
        if r["kind"] != "train":
            continue
        ref = reference[r["step"]]
        for key in ("loss", "grad_norm", "lr", "bad_steps"):
            # json writes repr(float): equal floats here are equal bits of the float32 values.
            assert struct.pack("<d", r[key]) == struct.pack("<d", ref[key]), (r["step"], key, r[key], ref[key])


def restore_latest(config, workdir: Path):
    """(state, extra, step) of the newest checkpoint, restored onto the train state's own structure."""
    model_config = ModelConfig.from_dict(config.model)
    mesh = sharding.make_mesh(config.mesh)
    optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
    carry_rows = config.train.batch_size if config.data.sampling == "streams" else 0
    _, _, abstract, shardings = train_step.train_state_factory(model_config, optimizer, mesh, config.train.seed,
                                                               carry_rows=carry_rows, trainable=config.optim.trainable,
                                                               lora=optim.lora_spec(config.optim))
    with Checkpointer(workdir / "checkpoints") as ckpt:
        return ckpt.restore_latest(abstract, shardings)


def run_cli(args: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    """`python train.py *args` on CPU, its output captured."""
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def copy_package_source(corpus: Path) -> Path:
    """This package's source (~200 KB of .py files) copied under `corpus`: the tiny runs' training text."""
    for path in sorted((REPO / "rwkv_jax").rglob("*.py")):
        dest = corpus / path.relative_to(REPO)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return corpus


# --- Train states and checkpoints (test_checkpoint, and its child processes with 8 CPU devices) -------

CHECKPOINT_MODEL = ModelConfig(vocab_size=64, d_model=32, n_layer=2)


def make_state(mesh, model_config=CHECKPOINT_MODEL):
    """(train state, shardings) of the tiny model on `mesh`."""
    tx = optim.make_optimizer(optim.default_optim_config(), total_steps=100)
    _, init, _, shardings = train_step.train_state_factory(model_config, tx, mesh, seed=0)
    return init(), shardings


def mesh_of(devices, **axes):
    return sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, **axes}), devices)


def randomized(state, seed: int):
    """`state` with every array refilled with seeded random values (all mantissa bits in use), same
    dtype and sharding, so Adam moments and apply_if_finite counters are all distinctive."""
    rng = np.random.default_rng(seed)

    def fill(x):
        if x.dtype == jnp.bool_:
            value = rng.integers(0, 2, x.shape).astype(bool)
        elif jnp.issubdtype(x.dtype, jnp.integer):
            value = rng.integers(1, 1000, x.shape).astype(x.dtype)
        else:
            value = rng.standard_normal(x.shape).astype(x.dtype)
        return jax.device_put(value, x.sharding)

    return jax.tree.map(fill, state)


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def snapshot(state) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(state)]


def assert_bit_identical(restored, expected_structure, expected_arrays: list[np.ndarray]):
    assert jax.tree.structure(restored) == jax.tree.structure(expected_structure)
    path_leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
    assert len(path_leaves) == len(expected_arrays)
    for (path, got), want in zip(path_leaves, expected_arrays):
        got = np.asarray(got)
        name = jax.tree_util.keystr(path)
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert got.tobytes() == want.tobytes(), f"{name} differs"


def assert_on_shardings(state, shardings):
    expanded = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), shardings, state,
                            is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    targets = jax.tree.leaves(expanded, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    for x, target in zip(jax.tree.leaves(state), targets, strict=True):
        assert x.sharding == target, (x.sharding, target)


EIGHT_DEVICE_MESH = {"fsdp": 4, "tensor": 2}


def distinct_shards(x) -> int:
    return len({tuple((i.start, i.stop) for i in shard.index) for shard in x.addressable_shards})


def child_main(mode: str, ckpt_dir: str, arrays: str) -> None:
    """Runs in a process with 8 CPU devices. 'save': save step 7 of a random state sharded over the
    mesh (arrays to `arrays`), then start a save of step 9 and die mid-write. 'restore': restore the
    latest onto the mesh and compare with `arrays`."""
    assert jax.device_count() == 8
    state0, shardings = make_state(mesh_of(jax.devices(), **EIGHT_DEVICE_MESH))
    emb = state0.params["emb"]["embedding"].value
    assert distinct_shards(emb) == 8  # truly split 4 x 2 over the devices
    if mode == "save":
        state = randomized(state0, seed=7)
        ckpt = Checkpointer(ckpt_dir)
        ckpt.save(7, state, {"devices": 8})
        ckpt.wait()
        np.savez(arrays, *snapshot(state))
        ckpt.save(9, randomized(state0, seed=9), {"devices": 8})
        os._exit(0)  # killed while step 9 is being written
    ckpt = Checkpointer(ckpt_dir)
    restored, extra, step = ckpt.restore_latest(abstract(state0), shardings)
    assert (step, extra) == (8, {"devices": 1}), (step, extra)
    with np.load(arrays) as saved:
        assert_bit_identical(restored, state0, [saved[f"arr_{i}"] for i in range(len(saved.files))])
    assert_on_shardings(restored, shardings)
    emb = restored.params["emb"]["embedding"].value
    assert distinct_shards(emb) == 8
    ckpt.close()
    print("CHILD OK")
