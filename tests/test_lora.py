"""LoRA (optim.trainable='lora', rwkv_jax/model/lora.py): adapters on the block projections of a frozen
model, for RWKV-4 and RWKV-7, layers as a list or stacked.

  * the model: an adapted model starts equal to its base (B = 0); merged == adapted within 1e-5 (fp32);
    adapters carry the logical axes of their base matrix.
  * the train step: only the adapters are differentiated and updated (the optimizer state mirrors them),
    every base weight comes back bit-identical; sharded on the 8-device mesh it equals the unsharded step.
  * the run: checkpoints, SIGKILL resume, eval / generate / convert of the workdir (merged on load), the
    adapters alone in a file and read back (`optim.lora_init`).
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwkv_jax.cli import convert
from rwkv_jax.cli import eval as eval_command
from rwkv_jax.cli import generate as generate_command
from rwkv_jax.cli import runner as cli
from rwkv_jax.io import weights
from rwkv_jax.io import workdir as workdir_lib
from rwkv_jax.model import ModelConfig, lora
from rwkv_jax.train import optim, sharding, train_step, trainer
from rwkv_jax.train import program as program_lib
from rwkv_jax.train import train_config as config_lib
from tests.helpers import (
    Run,
    copy_package_source,
    make_config,
    read_records,
    restore_latest,
    tiny_overrides,
    write_byte_tokenizer,
)

TINY4 = ModelConfig(vocab_size=64, d_model=32, n_layer=2)
TINY7 = ModelConfig(version=7, vocab_size=64, d_model=32, n_layer=2, head_size=16, wkv_form="sequential")
SPEC = lora.LoraSpec(rank=4, alpha=8.0)


def tokens(seed=0, shape=(4, 17)):
    return np.random.default_rng(seed).integers(0, 64, shape).astype(np.int32)


def with_random_adapters(model, seed: int, scale: float = 0.02):
    """`model` with every adapter (B included) drawn from N(0, scale^2): an adapted model unlike its base."""
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)


@pytest.mark.parametrize("config", [TINY4, TINY7], ids=["rwkv4", "rwkv7"])
def test_adapted_model_starts_as_its_base_and_merges_to_the_adapted_logits(config):
    base = lora.build(config, None, seed=0)
    adapted = lora.build(config, SPEC, seed=0)
    ids = jnp.asarray(tokens(0, (2, 12)))
    assert np.array_equal(np.asarray(base(ids)[0]), np.asarray(adapted(ids)[0]))  # B = 0: exactly the base
    adapted = with_random_adapters(adapted, 1)
    logits = np.asarray(adapted(ids)[0])
    assert np.abs(logits - np.asarray(base(ids)[0])).max() > 1e-3  # the adapters act
    merged = lora.merged(adapted)
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    np.testing.assert_allclose(np.asarray(merged(ids)[0]), logits, rtol=0, atol=1e-5)


def lora_program(model_config, mesh, *, microbatches: int = 1, lr: float = 0.02):
    optim_config = optim.default_optim_config()
    optim_config.lr_init, optim_config.lr_final, optim_config.warmup_steps = lr, lr, 0
    optimizer = optim.make_optimizer(optim_config, 20)
    graphdef, init, abstract, shardings = train_step.train_state_factory(model_config, optimizer, mesh, 0,
                                                                         trainable="lora", lora=SPEC)
    step_fn = train_step.make_train_step(graphdef, optimizer, optim.learning_rate(optim_config, 20), shardings, mesh,
                                         microbatches=microbatches, trainable="lora")
    return graphdef, init, abstract, shardings, step_fn


def base_params(model_config, seed: int = 3):
    """A 'trained' base: the model's parameters of another seed (no adapters)."""
    return nnx.state(lora.build(model_config, None, seed), nnx.Param)


