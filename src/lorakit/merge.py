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

from .errors import LoraError
from .layer import LoraLayer, lora_layers, replace_module, require_adapter, require_state, saved_modules, state_of
from .params import module_wrappers, shared_elsewhere
from .tokens import TokenLayer


@dataclass(frozen=True)
class MergeReport:
    """What a merge did: layers touched and the worst rounding error of the stored weights."""

    adapters: tuple[str, ...]
    layers: int
    max_abs_error: float  # max |stored weight - exact float32 W + dW| over all merged layers

    def __str__(self) -> str:
        return (f"merged {list(self.adapters)} into {self.layers} layers "
                f"(max rounding error {self.max_abs_error:.3g})")


@torch.no_grad()
def merge(model: nn.Module, adapter: str | list[str] | None = None, *, keep_original: bool = False) -> MergeReport:
    """Write the active adapters (or `adapter`) into the base weights; their LoRA path then idles.

    Also merged: a bias on B (lora_bias) into the base bias, LoRA on parameters into those
    parameters, trainable token rows into their embedding (lorakit.params, lorakit.tokens)."""
    state = require_state(model)
    names = list(state.active) if adapter is None else [adapter] if isinstance(adapter, str) else list(adapter)
    for n in names:
        require_adapter(state, n)
        if n not in state.active:
            raise LoraError(f"adapter {n!r} is not active: set_adapter(model, {n!r}) before merging it")
    _check_tied(model)
    layers = lora_layers(model)
    wrappers = [(p, w) for p, w in module_wrappers(model) if not (isinstance(w, TokenLayer) and w.tied is not None)]
    _check_mergeable(model, layers, wrappers, names)
    worst, count = 0.0, 0
    for _, layer in layers:
        for n in names:
            if n not in layer.lora_A or n in layer.merged:
                continue
            current = layer.kind.matrix(layer.base_layer)
            if keep_original:  # a kind with `write` (quantized) swaps in a new weight: keep the old object
                w = layer.base_layer.weight
                layer.originals[n] = w if layer.kind.write is not None else w.detach().clone()
            exact = layer.variants[n].merge(layer, n, current.float())
            layer.kind.store(layer.base_layer, exact.to(current.dtype))
            stored = layer.kind.matrix(layer.base_layer).float()
            worst = max(worst, (stored - exact).abs().max().item())
            d = _bias_delta(layer, n)
            if d is not None:  # lora_bias: s * b into the base bias, float32 sum, one rounding
                bias = layer.base_layer.bias
                if keep_original:
                    _kept_biases(layer)[n] = bias.detach().clone()
                exact_b = bias.float() + d
                bias.copy_(exact_b.to(bias.dtype))
                worst = max(worst, (bias.float() - exact_b).abs().max().item())
            layer.merged.append(n)
            state.n_merged += 1
            count += 1
    for _, wrapper in wrappers:
        for n in names:
            if n not in wrapper.adapters() or n in wrapper.merged:
                continue
            err = wrapper.merge(n) if isinstance(wrapper, TokenLayer) else wrapper.merge(n, keep_original)
            worst = max(worst, err)
            state.n_merged += 1
            count += 1
    return MergeReport(tuple(names), count, worst)


def _bias_delta(layer: LoraLayer, name: str) -> Tensor | None:
    """What merging `name` adds to the layer's base bias (a variant without bias_delta: nothing)."""
    get = getattr(layer.variants[name], "bias_delta", None)
    return get(layer, name) if get is not None else None


def _kept_biases(layer: LoraLayer) -> dict[str, Tensor]:
    """Biases kept at merge time (keep_original), by adapter: kept on the layer object itself."""
    return layer.__dict__.setdefault("kept_biases", {})


