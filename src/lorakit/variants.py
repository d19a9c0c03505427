"""Variants: how one adapter of a layer computes, merges, batches and saves. One object each.

A LoraLayer holds, per adapter, the variant object that adapter was created with
(`layer.variants[name]`) and asks it for everything that differs between variants. Plain LoRA is
a variant like the others, so the layer code has no special cases; adding a variant is one module
(its class, as lorakit.dora) and one entry in the table below, plus the config field that selects
it. PEFT's `LoraVariant` (src/peft/tuners/lora/variants.py) is the model.

The interface (duck-typed; `Lora` is the reference implementation):

    name                          the table key, as `variant_for(config)` returns it
    batchable                     rows of a mixed batch can use it through stacked slots
    fusable                       a no-grad forward may merge it into W on the fly
    file_keys                     key suffixes of its extra per-layer tensors in PEFT files
    add(layer, name) / remove     its extra per-adapter state (after A and B exist / on delete)
    parameters(layer, name)       its extra trainable tensors
    forward(layer, x, y, name)    y plus the adapter's contribution (y: the output so far)
    delta_out(layer, x, name, y)  that contribution alone (the per-row reference loop)
    merge(layer, name, m, record) m (float32 out x in) with the adapter merged in; record: keep
                                  what unmerge needs (False for a pure merged state dict)
    unmerge(layer, name, m)       the inverse, with what merge recorded
    undo(layer, name, m)          unmerge without consuming the record (DoRA's norms)
    forget_merge(layer, name)     drop the record (the weight was restored from a kept copy)
    file_tensors(layer, name)     {suffix: tensor} to save, in PEFT's shapes
    check_file(kind, base, suffix, t)   why a file tensor does not fit, or None
    load(layer, name, tensors)    take the file's extra tensors (after add)
    bias_delta(layer, name)       what merging adds to the base layer's bias (float32, out), or None
                                  (optional: a variant without it leaves the bias alone)

The table: "lora" (plain), "dora" (lorakit.dora), "lora_bias" (PEFT's lora_bias: a bias on B), and
"target_parameters" / "trainable_token_indices": plain LoRA on the module layers of an adapter that
also adapts parameters (lorakit.params) or embedding rows (lorakit.tokens). Those parts live in
their own wrappers, which stacked slots cannot hold, so such adapters are not `batchable`: the
adapter bank refuses them and per_row runs their module layers by the reference loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import core
from .dora import DORA
from .errors import LoraError

if TYPE_CHECKING:  # pragma: no cover
    from .config import LoraConfig
    from .kinds import Kind


class Lora:
    """Plain LoRA: y + s * B(A(dropout(x))). Linear-like kinds ("matmul") run it as one fused
    autograd node (core.lora_linear); others through core.lora_out with the kind's projection."""

    name = "lora"
    batchable = True
    fusable = True
    file_keys: tuple[str, ...] = ()

    def add(self, layer: Any, name: str) -> None:
        pass

    def remove(self, layer: Any, name: str) -> None:
        pass

    def parameters(self, layer: Any, name: str) -> list[nn.Parameter]:
        return []

    def forward(self, layer: Any, x: Tensor, y: Tensor, name: str) -> Tensor:
        if layer.kind.meets == "matmul":
            drop = layer.lora_dropout[name]
            p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
            A = layer.lora_A[name]
            return core.lora_linear(y, x, A, layer.lora_B[name], layer.scaling[name], p, inplace=layer.owns_output(),
                                    cdt=core.compute_dtype(x, A, layer.state.compute_dtype))
        return y + self.delta_out(layer, x, name, y).to(y.dtype)

    def delta_out(self, layer: Any, x: Tensor, name: str, y: Tensor | None = None) -> Tensor:
        return layer.lora_out(layer.lora_dropout[name](x), name)

    def merge(self, layer: Any, name: str, m: Tensor, record: bool = True) -> Tensor:
        return m + layer.delta(name)

    def unmerge(self, layer: Any, name: str, m: Tensor) -> Tensor:
        return m - layer.delta(name)

    undo = unmerge

    def forget_merge(self, layer: Any, name: str) -> None:
        pass

    def file_tensors(self, layer: Any, name: str) -> dict[str, Tensor]:
        return {}

    def check_file(self, kind: "Kind", base: nn.Module, suffix: str, t: Tensor) -> str | None:
        return f"{suffix} does not belong to a plain LoRA adapter"

    def load(self, layer: Any, name: str, tensors: dict[str, Tensor]) -> None:
        pass

    def bias_delta(self, layer: Any, name: str) -> Tensor | None:
        return None


BIAS_KEY = "lora_B.bias"


