"""Training checkpoints (`rwkv_jax.io.checkpoint`): bit-exact round trips of the whole train state with the
exact pytree structure, keep-last-K, async saves safe against donation, fallback past corrupt checkpoints
with a logged warning, partial (killed) saves ignored, NaN refused, and 8 devices -> 1 -> 8."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rwkv_jax.io.checkpoint import Checkpointer, IncompatibleCheckpointError
from rwkv_jax.model import ModelConfig
from rwkv_jax.train import sharding, train_step
from tests.helpers import abstract, assert_bit_identical, assert_on_shardings, make_state, mesh_of, randomized, snapshot

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base():
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    return make_state(mesh)


def test_round_trip_is_bit_exact_with_the_same_structure_and_keeps_last_k(tmp_path, base):
    state0, shardings = base
    ckpt_dir = tmp_path / "checkpoints"
    states, extras = {}, {}
    with Checkpointer(ckpt_dir, keep=2) as ckpt:
        for step in (10, 20, 30):
            states[step] = randomized(state0, seed=step)
            extras[step] = {"data_position": [step, 3 * step], "seed": 1234, "lr": 3e-4, "name": f"run {step}",
                            "config": {"model": {"d_model": 32}, "flags": [True, None]}}
            assert ckpt.save(step, states[step], extras[step])
        assert not ckpt.save(30, states[30], {})  # already saved
        assert not ckpt.save(25, states[30], {})  # older than the latest
        ckpt.wait()
        assert ckpt.steps == [20, 30]
    assert sorted(os.listdir(ckpt_dir)) == ["20", "30"]

    expected = {step: snapshot(states[step]) for step in (20, 30)}
    ckpt = Checkpointer(ckpt_dir, keep=2)  # a fresh process resuming
    restored, extra, step = ckpt.restore_latest(abstract(state0), shardings)
    assert step == 30 and extra == extras[30]
    assert_bit_identical(restored, state0, expected[30])
    assert_on_shardings(restored, shardings)
    # The exact types: TrainState, nnx.State of Params with their metadata, optax's NamedTuples.
    assert type(restored) is train_step.TrainState
    assert isinstance(restored.params, nnx.State)
    assert type(restored.opt_state) is type(state0.opt_state)
    adam = restored.opt_state.inner_state[1]
    assert isinstance(adam, optax.ScaleByAdamState) and isinstance(adam.mu, nnx.State)
    want = states[30]
    want_adam = want.opt_state.inner_state[1]
    for got_tree, want_tree in ((adam.mu, want_adam.mu), (adam.nu, want_adam.nu)):
        for got, ref in zip(jax.tree.leaves(got_tree), jax.tree.leaves(want_tree), strict=True):
            np.testing.assert_array_equal(got, ref)
    for field in ("notfinite_count", "last_finite", "total_notfinite"):
        assert int(getattr(restored.opt_state, field)) == int(getattr(want.opt_state, field)), field
    assert int(restored.step) == int(want.step) and int(restored.step) != int(state0.step)
    ckpt.close()


def test_no_checkpoint_gives_none(tmp_path, base):
    state0, shardings = base
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.steps == []
        assert ckpt.restore_latest(abstract(state0), shardings) is None


def test_async_save_returns_before_the_write_and_survives_donation(tmp_path, base):
    """save() returns while orbax is still writing; the caller may then donate (delete) the arrays."""
    state0, _ = base
    big = jax.device_put(np.random.default_rng(0).standard_normal((4096, 8192), np.float32))  # 128 MiB
    state = train_step.TrainState(state0.step + 5, {"big": big, "emb": randomized(state0.params, 1)},
                                  randomized(state0.opt_state, 2))
    expected, target = snapshot(state), abstract(state)
    ckpt_dir = tmp_path / "checkpoints"
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.save(5, state, {"k": 1})
        committed_on_return = (ckpt_dir / "5").exists()
        for x in jax.tree.leaves(state):  # what donate_argnums does to the buffers
            x.delete()
        ckpt.wait()
        assert not committed_on_return, "save() blocked until the checkpoint was written"
        assert (ckpt_dir / "5").is_dir() and ckpt.steps == [5]
        replicated = sharding.replicated(sharding.make_mesh(sharding.default_mesh_config()))
        restored, extra, step = ckpt.restore_latest(target, replicated)  # a single sharding: a prefix tree
    assert (step, extra) == (5, {"k": 1})
    assert_bit_identical(restored, target, expected)


def array_files(step_dir: Path) -> list[Path]:
    """The array data files of a step, in every orbax item but the JSON `meta`."""
    return [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"
            and p.relative_to(step_dir).parts[0] != "meta"]


def corrupt_flip_bit(step_dir: Path):
    """Flip one bit in the middle of the largest array data file: only the digests notice."""
    data = max(array_files(step_dir), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))


def corrupt_truncate(step_dir: Path):
    for data in array_files(step_dir):
        os.truncate(data, data.stat().st_size // 3)


def corrupt_delete_metadata(step_dir: Path):
    """Delete a file inside the step: the JSON of `extra` and the array digests."""
    files = [p for p in (step_dir / "meta").rglob("*") if p.is_file() and "commit" not in p.name]
    assert files
    for p in files:
        p.unlink()


@pytest.mark.parametrize("corrupt", [corrupt_flip_bit, corrupt_truncate, corrupt_delete_metadata])
def test_corrupt_latest_falls_back_to_the_previous_good_one(tmp_path, base, caplog, corrupt):
    state0, shardings = base
    ckpt_dir = tmp_path / "checkpoints"
    states = {step: randomized(state0, seed=step) for step in (10, 20, 30)}
    with Checkpointer(ckpt_dir) as ckpt:
        for step, state in states.items():
            ckpt.save(step, state, {"step": step})
    corrupt(ckpt_dir / "30")

    caplog.set_level(logging.WARNING, logger="absl")
    ckpt = Checkpointer(ckpt_dir)
    restored, extra, step = ckpt.restore_latest(abstract(state0), shardings)
    assert (step, extra) == (20, {"step": 20})
    assert_bit_identical(restored, state0, snapshot(states[20]))
    warnings = [r.getMessage() for r in caplog.records if r.name == "absl" and r.levelno == logging.WARNING]
    assert any("step 30" in w and "corrupt or unreadable" in w for w in warnings), warnings
    assert not any("step 20" in w for w in warnings), warnings
    # The bad step is set aside, so the resumed run can write step 30 again.
    assert ckpt.steps == [10, 20] and (ckpt_dir / "30.corrupt").is_dir()
    redo = randomized(state0, seed=31)
    assert ckpt.save(30, redo, {"step": 30})
    restored, extra, step = ckpt.restore_latest(abstract(state0), shardings)
    assert (step, extra) == (30, {"step": 30})
    assert_bit_identical(restored, state0, snapshot(redo))
    ckpt.close()


def test_falls_back_past_several_and_raises_when_none_is_readable(tmp_path, base, caplog):
    state0, shardings = base
    ckpt_dir = tmp_path / "checkpoints"
    with Checkpointer(ckpt_dir) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, randomized(state0, seed=step), {"step": step})
    corrupt_flip_bit(ckpt_dir / "3")
    corrupt_truncate(ckpt_dir / "2")
    caplog.set_level(logging.WARNING, logger="absl")
    with Checkpointer(ckpt_dir) as ckpt:
        restored, extra, step = ckpt.restore_latest(abstract(state0), shardings)
        assert (step, extra) == (1, {"step": 1})
        assert_bit_identical(restored, state0, snapshot(randomized(state0, seed=1)))
    warnings = " | ".join(r.getMessage() for r in caplog.records if r.name == "absl")
    assert "step 3 " in warnings and "step 2 " in warnings

    corrupt_delete_metadata(ckpt_dir / "1")
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(RuntimeError, match="none of the checkpoints"):
            ckpt.restore_latest(abstract(state0), shardings)
        assert ckpt.steps == [1]  # nothing is set aside when there is nothing to resume from


def test_partial_checkpoints_are_ignored(tmp_path, base, caplog):
    """Leftovers of killed saves (orbax's uncommitted temp directories) are not steps and not warned about."""
    state0, shardings = base
    ckpt_dir = tmp_path / "checkpoints"
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(20, randomized(state0, seed=20), {"step": 20})
    for leftover in ("30.orbax-checkpoint-tmp", "40.orbax-checkpoint-tmp-1700000000"):
        shutil.copytree(ckpt_dir / "20", ckpt_dir / leftover)
        corrupt_truncate(ckpt_dir / leftover)
    caplog.set_level(logging.WARNING, logger="absl")
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.steps == [20]
        restored, extra, step = ckpt.restore_latest(abstract(state0), shardings)
        assert (step, extra) == (20, {"step": 20})
        assert_bit_identical(restored, state0, snapshot(randomized(state0, seed=20)))
        assert ckpt.save(30, randomized(state0, seed=30), {"step": 30})
        ckpt.wait()
        assert ckpt.steps == [20, 30]
        assert ckpt.restore_latest(abstract(state0), shardings)[1:] == ({"step": 30}, 30)
    assert not [r for r in caplog.records if r.name == "absl" and "corrupt" in r.getMessage()]


def test_non_finite_state_is_refused(tmp_path, base):
    state0, _ = base
    state = randomized(state0, seed=3)
    poisoned = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[0, 1].set(jnp.nan) if "head" in jax.tree_util.keystr(path) and x.ndim == 2 else x,
        state)
    ckpt_dir = tmp_path / "checkpoints"
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(ValueError, match=r"refusing to save checkpoint step 7: NaN/Inf in 3 array\(s\): "
                                             r"params/head/kernel/value"):
            ckpt.save(7, poisoned, {})
        inf_param = state._replace(params=jax.tree.map(lambda x: x.at[..., 0].set(jnp.inf), state.params))
        with pytest.raises(ValueError, match="NaN/Inf"):
            ckpt.save(8, inf_param, {})
        ckpt.wait()
        assert ckpt.steps == []
        assert ckpt.save(9, state, {})  # the finite state saves fine
    assert sorted(os.listdir(ckpt_dir)) == ["9"]