@pytest.mark.parametrize("config,microbatches",
                         [(TINY4, 1), pytest.param(TINY4, 2, marks=pytest.mark.slow),
                          pytest.param(dataclasses.replace(TINY4, scan_layers=True), 1, marks=pytest.mark.slow),
                          pytest.param(TINY7, 1, marks=pytest.mark.slow)],
                         ids=["rwkv4", "rwkv4-micro2", "rwkv4-stacked", "rwkv7"])
def test_lora_steps_train_the_adapters_alone_and_leave_every_base_weight_bit_identical(config, microbatches):
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    graphdef, init, abstract, shardings, step_fn = lora_program(config, mesh, microbatches=microbatches)
    base = base_params(config)
    before = {k: np.array(v) for k, v in nnx.to_flat_state(base)}
    state = init(base)
    adapters, frozen = train_step.split_adapters(state.params)
    # the base came in as given, the adapters are fresh: B = 0
    assert {k: np.asarray(v) for k, v in nnx.to_flat_state(frozen)}.keys() == before.keys()
    assert all(not np.any(np.asarray(v)) for k, v in nnx.to_flat_state(adapters) if k[-1] == "lora_b")
    # the optimizer state mirrors the adapters only: Adam's two moments of each
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim >= 2)
    assert n_moments == 2 * n_adapter and n_adapter < 0.25 * sum(x.size for x in jax.tree.leaves(frozen))
    batch = {k: jnp.asarray(v) for k, v in zip(("inputs", "targets"), (tokens()[:, :-1], tokens()[:, 1:]))}
    losses = []
    for _ in range(8):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    adapters, frozen = train_step.split_adapters(state.params)
    for key, value in nnx.to_flat_state(frozen):
        assert np.array_equal(before[key], np.asarray(value)), key
    assert all(np.any(np.asarray(v)) for k, v in nnx.to_flat_state(adapters) if k[-1] == "lora_b")


# --- Runs: a tiny base, a LoRA run from it; its workdir read by eval / convert ------------------------

LORA_STEPS = 6


def lora_overrides(env, base: Path, tokenizer: Path | None = None, **extra) -> dict:
    """A LoRA run from `base` with its tokenizer: a byte-level HF json, or else the base workdir's copy."""
    fields = dict(train__init_from=str(base), data__tokenizer_path=str(tokenizer or base / "tokenizer.model"),
                  data__tokenizer="hf_json" if tokenizer else "sentencepiece",
                  optim__trainable="lora", optim__lora_rank=4, optim__lora_alpha=8.0, optim__lr_init=1e-2,
                  optim__lr_final=1e-2, optim__warmup_steps=0, train__num_steps=LORA_STEPS, train__eval_every=0,
                  checkpoint__every_steps=3)
    return tiny_overrides(env, **(fields | extra))


@pytest.fixture(scope="module")
def runs(train_env, tmp_path_factory):
    """A base (a random 2 x 32 model, vocab 512, as an rwkv_jax directory; a byte-level tokenizer) and a LoRA
    run of LORA_STEPS steps from it (in process); the run's console output."""
    import contextlib
    import io
    root = train_env["root"]
    weights.save_model(lora.build(ModelConfig(vocab_size=512, d_model=32, n_layer=2), None, seed=3), root / "base")
    tokenizer = Path(write_byte_tokenizer(root / "bytes.json"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer.train(make_config(lora_overrides(train_env, root / "base", tokenizer)), root / "lora")
    return {"root": root, "env": train_env, "tokenizer": tokenizer, "stdout": out.getvalue()}


def test_a_lora_run_keeps_the_base_bit_identical_and_reports_its_optimizer_state(runs):
    root = runs["root"]
    config = make_config(lora_overrides(runs["env"], root / "base", runs["tokenizer"]))
    state, _, step = restore_latest(config, root / "lora")
    assert step == LORA_STEPS
    adapters, frozen = train_step.split_adapters(state.params)
    base = nnx.state(weights.load_model(root / "base"), nnx.Param)
    assert nnx.to_flat_state(frozen).paths == nnx.to_flat_state(base).paths
    for (path, got), (_, want) in zip(nnx.to_flat_state(frozen), nnx.to_flat_state(base)):
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), path
    assert all(np.any(np.asarray(v)) for k, v in nnx.to_flat_state(adapters) if k[-1] == "lora_b")
    # the optimizer state: Adam's moments of the adapters alone, and the run says so against full tuning's
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim >= 2) == 2 * n_adapter
    lines = runs["stdout"].splitlines()
    found = [line for line in lines if line.startswith("optimizer state: ")]
    assert found and "for the adapters; full fine-tuning's would be" in found[0], lines[:12]
    assert f"{n_adapter:,} adapter values trained" in runs["stdout"]