def _check_mergeable(model: nn.Module, layers: list, wrappers: list, names: list[str]) -> None:
    """Everything a merge will write can be written, checked before any weight changes."""
    for path, layer in layers:
        for n in names:
            if n in layer.lora_A and n not in layer.merged and _bias_delta(layer, n) is not None \
                    and getattr(layer.base_layer, "bias", None) is None:
                raise LoraError(f"cannot merge adapter {n!r} into {path}: its bias on B (lora_bias) needs a bias on the "
                                f"base {type(layer.base_layer).__name__}, which has none (PEFT refuses this merge too); "
                                "keep the adapter unmerged")
    for path, wrapper in wrappers:
        if isinstance(wrapper, TokenLayer):
            continue
        for n in names:
            for pname in wrapper.params_of(n) if n not in wrapper.merged else ():
                others = shared_elsewhere(model, wrapper, path, pname)
                if others:
                    raise LoraError(f"cannot merge into {path}.{pname}: the parameter is shared with {others} (tied); "
                                    "merging would change them too. Keep the adapter unmerged")


_merge_active = merge  # for unload(), whose `merge` argument hides this function


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Undo every merge, newest first: restore the kept original, or subtract dW in float32."""
    state = require_state(model)
    for _, layer in lora_layers(model):
        while layer.merged:
            n = layer.merged.pop()
            state.n_merged -= 1
            d = _bias_delta(layer, n)
            original = layer.originals.pop(n, None)
            if original is not None:
                if layer.kind.write is not None:  # quantized: put the kept weight object back
                    layer.kind.store(layer.base_layer, original)
                else:
                    layer.base_layer.weight.copy_(original)
                layer.variants[n].forget_merge(layer, n)
            else:
                current = layer.kind.matrix(layer.base_layer)
                layer.kind.store(layer.base_layer, layer.variants[n].unmerge(layer, n, current.float()).to(current.dtype))
            if d is not None:
                bias = layer.base_layer.bias
                kept = _kept_biases(layer).pop(n, None)
                bias.copy_(kept if kept is not None else (bias.float() - d).to(bias.dtype))
    for _, wrapper in module_wrappers(model):
        while wrapper.merged and not (isinstance(wrapper, TokenLayer) and wrapper.tied is not None):
            wrapper.unmerge_last()
            state.n_merged -= 1


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
    wrappers: dict[str, nn.Module] = dict(lora_layers(model))
    kept = dict(saved_modules(model))
    weights: dict[str, Tensor] = {}
    for path, layer in wrappers.items():
        if layer.kind.write is not None:
            raise LoraError(
                f"merged_state_dict: {path} is a {layer.kind.name} layer whose weight is stored quantized; "
                "call lorakit.quant.dequantize(model) first for a dense export, or merge(model) to requantize in place"
            )
        m = layer.kind.matrix(layer.base_layer).float()
        bias = getattr(layer.base_layer, "bias", None)
        b = bias.detach().float() if bias is not None else None
        for n in names:
            if n in layer.lora_A and n not in layer.merged:
                m = layer.variants[n].merge(layer, n, m, record=False)
                d = _bias_delta(layer, n)
                if d is not None:
                    if b is None:
                        raise LoraError(f"merged_state_dict: adapter {n!r} has a bias on B (lora_bias) but {path} has "
                                        "no bias to merge it into")
                    b = b + d
        weights[f"{path}.weight"] = _from_matrix(layer, m.to(layer.base_layer.weight.dtype))
        if b is not None:
            weights[f"{path}.bias"] = b.to(bias.dtype)
    for path, wrapper in module_wrappers(model):
        wrappers[path] = wrapper
        if isinstance(wrapper, TokenLayer):
            w = wrapper.merged_weight(names)
            if w is not None:
                weights[f"{path}.weight"] = w
        else:
            weights.update({f"{path}.{p}": v for p, v in wrapper.merged_values(names).items()})
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


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Take every LoRA wrapper out, leaving the model with the state-dict keys it had before.

    merge=False: the base model as it was (merged adapters are unmerged first).
    merge=True: the active adapters merged into the weights, and their modules_to_save copies
    in place of the originals: a plain model that behaves like the adapted one.
    """
    state = state_of(model)
    if state is None:
        return model
    if merge:
        _merge_active(model)
    else:
        unmerge(model)
    for path, layer in [*lora_layers(model), *module_wrappers(model)]:
        replace_module(model, path, layer.base_layer)
    for path, mod in saved_modules(model):
        replace_module(model, path, mod.current() if merge else mod.original_module)
    model.__dict__.pop("_lorakit_state", None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
