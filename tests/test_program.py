"""One program: the trainer and compile-only planning (aot.py) build their steps through
`rwkv_jax.train.program.build`, and for one config and platform the steps they build lower to the same
StableHLO."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from rwkv_jax.train import aot, sharding, train_config, trainer
from rwkv_jax.train import program as program_lib

REPO = Path(__file__).resolve().parents[1]


class _Built(Exception):
    """Raised by the recording builder once the program is built: the test needs nothing after it."""


def _tiny_config(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("tiny_config", REPO / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, path in enumerate(sorted((REPO / "rwkv_jax").rglob("*.py"))[:40]):
        (corpus / f"{i}.py").write_text(path.read_text())
    values = {"data.source": "text", "data.text_files": str(corpus), "data.data_dir": str(tmp_path / "data"),
              "data.sp_vocab_size": 512, "data.text_split": "all", "train.eval_every": 0,
              "model.vocab_size": 512, "model.d_model": 32, "model.n_layer": 2,
              "train.seq_len": 32, "train.batch_size": 4, "train.num_steps": 3}
    for key, value in values.items():
        section, field = key.split(".")
        setattr(config[section], field, value)
    return config


def _lowered_text(program) -> tuple[str, str]:
    """The train and eval steps' StableHLO for the config's batch shapes."""
    state = program.abstract_state
    tokens = jax.ShapeDtypeStruct((4, 32), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens}
    train = program.train_step.lower(state, batch).as_text()
    evaluation = program.eval_step.lower(state.params, {**batch, "mask": tokens}, state.initial_state).as_text()
    return train, evaluation


def _recorder(built: dict, who: str, real_build):
    def build(config, mesh, platform, **kwargs):
        # Both programs built for this CPU: the trainer's platform, whatever the planner targets.
        built[who] = (platform, kwargs, real_build(config, sharding.make_mesh(config.mesh), "cpu", **kwargs))
        raise _Built
    return build


def test_trainer_and_compile_only_lower_to_the_same_program(tmp_path, monkeypatch):
    config = _tiny_config(tmp_path)
    built, real_build = {}, program_lib.build
    monkeypatch.setattr(program_lib, "build", _recorder(built, "trainer", real_build))
    with pytest.raises(_Built):
        trainer.train(config, tmp_path / "run")
    monkeypatch.setattr(program_lib, "build", _recorder(built, "planner", real_build))
    monkeypatch.setattr(aot, "topology_devices", lambda topology: jax.devices())
    monkeypatch.setattr(aot, "_chip_of", lambda devices, topology: (aot.CHIPS["TPU v5 lite"], 1))
    with pytest.raises(_Built):
        aot.compile_only(config, "v5e:1x1", log=lambda *_: None)

    assert built["trainer"][0] == "cpu" and built["planner"][0] == "tpu"
    trainer_text, planner_text = _lowered_text(built["trainer"][2]), _lowered_text(built["planner"][2])
    assert trainer_text[0] == planner_text[0], "the train steps differ"
    assert trainer_text[1] == planner_text[1], "the eval steps differ"
    assert "stablehlo" in trainer_text[0] or "mhlo" in trainer_text[0]


def test_resolve_makes_every_auto_choice_for_the_platform():
    config = train_config.base_config(model=train_config.model_config(dtype="auto", wkv_form="auto",
                                                                       scan_layers="auto"),
                                      batch_size=4, seq_len=32, num_steps=1, lr_init=1e-3, lr_final=1e-4)
    cpu, tpu = program_lib.resolve(config, "cpu"), program_lib.resolve(config, "tpu")
    assert (cpu.dtype, cpu.wkv_form, cpu.scan_layers) == ("float32", "sequential", False)
    assert (tpu.dtype, tpu.wkv_form, tpu.scan_layers) == ("bfloat16", "pallas", True)
