"""Training RWKV-7 (issue 28): the configs' sizes, the FLOP count, a tiny run whose loss falls and that
eval.py reads back, state tuning that leaves every weight bit-identical (in the train step, and end to
end from that run, with eval.py --initial_state), and runs with document resets
(data.reset_at_eot) and streamed sampling (data.sampling='streams').

A run killed with SIGKILL and rerun is bit-exact (slow: three train.py processes).

The sizes are counted twice, independently: from the official x070 weights layout (the shapes of the
checkpoint's tensors, `rwkv7.weights_layout`) and from the model's own parameters, and compared with the
official models' published sizes.
"""

import dataclasses
import importlib.util
import json
import math
import random
import re
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwkv_jax.cli import eval as eval_command
from rwkv_jax.cli import runner as cli
from rwkv_jax.io import weights
from rwkv_jax.model import ModelConfig, family_of, rwkv7, with_scan_layers
from rwkv_jax.train import metrics, optim, sharding, state_tuning, train_step, trainer
from tests.helpers import (
    Run,
    assert_bit_identical,
    assert_same_train_records,
    by_step,
    make_config,
    read_records,
    restore_latest,
    snapshot,
    tiny_overrides,
)

REPO = Path(__file__).resolve().parents[1]


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def model_params(config: ModelConfig) -> int:
    """The model's own parameter count (abstract: nothing allocated)."""
    model = nnx.eval_shape(lambda: family_of(config).model_class(config, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def layout_params(config: ModelConfig) -> int:
    """The official checkpoint's parameter count: its tensors' shapes summed."""
    return sum(math.prod(shape) for _, _, shape in rwkv7.weights_layout(config).values())


# (config, its count, the published size of the official model)
SIZES = [("rwkv7_168m", 167_688_192, 168e6), ("rwkv7_421m", 422_785_024, 421e6),
         ("rwkv7_1b5", 1_530_814_464, 1.53e9), ("rwkv7_2b9", 2_953_308_160, 2.9e9),
         ("rwkv7_7b2", 7_174_766_592, 7.2e9)]


@pytest.mark.parametrize("name,count,published", SIZES, ids=[s[0] for s in SIZES])
def test_paper_config_sizes_match_the_official_layout_and_published_sizes(name, count, published):
    config = load_config(name)
    model = ModelConfig.from_dict(config.model.to_dict(), "cpu")
    assert model.version == 7 and model.scan_layers is False and config.model.remat
    assert layout_params(model) == model_params(model) == count
    assert count == pytest.approx(published, rel=0.02)


def test_rwkv7_tiny_is_within_5_percent_of_rwkv4_tiny():
    v7 = ModelConfig.from_dict(load_config("rwkv7_tiny").model.to_dict(), "cpu")
    v4 = ModelConfig.from_dict(load_config("tiny").model.to_dict(), "cpu")
    assert (v7.version, v4.version) == (7, 4) and v7.scan_layers is False
    assert (model_params(v7), model_params(v4)) == (1_976_320, 1_906_688)  # the docstring's figures
    assert layout_params(v7) == model_params(v7)
    assert abs(model_params(v7) / model_params(v4) - 1) < 0.05


def test_flops_per_token_is_each_generations_own():
    v4 = ModelConfig(vocab_size=512, d_model=32, n_layer=2)
    assert family_of(v4).flops_per_token(v4) == metrics.flops_per_token(512, 32, 2) == 6 * (512 * 32 + 13 * 32 ** 2 * 2)
    v7 = ModelConfig(version=7, vocab_size=50304, d_model=768, n_layer=12)
    # 6 x the weights a token is multiplied by (every parameter but the embedding, LayerNorms and vectors,
    # and layer 0's unused value-residual LoRA), plus the WKV recurrence
    L, D, N = 12, 768, 64
    loras = rwkv7.lora_dims(v7)
    matmul_weights = 50304 * D + L * (12 * D * D + 2 * D * sum(loras.values())) - 2 * D * loras["v"]
    assert family_of(v7).flops_per_token(v7) == 6 * matmul_weights + 30 * L * D * N
    assert family_of(v7).flops_per_token(v7) != metrics.flops_per_token(50304, D, L)


def v7_overrides(env, **extra) -> dict:
    """tests.helpers.tiny_overrides for RWKV-7: 2 layers x 32, 2 heads of 16."""
    return tiny_overrides(env, model__version=7, model__head_size=16, model__emb_init_scale=1e-4, **extra)


def test_tiny_rwkv7_run_lowers_the_loss_eval_reads_it_and_its_state_tunes(train_env, tmp_path):
    workdir = tmp_path / "run"
    config = make_config(v7_overrides(train_env, train__num_steps=40, train__eval_every=0,
                                      checkpoint__every_steps=100, optim__lr_init=3e-3, optim__lr_final=1e-3))
    result = trainer.train(config, workdir)
    train = [r for r in read_records(workdir) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 41))
    first, last = np.mean([r["loss"] for r in train[:3]]), np.mean([r["loss"] for r in train[-3:]])
    assert last < first - 0.3, (first, last)
    assert np.isfinite(result["eval_loss"])
    # eval.py reads the RWKV-7 workdir and reports
    prefix = tmp_path / "report"
    text = next(Path(train_env["corpus"]).rglob("*.py"))
    assert cli.call(eval_command.main, ["eval.py", f"--checkpoint={workdir}", f"--text_files={text}",
                                        "--eval_len=32", "--max_docs=2", f"--report={prefix}"]) == 0
    report = json.loads(prefix.with_suffix(".json").read_text())
    assert report["documents"] >= 1 and np.isfinite(report["loss"])
    # state tuning from that run: the weights come back bit-identical, the state file is RWKV-7's and
    # eval.py --initial_state starts every document from it
    tuned = tmp_path / "tuned"
    trainer.train(make_config(v7_overrides(
        train_env, train__init_from=str(workdir), data__tokenizer_path=str(workdir / "tokenizer.model"),
        optim__trainable="state", optim__lr_init=0.1, optim__lr_final=0.1, optim__warmup_steps=0,
        train__num_steps=5, train__eval_every=0, checkpoint__every_steps=100)), tuned)
    base, after = (nnx.to_pure_dict(nnx.state(weights.load_model(w), nnx.Param)) for w in (workdir, tuned))
    assert jax.tree.structure(base) == jax.tree.structure(after)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(after)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with np.load(tuned / "state.npz") as saved:
        assert saved["wkv"].shape == (2, 1, 2, 16, 16) and np.any(saved["wkv"] != 0)
    with_state = tmp_path / "report_state"
    assert cli.call(eval_command.main, ["eval.py", f"--checkpoint={tuned}", f"--text_files={text}", "--eval_len=32",
                                        "--max_docs=2", f"--initial_state={tuned / 'state.npz'}",
                                        f"--report={with_state}"]) == 0
    report = json.loads(with_state.with_suffix(".json").read_text())
    assert report["initial_state"] == str(tuned / "state.npz") and np.isfinite(report["loss"])


@pytest.mark.parametrize("extra", [{"data__reset_at_eot": True, "train__microbatches": 2},
                                   {"data__sampling": "streams"}], ids=["reset_at_eot", "streams"])
def test_rwkv7_runs_with_resets_and_streams(train_env, tmp_path, extra):
    config = make_config(v7_overrides(train_env, train__num_steps=3, train__eval_every=0,
                                      checkpoint__every_steps=100, **extra))
    result = trainer.train(config, tmp_path)
    losses = [r["loss"] for r in read_records(tmp_path) if r["kind"] == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses)) and np.isfinite(result["eval_loss"])


