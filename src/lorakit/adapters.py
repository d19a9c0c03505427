"""Choose, list and delete adapters. Switching is one assignment on the shared state: O(1)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from torch import nn

from .errors import LoraError
from .inject import adapter_parameters
from .layer import lora_layers, replace_module, require_adapter, require_state, saved_modules, state_of
from .params import module_wrappers
from .tokens import TokenLayer


def set_adapter(model: nn.Module, name: str | Sequence[str] | None, *, inference_mode: bool = False) -> None:
    """Make `name` the active adapter (a list: several at once, summed; None: the plain base).

    As PEFT's set_adapter, the switch also decides what trains: the active adapters' parameters
    (as `adapter_parameters(model, name)` lists them) require grad and every other adapter's are
    frozen, so after inject(a), inject(b), set_adapter(a) a training step trains a (b's inject had
    frozen it). `inference_mode=True`: nothing trains. Base weights are never touched, unfrozen or
    copied; the switch itself is one assignment, the trainability pass one walk over the adapters.
    """
    if not isinstance(inference_mode, bool):
        raise LoraError(f"set_adapter: inference_mode={inference_mode!r} must be True or False")
    state = require_state(model)
    names = () if name is None else (name,) if isinstance(name, str) else tuple(name)
    for n in names:
        require_adapter(state, n)
    if names != state.active and state.n_merged:
        require_unmerged(model, "switch adapters")
    state.active = names
    want = set() if inference_mode else set(names)
    if state.trainable is None:  # not known: one pass over every adapter's parameters
        train = {id(p) for n in want for p in adapter_parameters(model, n)}
        for p in adapter_parameters(model):  # every adapter's (shared biases count as the active one's)
            if p.requires_grad != (id(p) in train):
                p.requires_grad_(id(p) in train)
    else:  # only the adapters whose trainability changes: a switch costs two adapters, not all of them
        for n, on in sorted(((n, n in want) for n in state.trainable ^ want), key=lambda t: t[1]):
            for p in _params(model, state, n):  # (freezing first: a bias shared with an active adapter ends on)
                p.requires_grad_(on)
    state.trainable = want


def _params(model: nn.Module, state: Any, name: str) -> list[nn.Parameter]:
    """adapter_parameters(model, name), remembered until that adapter changes."""
    if name not in state.params:
        state.params[name] = adapter_parameters(model, name)
    return state.params[name]


def require_unmerged(model: nn.Module, doing: str) -> None:
    """No adapter merged into weights, parameters or token rows (switching or mixing adapters
    would then be wrong). state.n_merged counts every merge, so an unmerged model costs O(1)."""
    state = state_of(model)
    if state is None or not state.n_merged:
        return
    merged = sorted({n for _, m in [*lora_layers(model), *module_wrappers(model)] for n in m.merged})
    if merged:
        raise LoraError(f"cannot {doing} while adapters {merged} are merged: unmerge(model) first")


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
    wrappers = module_wrappers(model)
    for path, layer in [*layers, *wrappers]:
        if name in layer.merged:
            raise LoraError(f"adapter {name!r} is merged into {path}: unmerge(model) first")
    for path, layer in layers:
        layer.remove(name)
        if unwrap and not layer.lora_A:
            replace_module(model, path, layer.base_layer)
    for path, wrapper in wrappers:  # parameter and token-row wrappers (a tied head follows its embedding)
        if name in wrapper.adapters() and not (isinstance(wrapper, TokenLayer) and wrapper.tied is not None):
            wrapper.remove(name)
    for path, wrapper in wrappers:
        if unwrap and not wrapper.adapters():
            replace_module(model, path, wrapper.base_layer)
    for path, mod in saved_modules(model):
        if name in mod.modules_to_save:
            del mod.modules_to_save[name]
        if unwrap and not len(mod.modules_to_save):
            replace_module(model, path, mod.original_module)
    del state.configs[name]
    state.params.pop(name, None)
    if state.trainable is not None:
        state.trainable.discard(name)
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
