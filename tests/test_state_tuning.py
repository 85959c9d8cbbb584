"""State tuning (optim.trainable='state', rwkv_jax/train/state_tuning.py) and train.init_from:

  * the mechanics (fast): only the learned initial state is differentiated and updated, every parameter
    comes back bit-identical, the optimizer state covers the learned state alone, the learned state starts
    next to the empty state and its gradient is the loss's (checked against finite differences);
  * a task of our own (slow, end to end): a tiny base model is trained on Python source, then its state is
    tuned on text in one rigid template; the held-out loss of that style falls, no weight changes, the
    state file is written and resumes work, and eval.py --initial_state / generate.py --load_state use it;
  * bad input: trainable='state' without a model, a missing init_from or tokenizer, a model of another
    shape, a state file of another model.
"""

import dataclasses
import json
import random
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwkv_jax.cli import eval as eval_command
from rwkv_jax.cli import generate as generate_command
from rwkv_jax.cli import runner as cli
from rwkv_jax.io import weights
from rwkv_jax.model import RWKV, ModelConfig, state_file, with_scan_layers
from rwkv_jax.train import optim, sharding, state_tuning, train_step, trainer
from rwkv_jax.train import train_config as config_lib
from tests.helpers import copy_package_source, make_config, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def random_params(config: ModelConfig, seed: int = 0):
    """A model whose every parameter is random (the official init zeroes the output projections, and then
    no state would change the logits)."""
    params = nnx.state(RWKV(config, rngs=nnx.Rngs(seed)), nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, noisy)


TINY = ModelConfig(vocab_size=64, d_model=16, n_layer=2, wkv_form="sequential")


def test_learned_state_starts_next_to_the_empty_state():
    graphdef, params = nnx.graphdef(RWKV(TINY, rngs=nnx.Rngs(0))), random_params(TINY)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (3, 12)), jnp.int32)
    logits = jax.jit(lambda p, t, s: nnx.merge(graphdef, p)(t, s)[0])
    empty = logits(params, tokens, None)
    learned = logits(params, tokens, state_tuning.to_rwkv_state(state_tuning.init(TINY), 3))
    # the first token's WKV denominator gains e^INIT_LOG_B beside its own e^(u + k): a small change
    np.testing.assert_allclose(learned, empty, atol=1e-2)
    assert float(jnp.abs(learned - empty).mean()) < 1e-3
    state = state_tuning.to_rwkv_state(state_tuning.init(TINY), 3)
    assert all(x.shape[:2] == (TINY.n_layer, 3) for x in state)
    for name in ("att_x", "ffn_x", "wkv_a"):  # exactly the empty state's
        assert not np.any(np.asarray(getattr(state, name)))
    # any learned value is a valid state: the denominator stays > 0
    wild = {k: v + 50.0 * jnp.ones_like(v) * (-1) ** i for i, (k, v) in enumerate(state_tuning.init(TINY).items())}
    assert bool(jnp.all(state_tuning.to_rwkv_state(wild, 1).wkv_b > 0))


@pytest.mark.parametrize("form", ["sequential", pytest.param("parallel", marks=pytest.mark.slow),
                                  pytest.param("chunked", marks=pytest.mark.slow)])