def _along(v: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    """A per-output-channel vector shaped to broadcast against `like` at `channel_dim`."""
    if channel_dim == -1:
        return v
    shape = [1] * like.dim()
    shape[channel_dim] = -1
    return v.view(shape)


class LoraBias(Lora):
    """PEFT's lora_bias: B carries a bias b (out,), so the layer computes y + s * (B(A(x)) + b);
    the bias is scaled too, as in PEFT (lora_B is an nn.Linear with bias, times the scaling).

    Why a variant of its own rather than an option of plain LoRA: everything a variant decides
    differs (an extra trainable tensor and file key, the forward, what a merge writes: s*b into the
    base bias) and PEFT refuses it with DoRA, so it never combines with another variant; a separate
    object keeps plain LoRA's fused and batched paths free of a bias branch. Its state on a layer:
    `layer.lora_B_bias` (adapter -> (out,) parameter). Merging adds s*b to the base bias (a base
    without a bias is refused at merge time, as PEFT does); the bank's slots hold A and B only, so
    it is not batchable (per_row runs it by the reference loop, which includes the bias)."""

    name = "lora_bias"
    batchable = False
    fusable = False  # merging on the fly forms W + dW only
    file_keys = (BIAS_KEY,)

    def add(self, layer: Any, name: str) -> None:
        if layer.kind.meets == "lookup":
            raise LoraError(f"lora_bias=True on a {layer.kind.name} layer: PEFT supports a bias on B for linear and "
                            "convolution layers only; leave embeddings out of target_modules")
        if getattr(layer, "lora_B_bias", None) is None:
            layer.lora_B_bias = nn.ParameterDict()
        B = layer.lora_B[name]
        layer.lora_B_bias[name] = nn.Parameter(B.new_zeros(B.shape[0]))  # zeros: the adapter starts as the base

    def remove(self, layer: Any, name: str) -> None:
        if getattr(layer, "lora_B_bias", None) is not None and name in layer.lora_B_bias:
            del layer.lora_B_bias[name]

    def parameters(self, layer: Any, name: str) -> list[nn.Parameter]:
        return [layer.lora_B_bias[name]]

    def _bias(self, layer: Any, name: str, like: Tensor) -> Tensor:
        b = layer.lora_B_bias[name] * layer.scaling[name]
        return _along(b, like, layer.kind.channel_dim)

    def forward(self, layer: Any, x: Tensor, y: Tensor, name: str) -> Tensor:
        y = super().forward(layer, x, y, name)
        return y + self._bias(layer, name, y).to(y.dtype)

    def delta_out(self, layer: Any, x: Tensor, name: str, y: Tensor | None = None) -> Tensor:
        out = super().delta_out(layer, x, name, y)
        return out + self._bias(layer, name, out).to(out.dtype)

    def bias_delta(self, layer: Any, name: str) -> Tensor:
        return layer.lora_B_bias[name].detach().float() * layer.scaling[name]

    def file_tensors(self, layer: Any, name: str) -> dict[str, Tensor]:
        return {BIAS_KEY: layer.lora_B_bias[name].detach()}

    def check_file(self, kind: "Kind", base: nn.Module, suffix: str, t: Tensor) -> str | None:
        if kind.meets == "lookup":
            return f"is a bias on B of a {kind.name} layer, which PEFT does not support"
        want = (kind.dims(base)[1],)
        return None if tuple(t.shape) == want else f"has shape {tuple(t.shape)}, but the layer needs {want}"

    @torch.no_grad()
    def load(self, layer: Any, name: str, tensors: dict[str, Tensor]) -> None:
        layer.lora_B_bias[name].copy_(tensors[BIAS_KEY].reshape(-1))


class Solo(Lora):
    """Plain LoRA on the module layers of an adapter whose other parts (LoRA on parameters,
    trainable token rows) live in wrappers that stacked slots cannot hold: the same math, but not
    batchable, so the adapter bank refuses the adapter instead of serving part of it."""

    batchable = False

    def __init__(self, name: str):
        self.name = name


LORA = Lora()
LORA_BIAS = LoraBias()
VARIANTS = {v.name: v for v in (LORA, DORA, LORA_BIAS, Solo("target_parameters"), Solo("trainable_token_indices"))}


def variant_for(config: "LoraConfig") -> Any:
    """The variant of a config's module layers: DoRA (use_dora), a bias on B (lora_bias), plain
    LoRA not batchable (the adapter also has target_parameters or trainable_token_indices: see the
    module docstring), or plain LoRA."""
    if config.use_dora:
        return DORA
    if config.lora_bias:
        return LORA_BIAS
    for feature in ("target_parameters", "trainable_token_indices"):
        if getattr(config, feature):
            return VARIANTS[feature]
    return LORA


def extra_keys() -> dict[str, Any]:
    """Key suffix -> the variant whose files carry it (for reading files)."""
    return {k: v for v in VARIANTS.values() for k in v.file_keys}