def test_the_workdir_reads_merged_and_converts_to_the_adapted_logits(runs, tmp_path):
    root = runs["root"]
    adapted = workdir_lib.load(root / "lora", keep_adapters=True).model
    assert jax.tree.leaves(nnx.state(adapted, nnx.LoRAParam))
    ids = jnp.asarray(tokens(5, (2, 16)) * 7 % 512)
    want = np.asarray(adapted(ids)[0])
    assert np.abs(want - np.asarray(weights.load_model(root / "base")(ids)[0])).max() > 1e-4
    # eval.py, generate.py and the lm-eval adapter read a workdir through weights.load: merged on load
    loaded = weights.load_model(root / "lora")
    assert not jax.tree.leaves(nnx.state(loaded, nnx.LoRAParam))
    np.testing.assert_allclose(np.asarray(loaded(ids)[0]), want, rtol=0, atol=1e-5)
    # convert: a LoRA workdir needs --merge_lora (or --adapters_only); the .pth holds the merged model
    assert cli.call(convert.main, ["convert", str(root / "lora"), str(tmp_path / "x.pth")]) != 0
    assert not (tmp_path / "x.pth").exists()
    assert cli.call(convert.main, ["convert", str(root / "lora"), str(tmp_path / "merged.pth"), "--merge_lora"]) == 0
    np.testing.assert_allclose(np.asarray(weights.load_model(tmp_path / "merged.pth")(ids)[0]), want, rtol=0,
                               atol=1e-5)
    assert cli.call(convert.main, ["convert", str(root / "base"), str(tmp_path / "y.pth"), "--merge_lora"]) != 0
    # --adapters_only: a small file, which optim.lora_init reads back as the run's adapters
    path = tmp_path / "adapters.npz"
    assert cli.call(convert.main, ["convert", str(root / "lora"), str(path), "--adapters_only"]) == 0
    assert path.stat().st_size < 0.2 * (tmp_path / "merged.pth").stat().st_size
    config = make_config(lora_overrides(runs["env"], root / "base", runs["tokenizer"], optim__lora_init=str(path)))
    program = program_lib.build(config, sharding.make_mesh(config.mesh), "cpu")
    state = trainer.start_state(config, program.model_config, program.init, program.abstract_state, True)
    got, _ = train_step.split_adapters(state.params)
    want_adapters, _ = train_step.split_adapters(nnx.state(adapted, nnx.Param))
    for (p, x), (q, y) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want_adapters)):
        assert p == q and np.asarray(x).tobytes() == np.asarray(y).tobytes(), p