def test_gradient_of_the_learned_state_matches_finite_differences(form):
    """The gradient reaches the learned state through every WKV form (each takes an initial state)."""
    config = dataclasses.replace(TINY, wkv_form=form, wkv_chunk_len=4)  # 8 tokens: two chunks
    graphdef = nnx.graphdef(RWKV(config, rngs=nnx.Rngs(0)))
    params = random_params(TINY)
    tokens = np.random.default_rng(1).integers(0, 64, (2, 9)).astype(np.int32)
    learned = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(2), x.shape), state_tuning.init(TINY))

    @jax.jit
    def loss(s):
        return train_step._loss(graphdef, params, s, jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]), 0.0,
                                2048)[0]

    grads = jax.grad(loss)(learned)
    rng = np.random.default_rng(3)
    for name in ("att_x", "ffn_x", "wkv_a", "wkv_log_b"):
        assert float(jnp.abs(grads[name]).max()) > 0, name
        direction = {k: jnp.zeros_like(v) for k, v in learned.items()}
        direction[name] = jnp.asarray(rng.normal(size=learned[name].shape), jnp.float32)
        eps = 1e-2
        plus = loss(jax.tree.map(lambda x, d: x + eps * d, learned, direction))
        minus = loss(jax.tree.map(lambda x, d: x - eps * d, learned, direction))
        numeric = float(plus - minus) / (2 * eps)
        analytic = float(jnp.sum(grads[name] * direction[name]))
        assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-4, (name, numeric, analytic)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_state_tuning_steps_train_the_state_and_leave_every_weight_bit_identical(microbatches):
    optim_config = optim.default_optim_config()
    optim_config.lr_init, optim_config.lr_final, optim_config.warmup_steps = 0.05, 0.05, 0
    optimizer = optim.make_optimizer(optim_config, 20)
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    graphdef, init, abstract, shardings = train_step.train_state_factory(TINY, optimizer, mesh, 0, trainable="state")
    params = random_params(TINY)
    before = [np.array(x) for x in jax.tree.leaves(params)]
    state = init(params)
    # the optimizer state mirrors the learned state only: Adam's moments are its four arrays
    moment_shapes = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim == 2)
    assert moment_shapes == sorted([x.shape for x in jax.tree.leaves(state.initial_state)] * 2)
    step_fn = train_step.make_train_step(graphdef, optimizer, optim.learning_rate(optim_config, 20), shardings, mesh,
                                         microbatches=microbatches, trainable="state")
    eval_fn = train_step.make_eval_step(graphdef, shardings.params, mesh)
    tokens = np.random.default_rng(0).integers(0, 64, (4, 17)).astype(np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    eval_batch = dict(batch, mask=jnp.ones_like(batch["inputs"]))
    start = float(eval_fn(state.params, eval_batch, state.initial_state)[0])
    assert start == pytest.approx(float(eval_fn(state.params, eval_batch, None)[0]), abs=1e-2)
    losses = []
    for _ in range(15):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 15
    assert losses[-1] < losses[0] - 0.05, losses
    tuned = float(eval_fn(state.params, eval_batch, state.initial_state)[0])
    assert tuned < start - 0.05 * 4 * 16
    after = jax.tree.leaves(state.params)
    assert len(after) == len(before)
    for a, b in zip(before, after):
        assert np.array_equal(a, np.asarray(b))
    changed = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(state_tuning.init(TINY)),
                                                         jax.tree.leaves(state.initial_state))]
    assert all(changed)


def test_trainable_all_keeps_no_learned_state():
    optimizer = optim.make_optimizer(optim.default_optim_config(), 10)
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    _, init, abstract, _ = train_step.train_state_factory(TINY, optimizer, mesh, 0)
    assert abstract.initial_state is None and init().initial_state is None
    with pytest.raises(ValueError, match="trainable must be one of"):
        train_step.train_state_factory(TINY, optimizer, mesh, 0, trainable="head")


# --- State files ---------------------------------------------------------------------------------------

