"""The one builder of the training program: the train state, the train step and the eval step that a
config describes, for a mesh and a platform. The trainer runs what it builds; compile-only planning
(aot.py) compiles what it builds for a TPU topology, so a plan is the program that trains.

    program = build(config, mesh, platform)            # platform: 'cpu', 'gpu' or 'tpu'
    state = program.init()                             # or restore onto program.abstract_state / .shardings
    state, metrics = program.train_step(state, batch)
    loss_sum, count = program.eval_step(state.params, batch, state.initial_state)
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
import optax
from jax.sharding import Mesh

from rwkv_jax.model import ModelConfig
from rwkv_jax.train import optim, train_step


def resolve(config: ml_collections.ConfigDict, platform: str) -> ModelConfig:
    """config.model as a ModelConfig with every 'auto' choice made for `platform` (ModelConfig.from_dict)."""
    return ModelConfig.from_dict(config.model, platform)


def carry_rows(config: ml_collections.ConfigDict) -> int:
    """Rows of recurrent state carried from step to step: the global batch when streaming, else none."""
    return config.train.batch_size if config.data.sampling == "streams" else 0


@dataclasses.dataclass(frozen=True)
class Program:
    model_config: ModelConfig
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    graphdef: Any
    init: Callable            # init(params=None) -> TrainState, sharded on the mesh
    abstract_state: Any       # train_step.TrainState of ShapeDtypeStructs
    shardings: Any            # train_step.TrainState of shardings
    train_step: Callable      # (state, batch) -> (state, metrics)
    eval_step: Callable       # (params, batch, initial_state) -> (loss sum, token count)


def build(config: ml_collections.ConfigDict, mesh: Mesh, platform: str, *, model_config: ModelConfig | None = None,
          microbatches: int | None = None, loss_chunk_tokens: int | None = None,
          bptt_windows: int | None = None) -> Program:
    """The program of `config` on `mesh`, compiled for `platform`. `model_config` (default: `resolve(config,
    platform)`) lets a resumed run keep its checkpoints' layer layout; the keyword overrides serve the
    cost probes of compile-only planning, which compile loop-free variants of the same step."""
    t = config.train
    model_config = model_config or resolve(config, platform)
    optimizer = optim.make_optimizer(config.optim, t.num_steps)
    schedule = optim.learning_rate(config.optim, t.num_steps)
    trainable = config.optim.trainable
    graphdef, init, abstract_state, shardings = train_step.train_state_factory(
        model_config, optimizer, mesh, t.seed, trainable=trainable, carry_rows=carry_rows(config),
        lora=optim.lora_spec(config.optim))
    chunk_tokens = loss_chunk_tokens or t.loss_chunk_tokens
    step_fn = train_step.make_train_step(
        graphdef, optimizer, schedule, shardings, mesh, microbatches=microbatches or t.microbatches,
        l2wrap_factor=config.optim.l2wrap_factor, loss_chunk_tokens=chunk_tokens, trainable=trainable,
        bptt_windows=bptt_windows or t.bptt_windows)
    eval_fn = train_step.make_eval_step(graphdef, shardings.params, mesh, loss_chunk_tokens=chunk_tokens)
    return Program(model_config, optimizer, schedule, graphdef, init, abstract_state, shardings, step_fn, eval_fn)
