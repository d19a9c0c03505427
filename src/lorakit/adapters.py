"""Choose, list and delete adapters. Switching is one assignment on the shared state: O(1)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from torch import nn

from .errors import LoraError
from .layer import lora_layers, replace_module, require_adapter, require_state, require_unmerged, saved_modules, state_of


def set_adapter(model: nn.Module, name: str | Sequence[str] | None) -> None:
    """Make `name` the active adapter (a list: several at once, summed; None: the plain base).

    Base weights are never touched and nothing is copied. Trainability is not changed: pass
    `adapter_parameters(model, name)` to the optimizer.
    """
    state = require_state(model)
    names = () if name is None else (name,) if isinstance(name, str) else tuple(name)
    for n in names:
        require_adapter(state, n)
    if names != state.active and state.n_merged:
        require_unmerged(model, "switch adapters")
    state.active = names


def active_adapters(model: nn.Module) -> list[str]:
    state = state_of(model)
    return list(state.active) if state else []


def list_adapters(model: nn.Module) -> list[str]:
    state = state_of(model)
    return list(state.configs) if state else []


def get_config(model: nn.Module, name: str) -> Any:
    state = require_state(model)
    require_adapter(state, name)
    return state.configs[name]


def delete_adapter(model: nn.Module, name: str, *, unwrap: bool = True) -> None:
    """Remove adapter `name` everywhere. Layers left with no adapter are unwrapped again
    (unwrap=False keeps the wrappers, e.g. when another adapter is about to take the place)."""
    state = require_state(model)
    require_adapter(state, name)
    layers = lora_layers(model)
    for path, layer in layers:
        if name in layer.merged:
            raise LoraError(f"adapter {name!r} is merged into {path}: unmerge(model) first")
    for path, layer in layers:
        layer.remove(name)
        if unwrap and not layer.lora_A:
            replace_module(model, path, layer.base_layer)
    for path, mod in saved_modules(model):
        if name in mod.modules_to_save:
            del mod.modules_to_save[name]
        if unwrap and not len(mod.modules_to_save):
            replace_module(model, path, mod.original_module)
    del state.configs[name]
    state.active = tuple(n for n in state.active if n != name)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the plain base model inside the block (adapters stay loaded)."""
    state = require_state(model)
    require_unmerged(model, "disable adapters")
    before = state.disabled
    state.disabled = True
    try:
        yield
    finally:
        state.disabled = before