def test_the_optimizer_state_of_a_169m_lora_run_at_rank_16_is_under_2_percent_of_full_tuning():
    """From shapes alone (jax.eval_shape): Adam's moments of the adapters against those of every weight."""
    import importlib.util
    spec_file = importlib.util.spec_from_file_location("config_169m", Path(__file__).parents[1] / "configs" / "169m.py")
    module = importlib.util.module_from_spec(spec_file)
    spec_file.loader.exec_module(module)
    config = module.get_config()
    config.optim.trainable, config.optim.lora_rank = "lora", 16
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    model_config = program_lib.resolve(config, "cpu")
    optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
    _, _, abstract, _ = train_step.train_state_factory(model_config, optimizer, mesh, 0, trainable="lora",
                                                       lora=optim.lora_spec(config.optim))
    adapters, base = train_step.split_adapters(abstract.params)
    assert 169e6 < sum(x.size for x in jax.tree.leaves(base)) < 170e6
    # 12 layers x (4 x (768 + 768) + 2 x (768 + 3072)) x 16 adapter values
    assert sum(x.size for x in jax.tree.leaves(adapters)) == 12 * (4 * 1536 + 2 * 3840) * 16
    lora_bytes = trainer.tree_bytes(abstract.opt_state)
    full_bytes = trainer.tree_bytes(jax.eval_shape(optimizer.init, base))
    assert lora_bytes < 0.02 * full_bytes, (lora_bytes, full_bytes)


@pytest.mark.parametrize("field,value,message", [
    ("lora_rank", 0, "optim.lora_rank must be a positive integer, got 0"),
    ("lora_alpha", -1.0, "optim.lora_alpha must be > 0"),
    ("lora_targets", "att.key,ffn.gate", "optim.lora_targets: unknown ['ffn.gate'] for RWKV-4; valid: "
                                         "att.receptance,att.key,att.value,att.output,ffn.key,ffn.receptance,ffn.value"),
    ("lora_init", "/nonexistent/adapters.npz", "optim.lora_init='/nonexistent/adapters.npz' does not exist"),
])
def test_bad_lora_settings_are_one_line_config_errors(field, value, message):
    config = make_config({"optim.trainable": "lora", f"optim.{field}": value})
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_lora_model_with_stacked_layers_equals_the_list_one_and_merges():
    """scan_layers: the adapters stack with their layer ([L, in, r]), sharded by ('layers', in-axis, 'lora'),
    and the stacked model computes what the list one does."""
    stacked_config = dataclasses.replace(TINY4, scan_layers=True)
    # built from one seed, stacked or a list: the same base and the same initial adapters
    fresh_stacked = lora.adapters_of(lora.build(stacked_config, SPEC, seed=0))
    fresh_listed = lora.adapters_of(lora.build(TINY4, SPEC, seed=0))
    assert fresh_stacked.keys() == fresh_listed.keys()
    assert all(np.array_equal(fresh_stacked[k], fresh_listed[k]) for k in fresh_listed)
    listed = with_random_adapters(lora.build(TINY4, SPEC, seed=0), 2)
    values = nnx.to_pure_dict(nnx.state(listed, nnx.Param))
    stacked = nnx.eval_shape(lambda: lora.build(stacked_config, SPEC, seed=0))
    graphdef, state = nnx.split(stacked)
    a = dict(nnx.to_flat_state(state))[("blocks", "att", "key", "lora", "lora_a")]
    assert a.shape == (2, 32, 4) and a.get_metadata()["logical_axes"] == ("layers", "embed", "lora")
    b = dict(nnx.to_flat_state(state))[("blocks", "ffn", "value", "lora", "lora_b")]
    assert b.shape == (2, 4, 32) and b.get_metadata()["logical_axes"] == ("layers", "lora", "embed")
    blocks = values.pop("blocks")
    values["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in range(2)])
    nnx.replace_by_pure_dict(state, values)
    stacked = nnx.merge(graphdef, state)
    ids = jnp.asarray(tokens(3, (2, 12)))
    want = np.asarray(listed(ids)[0])
    np.testing.assert_allclose(np.asarray(stacked(ids)[0]), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lora.merged(stacked)(ids)[0]), want, rtol=0, atol=1e-5)
    # the adapters file's layout is one entry per layer: read back onto stacked adapters, the same values
    arrays = lora.adapters_of(stacked)
    assert arrays.keys() == lora.adapters_of(listed).keys()
    stacked_adapters = train_step.split_adapters(nnx.state(stacked, nnx.Param))[0]
    back = lora.adapters_state(arrays, stacked_adapters, scan_layers=True)
    for (p, x), (q, y) in zip(nnx.to_flat_state(back), nnx.to_flat_state(stacked_adapters)):
        assert p == q and np.asarray(x).tobytes() == np.asarray(y).tobytes(), p