def test_a_failed_state_file_write_leaves_nothing_behind(tmp_path):
    (tmp_path / "taken").mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(OSError):
        state_file.save_state(tmp_path / "taken", RWKV(TINY, rngs=nnx.Rngs(0)).init_state(1), model_config=TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_state_file_of_another_model_is_a_one_line_error_naming_both_shapes(tmp_path):
    path = tmp_path / "state.npz"
    state_tuning.save(path, state_tuning.init(TINY), TINY)
    model = RWKV(TINY, rngs=nnx.Rngs(0))
    state, logits = state_file.load_state(path, model)
    assert logits is None and state.att_x.shape == (2, 1, 16)
    other = RWKV(ModelConfig(vocab_size=64, d_model=24, n_layer=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError) as e:
        state_file.load_state(path, other)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    assert "2 layers x 16" in message and "3 layers x 24" in message
    # same state shapes, another vocabulary: still refused, by the saved shape
    with pytest.raises(ValueError, match="vocab 64.*vocab 99"):
        state_file.load_state(path, RWKV(ModelConfig(vocab_size=99, d_model=16, n_layer=2), rngs=nnx.Rngs(0)))


def test_eval_and_generate_refuse_a_bad_state_file_in_one_line(tmp_path, capsys):
    from tests.helpers import write_byte_tokenizer
    config = ModelConfig(vocab_size=260, d_model=16, n_layer=2)
    pth = tmp_path / "m.pth"
    weights.write_pth(weights.model_to_official(RWKV(config, rngs=nnx.Rngs(0))), pth)
    tokenizer = write_byte_tokenizer(tmp_path / "bytes.json")
    (tmp_path / "doc.txt").write_text("ORDER 00001: 3 x bolts -> Oslo.\n")
    (tmp_path / "junk.npz").write_bytes(b"not a state")
    other = dataclasses.replace(config, d_model=24)
    state_tuning.save(tmp_path / "other.npz", state_tuning.init(other), other)
    common = [f"--checkpoint={pth}", f"--tokenizer={tokenizer}"]
    cases = [("junk.npz", "not an RWKV state file"), ("missing.npz", "no such state file"),
             ("other.npz", "written for a model of 2 layers x 24 (d_att 24, d_ffn 96, vocab 260), but this model is "
                           "2 layers x 16 (d_att 16, d_ffn 64, vocab 260)")]
    for name, message in cases:
        for main, flag, args in ((eval_command.main, "--initial_state", [f"--text_files={tmp_path / 'doc.txt'}",
                                                                          f"--report={tmp_path / 'r'}"]),
                                 (generate_command.main, "--load_state", ["--prompt=x", "--max_new_tokens=2"])):
            capsys.readouterr()
            code = cli.call(main, ["prog.py", *common, f"{flag}={tmp_path / name}", *args])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 1 and err[0].startswith(f"prog.py: error: {flag}={tmp_path / name}: "), err
            assert message in err[0], err
    assert not list(tmp_path.glob("r.*"))  # no report written


# --- Config validation ---------------------------------------------------------------------------------

def tiny_config(**fields):
    config = config_lib.base_config(model=config_lib.model_config(vocab_size=512, d_model=32, n_layer=2),
                                    batch_size=4, seq_len=32, num_steps=10, lr_init=1e-3, lr_final=1e-4)
    config.data.sp_vocab_size = 512
    for key, value in fields.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


def test_trainable_state_without_a_starting_model_is_a_config_error():
    with pytest.raises(config_lib.ConfigError, match=r"optim.trainable='state' .* set train.init_from"):
        config_lib.validate(tiny_config(optim__trainable="state"))
    with pytest.raises(config_lib.ConfigError, match=r"optim.trainable must be one of \['all', 'state', 'lora'\]"):
        config_lib.validate(tiny_config(optim__trainable="weights"))


def test_init_from_a_missing_path_or_without_the_tokenizer_is_a_config_error(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="train.init_from='/nonexistent/run' does not exist"):
        config_lib.validate(tiny_config(train__init_from="/nonexistent/run"))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "rwkv_config.json").write_text("{}")
    (run / "tokenizer.model").write_bytes(b"x")
    hint = f"set data.tokenizer_path to its file \\(e.g. {run}/tokenizer.model"
    with pytest.raises(config_lib.ConfigError, match=hint):
        config_lib.validate(tiny_config(train__init_from=str(run)))
    config_lib.validate(tiny_config(train__init_from=str(run), data__tokenizer_path=str(run / "tokenizer.model"),
                                    optim__trainable="state"))


def test_a_resumed_run_needs_neither_its_init_from_model_nor_accepts_another_trainable(tmp_path):
    """The starting model is read once, at step 0; a resumed run restores from its own checkpoint, so moving
    or deleting that model must not stop it (a ConfigError before), while a fresh run still needs it. A
    resume that changes optim.trainable is refused, naming the setting to rerun with (before: a layout
    error listing arrays)."""
    env = {"root": tmp_path, "corpus": REPO / "rwkv_jax" / "data", "data_dir": tmp_path / "data"}
    base = tmp_path / "base"
    trainer.train(make_config(tiny_overrides(env, train__num_steps=2, train__eval_every=0)), base)
    tune = dict(train__init_from=str(base), data__tokenizer_path=str(base / "tokenizer.model"),
                train__eval_every=0, checkpoint__every_steps=2, optim__trainable="state")
    first = trainer.train(make_config(tiny_overrides(env, train__num_steps=2, **tune)), tmp_path / "tuned")
    base.rename(tmp_path / "moved")
    (tmp_path / "moved" / "tokenizer.model").rename(tmp_path / "tokenizer.model")
    tune["data__tokenizer_path"] = str(tmp_path / "tokenizer.model")
    resumed = trainer.train(make_config(tiny_overrides(env, train__num_steps=4, **tune)), tmp_path / "tuned")
    assert first["step"] == 2 and resumed["step"] == 4
    with pytest.raises(config_lib.ConfigError, match=f"train.init_from='{base}' does not exist"):
        trainer.train(make_config(tiny_overrides(env, train__num_steps=2, **tune)), tmp_path / "fresh")
    with pytest.raises(ValueError, match=r"resume refused: .* optim.trainable='state', this run asks for 'all'"
                                         r".* Rerun with --config.optim.trainable=state"):
        trainer.train(make_config(tiny_overrides(env, train__num_steps=6, **(tune | {"optim__trainable": "all"}))),
                      tmp_path / "tuned")
    with pytest.raises(ValueError, match=r"optim.trainable='all', this run asks for 'state'"):
        trainer.train(make_config(tiny_overrides(env, train__num_steps=4, **tune)), tmp_path / "moved")


# --- train.init_from: the parameters of a trained model, in the training model's layout -----------------

@pytest.mark.parametrize("scan_layers", [False, True], ids=["list", "scan_layers"])
def test_init_from_starts_from_the_models_parameters_with_a_fresh_optimizer(tmp_path, scan_layers):
    source = RWKV(TINY, rngs=nnx.Rngs(0))
    nnx.update(source, random_params(TINY, seed=4))
    pth = tmp_path / "m.pth"
    weights.write_pth(weights.model_to_official(source), pth)
    config = dataclasses.replace(TINY, scan_layers=scan_layers)
    optimizer = optim.make_optimizer(optim.default_optim_config(), 10)
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    _, init, abstract, _ = train_step.train_state_factory(config, optimizer, mesh, 0)
    state = init(trainer.load_init_params(str(pth), config, abstract.params))
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    got = weights.model_to_official(with_scan_layers(nnx.merge(nnx.graphdef(RWKV(config, rngs=nnx.Rngs(0))),
                                                               state.params), False))
    want = weights.model_to_official(source)
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    assert int(state.step) == 0  # the optimizer starts afresh: zero moments and counters
    assert all(not np.any(x) for x in map(np.asarray, jax.tree.leaves(state.opt_state)) if x.dtype != bool)
    with pytest.raises(ValueError) as e:
        other = dataclasses.replace(TINY, d_model=24)
        trainer.load_init_params(str(pth), other, train_step.train_state_factory(other, optimizer, mesh, 0)[2].params)
    assert "\n" not in str(e.value)
    assert "is a model of 2 layers x 16" in str(e.value) and "config.model is 2 layers x 24" in str(e.value)


# --- A task of our own, end to end (slow) ---------------------------------------------------------------
# A tiny base model (2 x 32, vocab 512) trained briefly on Python source, then its state tuned on text in
# one rigid template (orders: "ORDER 01234: 3 x bolts -> Oslo."), held-out files of that style scored.

BASE_STEPS, TUNE_STEPS = 200, 60


def order_lines(rng, n: int) -> str:
    items, cities = ["apples", "pears", "bolts", "cables", "lamps", "chairs"], ["Oslo", "Lima", "Pune", "Kyiv", "Perth"]
    return "".join(f"ORDER {rng.randint(0, 99999):05d}: {rng.randint(1, 9)} x {rng.choice(items)} -> "
                   f"{rng.choice(cities)}.\n" for _ in range(n))


def tune_overrides(env, root: Path, **extra) -> dict:
    fields = dict(data__text_files=str(root / "style"), data__data_dir=str(root / "style_data"),
                  data__tokenizer_path=str(root / "base" / "tokenizer.model"), train__init_from=str(root / "base"),
                  optim__trainable="state", optim__lr_init=1.0, optim__lr_final=0.1, optim__warmup_steps=0,
                  train__num_steps=TUNE_STEPS, train__eval_every=1000, train__eval_batches=0,
                  checkpoint__every_steps=1000)
    return tiny_overrides(env, **(fields | extra))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("state_tuning")
    corpus = copy_package_source(root / "corpus")
    rng = random.Random(0)
    (root / "style").mkdir()
    for i in range(20):  # 20 files: the hash split keeps about a fifth for validation
        (root / "style" / f"orders_{i:02d}.txt").write_text(order_lines(rng, 40))
    heldout = random.Random(1)
    documents = [json.dumps({"text": order_lines(heldout, 3)}) + "\n" for _ in range(40)]
    (root / "heldout.jsonl").write_text("".join(documents))
    env = {"root": root, "corpus": corpus, "data_dir": root / "data"}
    start = time.time()
    trainer.train(make_config(tiny_overrides(env, train__num_steps=BASE_STEPS, train__eval_every=0, train__log_every=50,
                                             checkpoint__every_steps=1000, optim__lr_init=3e-3, optim__lr_final=1e-3)),
                  root / "base")
    base_s = time.time() - start
    start = time.time()
    final = trainer.train(make_config(tune_overrides(env, root)), root / "tuned")
    return {"root": root, "env": env, "final": final, "base_s": base_s, "tune_s": time.time() - start}


def checkpoint_params(workdir: Path):
    model = weights.load_model(workdir)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def eval_report(tmp_path, *args) -> dict:
    prefix = tmp_path / f"report{len(list(tmp_path.glob('report*.json')))}"
    assert cli.call(eval_command.main, ["eval.py", *args, f"--report={prefix}"]) == 0
    return json.loads(prefix.with_suffix(".json").read_text())


@pytest.mark.slow
def test_state_tuning_lowers_the_held_out_loss_and_changes_no_weight(tuned, tmp_path, capsys):
    root = tuned["root"]
    base, after = checkpoint_params(root / "base"), checkpoint_params(root / "tuned")
    leaves_base, leaves_after = jax.tree.leaves(base), jax.tree.leaves(after)
    assert jax.tree.structure(base) == jax.tree.structure(after) and leaves_base
    for a, b in zip(leaves_base, leaves_after):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # the run's own evaluation (all of its validation files, windows of 32 tokens): before tuning and at the end
    records = [json.loads(line) for line in (root / "tuned" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if r["kind"] == "eval"}
    assert sorted(evals) == [0, TUNE_STEPS] and evals[TUNE_STEPS] < evals[0] - 0.05, evals
    # the state file is written, for this model's shape
    state_path = root / "tuned" / "state.npz"
    model = weights.load_model(root / "tuned")
    state, logits = state_file.load_state(state_path, model)
    assert logits is None and state.att_x.shape == (2, 1, 32)
    # eval.py on held-out text of the style (40 documents of 3 lines, not in the tuning files): lower with the
    # learned state than without, most over the first tokens of a document, where a starting state acts
    # (in training, windows of 32 tokens start from it)
    heldout = tuned["root"] / "heldout.jsonl"
    losses = {}
    for eval_len in (16, 32):
        args = [f"--checkpoint={root / 'tuned'}", f"--text_files={heldout}", f"--eval_len={eval_len}"]
        without = eval_report(tmp_path, *args)
        with_state = eval_report(tmp_path, *args, f"--initial_state={state_path}")
        assert with_state["documents"] == without["documents"] == 40
        assert with_state["initial_state"] == str(state_path) and "initial_state" not in without
        losses[eval_len] = (without["loss"], with_state["loss"])
    assert losses[16][1] < losses[16][0] - 0.1, losses
    assert losses[32][1] < losses[32][0] - 0.05, losses
    figures = (f"state tuning: held-out loss over the first 16 / 32 tokens {losses[16][0]:.4f} -> "
               f"{losses[16][1]:.4f} / {losses[32][0]:.4f} -> {losses[32][1]:.4f} nats/token; the run's eval "
               f"{evals[0]:.4f} -> {evals[TUNE_STEPS]:.4f}; "
               f"base {BASE_STEPS} steps {tuned['base_s']:.0f}s, tuning {TUNE_STEPS} steps {tuned['tune_s']:.0f}s")
    # generate.py starts every prompt from it: the same sampling draws (seed) give other text. (Not greedy: a
    # model this small may repeat one token after the prompt whatever the state.)
    outputs = []
    for extra in ([], [f"--load_state={state_path}"]):
        capsys.readouterr()
        assert cli.call(generate_command.main, ["generate.py", f"--checkpoint={root / 'tuned'}", "--prompt=ORDER",
                                                "--temperature=1", "--seed=0", "--max_new_tokens=24", "--nostop_at_eot",
                                                *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] != outputs[1]
    with capsys.disabled():
        print("\n" + figures)
        print(f"generated without / with the state: {outputs[0][:60]!r} / {outputs[1][:60]!r}")


@pytest.mark.slow
def test_state_tuning_resumes_from_its_checkpoint(tuned, capsys):
    root = tuned["root"]
    state_path = root / "tuned" / "state.npz"
    before = {k: v.copy() for k, v in np.load(state_path).items()}
    capsys.readouterr()
    trainer.train(make_config(tune_overrides(tuned["env"], root, train__num_steps=TUNE_STEPS + 5)), root / "tuned")
    assert f"resumed from the checkpoint of step {TUNE_STEPS}" in capsys.readouterr().out
    after = dict(np.load(state_path))
    assert not np.array_equal(before["wkv_a"], after["wkv_a"])  # trained on from the restored state
    base, after = checkpoint_params(root / "base"), checkpoint_params(root / "tuned")
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(after)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_init_from_a_model_of_another_shape_is_a_one_line_error(tuned, tmp_path):
    config = make_config(tune_overrides(tuned["env"], tuned["root"], model__d_model=48))
    with pytest.raises(ValueError) as e:
        trainer.train(config, tmp_path / "other")
    assert "\n" not in str(e.value)
    assert "is a model of 2 layers x 32" in str(e.value) and "config.model is 2 layers x 48" in str(e.value)