@pytest.mark.slow  # three train.py processes (~250 s on the loaded 2-core machine, well over the 30 s budget)
def test_rwkv7_sigkill_at_a_random_step_then_rerun_is_bit_exact(train_env):
    """configs/rwkv7_tiny.py shrunk (2 x 32, heads of 16, 14 steps of 4 x 32 tokens): a run killed with
    SIGKILL once a checkpoint is committed, then rerun, gives the uninterrupted run's losses, final
    evaluation and state, bit for bit (the runs share a compilation cache, tests.helpers.subprocess_env)."""
    steps = 14
    overrides = tiny_overrides(train_env, train__num_steps=steps, train__eval_every=0, model__head_size=16)
    reference_dir, killed_dir = train_env["root"] / "rwkv7-reference", train_env["root"] / "rwkv7-killed"
    reference = Run(reference_dir, overrides, "rwkv7_tiny")
    assert reference.finish() == 0, reference.stderr[-5000:]
    config = make_config(overrides, "rwkv7_tiny")
    assert config.model.version == 7 and config.checkpoint.every_steps == 2
    run = Run(killed_dir, overrides, "rwkv7_tiny")
    run.wait_for_step(random.Random(28).randint(4, steps - 8))
    committed = lambda: [p for p in (killed_dir / "checkpoints").glob("*") if p.name.isdigit()]
    deadline = time.time() + 60
    while not committed() and time.time() < deadline and run.proc.poll() is None:
        time.sleep(0.005)  # a checkpoint to resume from (saves are asynchronous)
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_steps = [r["step"] for r in read_records(killed_dir) if r["kind"] == "train"]
    assert max(killed_steps) < steps

    rerun = Run(killed_dir, overrides, "rwkv7_tiny")
    assert rerun.finish() == 0, rerun.stderr[-5000:]
    resumed = re.search(r"resumed from the checkpoint of step (\d+)", rerun.stdout)
    assert resumed and 0 < int(resumed.group(1)) <= max(killed_steps), rerun.stdout
    records, ref_records = read_records(killed_dir), read_records(reference_dir)
    assert sorted(by_step(records)) == list(range(1, steps + 1))
    assert_same_train_records(records, by_step(ref_records))
    assert by_step(records, "eval")[steps]["eval_loss"] == by_step(ref_records, "eval")[steps]["eval_loss"]
    state, extra, step = restore_latest(config, killed_dir)
    ref_state, ref_extra, ref_step = restore_latest(config, reference_dir)
    assert step == ref_step == steps and extra == ref_extra
    assert_bit_identical(state, ref_state, snapshot(ref_state))  # params, Adam moments, counters