def test_incompatible_state_raises_without_touching_the_checkpoint(tmp_path, base):
    state0, _ = base
    ckpt_dir = tmp_path / "checkpoints"
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, state0, {})
    other, other_shardings = make_state(sharding.make_mesh(sharding.default_mesh_config()),
                                        ModelConfig(vocab_size=64, d_model=16, n_layer=2))
    expected = (r"shape/dtype differ: params/blocks/0/att/key/kernel/value "
                r"\(checkpoint float32\[32, 32\], state float32\[16, 16\]\)")
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(IncompatibleCheckpointError, match=expected):
            ckpt.restore_latest(abstract(other), other_shardings)
        assert ckpt.steps == [1]


# --- 8 devices -> 1 -> 8 ----------------------------------------------------------------------------
# A forced host device count only takes effect before jax starts, hence the child processes.


def run_child(mode: str, ckpt_dir: Path, arrays: Path) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    code = "import sys; from tests.helpers import child_main; child_main(*sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, mode, str(ckpt_dir), str(arrays)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    if mode == "restore":
        assert "CHILD OK" in proc.stdout


def test_eight_devices_to_one_and_back(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    run_child("save", ckpt_dir, tmp_path / "saved_on_8.npz")
    assert any(p.name.startswith("9.") for p in ckpt_dir.iterdir()), "the killed save left nothing behind"

    # One device, whatever this process has.
    state1, shardings1 = make_state(mesh_of(jax.devices()[:1]))
    ckpt = Checkpointer(ckpt_dir)
    assert ckpt.steps == [7]  # the killed save of step 9 is not a step
    restored, extra, step = ckpt.restore_latest(abstract(state1), shardings1)
    assert (step, extra) == (7, {"devices": 8})
    with np.load(tmp_path / "saved_on_8.npz") as saved:
        assert_bit_identical(restored, state1, [saved[f"arr_{i}"] for i in range(len(saved.files))])
    assert_on_shardings(restored, shardings1)
    assert {d for x in jax.tree.leaves(restored) for d in x.devices()} == {jax.devices()[0]}

    state = randomized(restored, seed=8)
    np.savez(tmp_path / "saved_on_1.npz", *snapshot(state))
    assert ckpt.save(8, state, {"devices": 1})
    ckpt.close()
    run_child("restore", ckpt_dir, tmp_path / "saved_on_1.npz")


# --- Reading the parameters alone (eval, generate, convert) ---------------------------------------------

def test_restore_params_reads_the_params_item_alone_bit_exact(tmp_path, base):
    state0, shardings = base
    ckpt_dir = tmp_path / "checkpoints"
    states = {step: randomized(state0, seed=step) for step in (1, 2)}
    with Checkpointer(ckpt_dir) as ckpt:
        for step, state in states.items():
            ckpt.save(step, state, {"step": step})
    assert sorted(p.name for p in (ckpt_dir / "2").iterdir() if p.is_dir()) == ["meta", "opt_state", "params"]
    shutil.rmtree(ckpt_dir / "2" / "opt_state")  # the optimizer state is not needed, so not read
    with Checkpointer(ckpt_dir, read_only=True) as reader:
        params, extra, step = reader.restore_params(abstract(state0.params))
        assert (step, extra) == (2, {"step": 2})
        assert_bit_identical(params, state0.params, snapshot(states[2].params))
        assert isinstance(params, nnx.State)
        on_mesh, _, _ = reader.restore_params(abstract(state0.params), shardings.params)  # sharded
        assert_on_shardings(on_mesh, shardings.params)
        # The whole state of step 2 is now unreadable: a reader falls back to step 1 and renames nothing.
        restored, extra, step = reader.restore_latest(abstract(state0), shardings)
        assert (step, extra) == (1, {"step": 1})
        assert_bit_identical(restored, state0, snapshot(states[1]))
        assert reader.steps == [1, 2] and sorted(os.listdir(ckpt_dir)) == ["1", "2"]
        with pytest.raises(RuntimeError, match="read-only"):
            reader.save(3, states[1], {})


def test_a_reader_leaves_a_trainers_in_flight_save_alone(tmp_path, base):
    state0, _ = base
    ckpt_dir = tmp_path / "checkpoints"
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, state0, {})
    in_flight = ckpt_dir / "2.orbax-checkpoint-tmp"
    shutil.copytree(ckpt_dir / "1", in_flight)
    with Checkpointer(ckpt_dir, read_only=True) as reader:
        assert reader.steps == [1]
        assert reader.restore_params(abstract(state0.params))[2] == 1
    assert in_flight.is_dir() and sorted(os.listdir(in_flight)) == sorted(os.listdir(ckpt_dir / "1"))