def test_lora_steps_on_the_8_device_mesh_equal_one_device_with_adapters_split_as_their_base(tmp_path):
    """tests/scripts/lora_sharding_probe.py: the mesh (data, fsdp, tensor) = (2,2,2) of 8 simulated devices
    against one device, 3 LoRA steps each."""
    import json
    import os
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(repo),
               XLA_FLAGS=" ".join(flags + ["--xla_backend_optimization_level=0",
                                           "--xla_force_host_platform_device_count=8"]))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(repo / "tests" / "scripts" / "lora_sharding_probe.py"), str(out)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["device_count"] == 8
    one, *sharded = result["runs"]
    assert len(set(one["losses"])) == 3
    for run in result["runs"]:
        assert run["base_bit_identical"] and run["adapters_moved"], run["mesh"]
        np.testing.assert_allclose(run["losses"], one["losses"], rtol=1e-5, err_msg=str(run["mesh"]))
        # Adam divides each gradient by its own running RMS, so the rounding of a sharded reduction in a tiny
        # gradient reaches the update at full size: the adapters agree to 1e-3 of what the steps changed (the
        # losses, which see every adapter at once, to 1e-5)
        assert run["adapter_max_diff"] < 1e-3 * one["adapter_max_change"], (run["mesh"], run["adapter_max_diff"])
    by_mesh = {tuple(run["mesh"]): run for run in sharded}
    # fsdp x tensor (2,2,2): A [in, r] split as its kernel's in-axis, B [r, out] as its out-axis; rank replicated
    specs = by_mesh[(2, 2, 2)]["specs"]
    assert specs["blocks.0.att.key.kernel"] == ["fsdp", "tensor"]
    assert specs["blocks.0.att.key.lora.lora_a"] == ["fsdp", None]
    assert specs["blocks.0.att.key.lora.lora_b"] == [None, "tensor"]
    assert specs["blocks.1.att.output.lora.lora_a"] == ["tensor", None]
    assert specs["blocks.1.att.output.lora.lora_b"] == [None, "fsdp"]
    assert specs["blocks.0.ffn.value.lora.lora_a"] == ["tensor", None]
    for run in sharded:  # Adam's moments are split as their adapters are
        for name, spec in run["moment_specs"].items():
            assert spec == run["specs"][name], (run["mesh"], name)


# --- Exact resume after SIGKILL (slow: three subprocess runs) -----------------------------------------

def _run_to_completion(workdir: Path, overrides: dict) -> Run:
    run = Run(workdir, overrides)
    assert run.finish() == 0, run.stderr[-5000:]
    return run


@pytest.mark.slow
def test_a_lora_run_killed_with_sigkill_and_rerun_is_bit_exact(runs):
    import random
    import re
    import signal
    import time
    steps = 14
    overrides = lora_overrides(runs["env"], runs["root"] / "base", runs["tokenizer"], train__num_steps=steps,
                               checkpoint__every_steps=2)
    reference_dir, killed_dir = runs["root"] / "lora-reference", runs["root"] / "lora-killed"
    _run_to_completion(reference_dir, overrides)
    run = Run(killed_dir, overrides)
    run.wait_for_step(random.Random(31).randint(5, 9))
    deadline = time.time() + 60  # and a committed checkpoint (orbax renames a finished save to its step)
    while not any(p.name.isdigit() for p in (killed_dir / "checkpoints").iterdir()) and time.time() < deadline:
        time.sleep(0.01)
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL, "the run ended before it could be killed"
    rerun = _run_to_completion(killed_dir, overrides)
    assert re.search(r"resumed from the checkpoint of step \d+", rerun.stdout), rerun.stdout
    want = {r["step"]: r for r in read_records(reference_dir) if r["kind"] == "train"}
    got = {r["step"]: r for r in read_records(killed_dir) if r["kind"] == "train"}
    assert sorted(got) == list(range(1, steps + 1))
    for step, record in got.items():
        assert all(record[k] == want[step][k] for k in ("loss", "grad_norm", "lr")), step  # repr floats: same bits
    config = make_config(overrides)
    state, _, step = restore_latest(config, killed_dir)
    ref_state, _, ref_step = restore_latest(config, reference_dir)
    assert step == ref_step == steps
    leaves, ref_leaves = jax.tree.leaves(state), jax.tree.leaves(ref_state)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state) and len(leaves) == len(ref_leaves)
    for x, y in zip(leaves, ref_leaves):  # base, adapters, Adam's moments of the adapters, counters
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