TINY7 = ModelConfig(version=7, vocab_size=64, d_model=32, head_size=16, n_layer=2, wkv_form="sequential")


def random_params(config: ModelConfig, seed: int = 0):
    """Every parameter random (the official init zeroes LoRAs and the output projections)."""
    params = nnx.state(family_of(config).model_class(config, rngs=nnx.Rngs(seed)), nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def test_rwkv7_weight_decay_reaches_the_official_weight_matrices_only():
    """RWKV-v7/train_temp/src/model.py configure_optimizers decays a parameter iff it is 2-D (squeezed) and its
    name holds '.weight': emb, head and the projections; not the LoRAs (w1, w2, a1, ...), r_k or vectors."""
    config = dataclasses.replace(TINY7, n_layer=3)
    layout = rwkv7.weights_layout(config)
    official = {name for name, (_, _, shape) in layout.items()
                if len([d for d in shape if d != 1]) >= 2 and ".weight" in name}
    assert "blocks.1.att.w1" not in official and "blocks.2.att.receptance.weight" in official
    params = nnx.state(rwkv7.RWKV7(config, rngs=nnx.Rngs(0)), nnx.Param)
    groups = nnx.to_pure_dict(optim.param_groups(params))
    at = lambda tree, path: at(tree[path[0]], path[1:]) if path else tree
    ours = {name for name, (path, _, _) in layout.items() if at(groups, path) == "matrix"}
    assert ours == official
    # the same with the layers stacked, and the optimizer decays exactly these: with zero gradients the update
    # of a decayed parameter is -lr x weight_decay x p, every other one's is 0
    scanned = nnx.state(with_scan_layers(rwkv7.RWKV7(config, rngs=nnx.Rngs(0)), True), nnx.Param)
    names = lambda groups: {".".join("blocks" if k == "block0" else str(k) for k in path if not isinstance(k, int))
                            for path, g in nnx.to_flat_state(groups) if g == "matrix"}  # layer 0 is block0
    assert names(optim.param_groups(scanned)) == names(optim.param_groups(params))
    optim_config = optim.default_optim_config()
    optim_config.update(lr_init=1e-2, lr_final=1e-3, warmup_steps=0, weight_decay=0.1, layerwise_lr=True)
    optimizer = optim.make_optimizer(optim_config, 10)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, scanned), optimizer.init(scanned), scanned)
    flat_groups = dict(nnx.to_flat_state(optim.param_groups(scanned)))
    for path, u in nnx.to_flat_state(updates):
        p = dict(nnx.to_flat_state(scanned))[path][...]
        expected = -1e-2 * 0.1 * p if flat_groups[path] == "matrix" else jnp.zeros_like(p)
        np.testing.assert_allclose(u[...], expected, rtol=1e-6, atol=0, err_msg=str(path))


def test_rwkv7_learned_state_is_the_empty_state_and_broadcasts():
    learned = state_tuning.init(TINY7)
    assert {k: v.shape for k, v in learned.items()} == {"att_x": (2, 32), "ffn_x": (2, 32), "wkv": (2, 2, 16, 16)}
    state = state_tuning.to_rwkv_state(learned, 3)
    empty = family_of(TINY7).init_state(TINY7, 3)
    assert type(state) is type(empty)
    for a, b in zip(state, empty):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="not a learned state"):
        state_tuning.to_rwkv_state({"att_x": learned["att_x"]}, 1)


def test_rwkv7_state_tuning_trains_the_state_and_leaves_every_weight_bit_identical(tmp_path):
    optim_config = optim.default_optim_config()
    optim_config.lr_init, optim_config.lr_final, optim_config.warmup_steps = 0.05, 0.05, 0
    optimizer = optim.make_optimizer(optim_config, 20)
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    graphdef, init, _, shardings = train_step.train_state_factory(TINY7, optimizer, mesh, 0, trainable="state")
    params = random_params(TINY7)
    before = [np.array(x) for x in jax.tree.leaves(params)]
    state = init(params)
    step_fn = train_step.make_train_step(graphdef, optimizer, optim.learning_rate(optim_config, 20), shardings, mesh,
                                         microbatches=1, trainable="state")
    tokens = np.random.default_rng(0).integers(0, 64, (4, 17)).astype(np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    losses = []
    for _ in range(15):
        state, metrics_ = step_fn(state, batch)
        losses.append(float(metrics_["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    after = jax.tree.leaves(state.params)
    assert len(after) == len(before)
    for a, b in zip(before, after):
        assert np.array_equal(a, np.asarray(b))
    for name, value in state.initial_state.items():  # every part of the learned state moved
        assert not np.array_equal(np.asarray(value), np.asarray(state_tuning.init(TINY7)[name])), name
    # the state file: RWKV-7's fields and shape
    path = tmp_path / "state.npz"
    state_tuning.save(path, state.initial_state, TINY7)
    with np.load(path) as saved:
        assert saved["wkv"].shape == (2, 1, 2, 16, 16) and saved["att_x"].shape == (2, 1, 32)