def test_checkpoints_of_another_layout_are_refused_naming_it(tmp_path, base):
    """Layout 1 (the whole state as one orbax item `state`) is no longer read: the package keeps no
    readers for its own earlier layouts, and a restore names the layout and the fix instead of
    guessing."""
    import orbax.checkpoint as ocp

    from rwkv_jax.io import checkpoint as ckpt_lib
    state0, shardings = base
    state = randomized(state0, seed=5)
    names, leaves, _ = ckpt_lib._flatten(state)
    _, digests = ckpt_lib._inspect(leaves)
    meta = {"format": 1, "extra": {"step": 5},
            "arrays": {n: {"shape": list(x.shape), "dtype": ckpt_lib._dtype_name(x), "digest": ckpt_lib._hex(d)}
                       for n, x, d in zip(names, leaves, digests)}}
    ckpt_dir = tmp_path / "checkpoints"
    with ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=True)) as manager:
        manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(ckpt_lib._nest(names, leaves)),
                                                meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    with Checkpointer(ckpt_dir, read_only=True) as reader:
        with pytest.raises(IncompatibleCheckpointError, match=r"step 5 .* has layout 1, this version reads layout 2"):
            reader.restore_latest(abstract(state0), shardings)
        with pytest.raises(IncompatibleCheckpointError, match=r"has layout 1"):
            reader.restore_params(abstract(state0.params))
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["5"]  # a reader changes nothing