# --- A task of our own, end to end (slow) ---------------------------------------------------------------
# A tiny base model (2 x 32, vocab 512) trained briefly on Python source, then LoRA-tuned on text in one rigid
# template (shipments: "SHIP 0123 | 4 crates | Oslo -> Lima"), held-out documents of that format scored.

BASE_STEPS, TUNE_STEPS = 200, 60


def shipment_lines(rng, n: int) -> str:
    goods, ports = ["crates", "drums", "pallets", "coils", "bales"], ["Oslo", "Lima", "Pune", "Kyiv", "Perth", "Hue"]
    return "".join(f"SHIP {rng.randint(0, 9999):04d} | {rng.randint(1, 9)} {rng.choice(goods)} | "
                   f"{rng.choice(ports)} -> {rng.choice(ports)}\n" for _ in range(n))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    import random
    import time
    root = tmp_path_factory.mktemp("lora_task")
    env = {"root": root, "corpus": copy_package_source(root / "corpus"), "data_dir": root / "data"}
    rng = random.Random(0)
    (root / "style").mkdir()
    for i in range(20):  # 20 files: the hash split keeps about a fifth for validation
        (root / "style" / f"ships_{i:02d}.txt").write_text(shipment_lines(rng, 40))
    heldout = random.Random(1)
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": shipment_lines(heldout, 3)}) + "\n"
                                                for _ in range(40)))
    start = time.time()
    trainer.train(make_config(tiny_overrides(env, train__num_steps=BASE_STEPS, train__eval_every=0, train__log_every=50,
                                             checkpoint__every_steps=1000, optim__lr_init=3e-3, optim__lr_final=1e-3)),
                  root / "base")
    base_s, start = time.time() - start, time.time()
    overrides = lora_overrides(env, root / "base", data__text_files=str(root / "style"),
                               data__data_dir=str(root / "style_data"), optim__lora_rank=8, optim__lora_alpha=16.0,
                               optim__lr_init=5e-3, optim__lr_final=1e-3, train__num_steps=TUNE_STEPS,
                               train__eval_every=1000, train__eval_batches=0, train__log_every=20,
                               checkpoint__every_steps=1000)
    trainer.train(make_config(overrides), root / "tuned")
    return {"root": root, "base_s": base_s, "tune_s": time.time() - start}


def eval_loss(tmp_path, checkpoint, heldout) -> dict:
    prefix = tmp_path / f"report{len(list(tmp_path.glob('report*.json')))}"
    args = ["eval.py", f"--checkpoint={checkpoint}", f"--text_files={heldout}", f"--report={prefix}"]
    if Path(checkpoint).suffix == ".pth":
        args.append(f"--tokenizer={Path(checkpoint).parent / 'tokenizer.model'}")
    assert cli.call(eval_command.main, args) == 0
    return json.loads(prefix.with_suffix(".json").read_text())


