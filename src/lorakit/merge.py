"""Merge W + s*B@A into the weights for zero-overhead inference, and take it out again.

Merging is explicit and tracked per layer (a stack), so unmerge knows exactly what to undo. The
sum is formed in float32 and rounded once into the weight's dtype. With keep_original=True the
weight before merging is kept, making unmerge bit-exact even in bf16/fp16 (subtracting the delta
back, as PEFT does, drifts in low precision).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from . import core, dora
from .errors import LoraError
from .layer import LoraLayer, lora_layers, require_state, saved_modules


@dataclass(frozen=True)
class MergeReport:
    """What a merge did: layers touched and the worst rounding error of the stored weights."""

    adapters: tuple[str, ...]
    layers: int
    max_abs_error: float  # max |stored weight - exact float32 W + dW| over all merged layers

    def __str__(self) -> str:
        return (f"merged {list(self.adapters)} into {self.layers} layers "
                f"(max rounding error {self.max_abs_error:.3g})")


def layer_delta(layer: LoraLayer, name: str) -> Tensor:
    """dW for one adapter of one layer, (out x in), float32."""
    return core.delta(layer.lora_A[name], layer.lora_B[name], layer.scaling[name])


def _merge_step(layer: LoraLayer, name: str, m: Tensor, record: bool = False) -> Tensor:
    """m (float32 out x in) with adapter `name` merged in: m + dW, or DoRA's g * (m + dW)."""
    if name not in layer.lora_magnitude_vector:
        return m + layer_delta(layer, name)
    new, norm = dora.merge_matrix(layer, name, m, dora.base_matrix(layer))
    if record:
        layer.dora_norms[name] = norm
    return new


def _unmerge_step(layer: LoraLayer, name: str, m: Tensor) -> Tensor:
    if name in layer.lora_magnitude_vector:
        return dora.unmerge_matrix(layer, name, m)
    return m - layer_delta(layer, name)


@torch.no_grad()
def merge(model: nn.Module, adapter: str | list[str] | None = None, *, keep_original: bool = False) -> MergeReport:
    """Write the active adapters (or `adapter`) into the base weights; their LoRA path then idles."""
    state = require_state(model)
    names = list(state.active) if adapter is None else [adapter] if isinstance(adapter, str) else list(adapter)
    for n in names:
        if n not in state.configs:
            raise LoraError(f"no adapter named {n!r}; adapters: {list(state.configs)}")
        if n not in state.active:
            raise LoraError(f"adapter {n!r} is not active: set_adapter(model, {n!r}) before merging it")
    _check_tied(model)
    worst, count = 0.0, 0
    for _, layer in lora_layers(model):
        for n in names:
            if n not in layer.lora_A or n in layer.merged:
                continue
            current = layer.kind.matrix(layer.base_layer)
            if keep_original:  # a kind with `write` (quantized) swaps in a new weight: keep the old object
                w = layer.base_layer.weight
                layer.originals[n] = w if layer.kind.write is not None else w.detach().clone()
            exact = _merge_step(layer, n, current.float(), record=True)
            layer.kind.store(layer.base_layer, exact.to(current.dtype))
            stored = layer.kind.matrix(layer.base_layer).float()
            worst = max(worst, (stored - exact).abs().max().item())
            layer.merged.append(n)
            state.n_merged += 1
            count += 1
    return MergeReport(tuple(names), count, worst)


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Undo every merge, newest first: restore the kept original, or subtract dW in float32."""
    state = require_state(model)
    for _, layer in lora_layers(model):
        while layer.merged:
            n = layer.merged.pop()
            state.n_merged -= 1
            original = layer.originals.pop(n, None)
            if original is not None:
                if layer.kind.write is not None:  # quantized: put the kept weight object back
                    layer.kind.store(layer.base_layer, original)
                else:
                    layer.base_layer.weight.copy_(original)
                layer.dora_norms.pop(n, None)
            else:
                current = layer.kind.matrix(layer.base_layer)
                layer.kind.store(layer.base_layer, _unmerge_step(layer, n, current.float()).to(current.dtype))


@contextmanager
def merged(model: nn.Module, *, keep_original: bool = True) -> Iterator[MergeReport]:
    """Merge the active adapters inside the block, unmerge on the way out."""
    report = merge(model, keep_original=keep_original)
    try:
        yield report
    finally:
        unmerge(model)


@torch.no_grad()
def merged_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, Tensor]:
    """The state dict of the plain model with the active adapters (or `adapter`) merged in,
    computed without changing the model: for exporting a merged checkpoint."""
    state = require_state(model)
    names = list(state.active) if adapter is None else [adapter]
    wrappers = dict(lora_layers(model))
    kept = dict(saved_modules(model))
    weights: dict[str, Tensor] = {}
    for path, layer in wrappers.items():
        if layer.kind.write is not None:
            raise LoraError(
                f"merged_state_dict: {path} is a {layer.kind.name} layer whose weight is stored quantized; "
                "call lorakit.quant.dequantize(model) first for a dense export, or merge(model) to requantize in place"
            )
        m = layer.kind.matrix(layer.base_layer).float()
        for n in names:
            if n in layer.lora_A and n not in layer.merged:
                m = _merge_step(layer, n, m)
        weights[f"{path}.weight"] = _from_matrix(layer, m.to(layer.base_layer.weight.dtype))
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        plain = _plain_key(key, wrappers, kept, names)
        if plain is not None:
            out[plain] = weights.get(plain, value)
    return out


def _from_matrix(layer: LoraLayer, m: Tensor) -> Tensor:
    w = layer.base_layer.weight.detach().clone()
    layer.kind.matrix(_Holder(w)).copy_(m)
    return w


class _Holder:
    """Lets a kind's `matrix` view work on a bare weight tensor."""

    def __init__(self, weight: Tensor):
        self.weight = weight


def _plain_key(key: str, wrappers: dict, kept: dict, names: list[str]) -> str | None:
    for path in wrappers:
        if key.startswith(path + "."):
            rest = key[len(path) + 1:]
            if rest.startswith("base_layer."):
                return f"{path}.{rest[len('base_layer.'):]}"
            return None  # lora_A / lora_B / dropout
    for path, mod in kept.items():
        if key.startswith(path + "."):
            rest = key[len(path) + 1:]
            active = [n for n in names if n in mod.modules_to_save]
            src = f"modules_to_save.{active[-1]}." if active else "original_module."
            return f"{path}.{rest[len(src):]}" if rest.startswith(src) else None
    return key


def _check_tied(model: nn.Module) -> None:
    """Merging into a weight shared with another module (tied embeddings) would change both."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for path, layer in lora_layers(model):
        names = owners.get(id(layer.base_layer.weight), [])
        if len(names) > 1 and any(n for n in names if not n.startswith(path + ".")):
            raise LoraError(
                f"cannot merge into {path}: its weight is shared with {names} (tied weights); "
                "merging would change the other module too. Untie them first or keep it unmerged."
            )