MEMORY_CHILD = """
import sys
import jax


def peak_kb():  # VmHWM: this process's own peak (ru_maxrss carries a forking parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


from rwkv_jax.train import optim, sharding, train_step
from rwkv_jax.io.checkpoint import Checkpointer
from rwkv_jax.model import ModelConfig
mode, ckpt_dir = sys.argv[1:]
config = ModelConfig(vocab_size=8192, d_model=512, n_layer=4)
mesh = sharding.make_mesh(sharding.default_mesh_config())
tx = optim.make_optimizer(optim.default_optim_config(), total_steps=10)
_, init, abstract_state, shardings = train_step.train_state_factory(config, tx, mesh, seed=0)
if mode == "save":
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, init(), {})
    sys.exit(0)
before = peak_kb()
with Checkpointer(ckpt_dir, read_only=True) as reader:
    if mode == "params":
        out = reader.restore_params(abstract_state.params, shardings.params)
    else:
        out = reader.restore_latest(abstract_state, shardings)
    jax.block_until_ready(out[0])
print("PEAK_KB", before, peak_kb())
"""


@pytest.mark.slow  # CI time: restoring (and its memory) is covered by the resume tests; this measures the saving
def test_restoring_the_params_alone_takes_less_memory(tmp_path):
    """Peak resident memory of a process restoring a 25M-parameter checkpoint (100 MB of params, 200 MB of
    Adam moments): the params alone stay well below the whole state."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def child(mode):
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, mode, str(tmp_path / "ckpt")], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if mode != "save":
            before, after = map(int, proc.stdout.split("PEAK_KB")[1].split())
            return after / 1024, before / 1024

    child("save")
    params_peak, params_base = child("params")
    full_peak, full_base = child("full")
    # Growth of the peak during the restore, MiB: the whole state adds about the 200 MB of Adam moments.
    params_growth, full_growth = params_peak - params_base, full_peak - full_base
    assert full_growth - params_growth > 120, (params_base, params_peak, full_base, full_peak)