@pytest.mark.slow
def test_lora_lowers_the_held_out_loss_on_a_narrow_format_and_changes_no_base_weight(tuned, tmp_path, capsys):
    import shutil
    root = tuned["root"]
    # every base weight unchanged: the frozen part of the LoRA run's checkpoint is the base's, bit for bit
    adapted = workdir_lib.load(root / "tuned", keep_adapters=True).model
    _, frozen = train_step.split_adapters(nnx.state(adapted, nnx.Param))
    base = nnx.state(weights.load_model(root / "base"), nnx.Param)
    assert nnx.to_flat_state(frozen).paths == nnx.to_flat_state(base).paths
    for (path, x), (_, y) in zip(nnx.to_flat_state(frozen), nnx.to_flat_state(base)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path
    # the run's own evaluation of the format's validation files: before tuning and at the end
    records = [json.loads(line) for line in (root / "tuned" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if r["kind"] == "eval"}
    assert sorted(evals) == [0, TUNE_STEPS] and evals[TUNE_STEPS] < evals[0] - 0.3, evals
    # eval.py on held-out documents of the format (not in the tuning files): the LoRA workdir (merged on load)
    # scores far lower than its base, and exactly as its merged .pth does
    heldout = root / "heldout.jsonl"
    before, after = eval_loss(tmp_path, root / "base", heldout), eval_loss(tmp_path, root / "tuned", heldout)
    assert after["documents"] == before["documents"] == 40
    assert after["loss"] < before["loss"] - 0.3, (before["loss"], after["loss"])
    assert cli.call(convert.main, ["convert", str(root / "tuned"), str(tmp_path / "merged.pth"), "--merge_lora"]) == 0
    shutil.copyfile(root / "tuned" / "tokenizer.model", tmp_path / "tokenizer.model")
    merged = eval_loss(tmp_path, tmp_path / "merged.pth", heldout)
    assert merged["loss"] == pytest.approx(after["loss"], rel=1e-5, abs=0)
    # generate.py reads the workdir merged too: greedy from "SHIP", the tuned model writes the format's next field
    capsys.readouterr()
    assert cli.call(generate_command.main, ["generate.py", f"--checkpoint={root / 'tuned'}", "--prompt=SHIP",
                                            "--temperature=0", "--max_new_tokens=16", "--nostop_at_eot"]) == 0
    generated = capsys.readouterr().out
    assert " | " in generated, generated
    with capsys.disabled():
        print(f"generated: {generated.strip()[:80]!r}")
        print(f"\nLoRA (rank 8): held-out loss {before['loss']:.4f} -> {after['loss']:.4f} nats/token; the run's eval "
              f"{evals[0]:.4f} -> {evals[TUNE_STEPS]:.4f}; base {BASE_STEPS} steps {tuned['base_s']:.0f}s, LoRA "
              f"{TUNE_STEPS} steps {tuned['tune_s']:.0f}s")


def test_lora_init_without_init_from_or_of_another_rank_is_a_one_line_error(tmp_path):
    config = make_config({"optim.trainable": "lora", "optim.lora_init": __file__})
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config)
    assert "optim.lora_init adapts a trained model: set train.init_from" in str(e.value) and "\n" not in str(e.value)
    path = tmp_path / "adapters.npz"
    lora.save_adapters(path, lora.build(TINY4, SPEC, seed=0), SPEC)
    assert len(lora.load_adapters(path, TINY4, SPEC)) == 2 * 2 * len(SPEC.targets)
    with pytest.raises(ValueError) as e:
        lora.load_adapters(path, TINY4, dataclasses.replace(SPEC, rank=8))
    assert "holds adapters of rank 4, alpha 8.0" in str(e.value) and "asks for rank 8" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="adapts a model of 2 layers x 32"):
        lora.load_adapters(path, dataclasses.replace(TINY4, d_model=48), SPEC)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an adapters file of `rwkv-convert WORKDIR OUT.npz --adapters_only`"):
        lora.load_adapters(tmp_path / "junk.npz", TINY4, SPEC)
