"""The registry of model generations: `family_of(config)` gives the `Family` of `config.version`.

A generation registers itself by a module path in `_MODULES`; the module defines `FAMILY`. Modules are
imported when first asked for, so that the registry imports no model code (and no model code imports
the registry's users)."""

import dataclasses
import importlib
from collections.abc import Callable

import numpy as np

_MODULES = {4: "rwkv_jax.model.rwkv4", 7: "rwkv_jax.model.rwkv7"}  # generation -> the module that defines its FAMILY


@dataclasses.dataclass(frozen=True)
class LearnedState:
    """How state tuning (rwkv_jax/train/state_tuning.py) parameterises a generation's initial state: a
    small fp32 pytree any value of which is a valid state.

    fields:   the keys of the learned dict (they tell the generations' learned states apart).
    init:     config -> the learned dict at the start of tuning (the empty state, or next to it).
    to_state: (learned, batch_size) -> the model's state [L, batch_size, *], the learned state in every
              row (differentiable).
    """
    fields: tuple[str, ...]
    init: Callable
    to_state: Callable


@dataclasses.dataclass(frozen=True)
class Family:
    """What code outside `rwkv_jax.model`, `rwkv_jax.ops` and the weights mapping may know of a generation.

    version:         the RWKV generation (ModelConfig.version).
    model_class:     the nnx.Module: `model_class(config, rngs=...)`; see this package's docstring for the
                     methods every model offers.
    state_type:      the NamedTuple of the recurrent state of all layers (fp32 arrays, layers first).
    init_state:      (config, batch_size) -> the empty state.
    weights_layout:  config -> {official name: (path in the model's pure param dict, kind, official shape)};
                     kinds: 'linear' (torch [out, in] vs our kernel [in, out]), 'mix' (official [1, 1, D]
                     vs our [D]), 'plain' (the same array).
    dims_from_tensors: official-named tensors -> the ModelConfig fields of their shape (ValueError if the
                     tensors are not this generation's).
    wkv_forms:       the values model.wkv_form may take besides 'auto'.
    default_wkv_form: (platform ('cpu', 'gpu', 'tpu'), inference=False) -> the WKV form model.wkv_form=
                     'auto' picks there; inference=True for a model loaded to run without gradients.
    lr_multipliers:  learning-rate multiplier of parameters by leaf name (optim.layerwise_lr).
    logical_axes:    the logical axis names its parameters carry; each has a rule in
                     rwkv_jax.train.sharding.RULES (a test checks it).
    flops_per_token: config -> the training FLOPs (forward and backward) of one token, for MFU.
    learned_state:   the LearnedState of state tuning.
    """
    version: int
    model_class: type
    state_type: type
    init_state: Callable
    weights_layout: Callable[..., dict]
    dims_from_tensors: Callable[[dict[str, np.ndarray]], dict]
    wkv_forms: tuple[str, ...]
    default_wkv_form: Callable[..., str]
    lr_multipliers: dict[str, float]
    logical_axes: tuple[str, ...]
    flops_per_token: Callable[..., float]
    learned_state: LearnedState


VERSIONS: tuple[int, ...] = tuple(sorted(_MODULES))


def family(version: int) -> Family:
    """The Family of RWKV generation `version`; ValueError naming the known ones."""
    if version not in _MODULES:
        raise ValueError(f"model.version={version!r} is not a supported RWKV generation; known: {list(VERSIONS)}")
    return importlib.import_module(_MODULES[version]).FAMILY


def family_of(config) -> Family:
    """The Family of a ModelConfig (its `version`)."""
    return family(config.version)


def all_lr_multipliers() -> dict[str, float]:
    """Every generation's learning-rate multipliers by parameter name (their names do not collide)."""
    table: dict[str, float] = {}
    for version in VERSIONS:
        table.update(family(version).lr_multipliers)
    return table
