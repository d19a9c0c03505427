"""Choose, list and delete adapters. Switching is one assignment on the shared state: O(1)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from torch import nn

from .errors import LoraError
from .layer import lora_layers, require_state, saved_modules, state_of


def _check_unmerged(model: nn.Module, doing: str) -> None:
    state = state_of(model)
    if state is None or not state.n_merged:
        return
    merged = sorted({n for _, layer in lora_layers(model) for n in layer.merged})
    if merged:
        raise LoraError(f"cannot {doing} while adapters {merged} are merged: unmerge(model) first")


def set_adapter(model: nn.Module, name: str | Sequence[str] | None) -> None:
    """Make `name` the active adapter (a list: several at once, summed; None: the plain base).

    Base weights are never touched and nothing is copied. Trainability is not changed: pass
    `adapter_parameters(model, name)` to the optimizer.
    """
    state = require_state(model)
    names = () if name is None else (name,) if isinstance(name, str) else tuple(name)
    for n in names:
        if n not in state.configs:
            raise LoraError(f"no adapter named {n!r}; adapters: {list(state.configs)}")
    if names != state.active and state.n_merged:
        _check_unmerged(model, "switch adapters")
    state.active = names


def active_adapters(model: nn.Module) -> list[str]:
    state = state_of(model)
    return list(state.active) if state else []


def list_adapters(model: nn.Module) -> list[str]:
    state = state_of(model)
    return list(state.configs) if state else []


def get_config(model: nn.Module, name: str):
    state = require_state(model)
    if name not in state.configs:
        raise LoraError(f"no adapter named {name!r}; adapters: {list(state.configs)}")
    return state.configs[name]


def delete_adapter(model: nn.Module, name: str, *, unwrap: bool = True) -> None:
    """Remove adapter `name` everywhere. Layers left with no adapter are unwrapped again
    (unwrap=False keeps the wrappers, e.g. when another adapter is about to take the place)."""
    from .inject import _replace

    state = require_state(model)
    if name not in state.configs:
        raise LoraError(f"no adapter named {name!r}; adapters: {list(state.configs)}")
    layers = lora_layers(model)
    for path, layer in layers:
        if name in layer.merged:
            raise LoraError(f"adapter {name!r} is merged into {path}: unmerge(model) first")
    for path, layer in layers:
        layer.remove(name)
        if unwrap and not layer.lora_A:
            _replace(model, path, layer.base_layer)
    for path, mod in saved_modules(model):
        if name in mod.modules_to_save:
            del mod.modules_to_save[name]
        if unwrap and not len(mod.modules_to_save):
            _replace(model, path, mod.original_module)
    del state.configs[name]
    state.active = tuple(n for n in state.active if n != name)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the plain base model inside the block (adapters stay loaded)."""
    state = require_state(model)
    _check_unmerged(model, "disable adapters")
    before = state.disabled
    state.disabled = True
    try:
        yield
    finally:
        state.disabled = before
