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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from . import core
from .dora import DORA

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
            return core.lora_linear(y, x, layer.lora_A[name], layer.lora_B[name], layer.scaling[name], p,
                                    inplace=layer.owns_output())
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


LORA = Lora()
VARIANTS = {LORA.name: LORA, DORA.name: DORA}


def variant_for(config: "LoraConfig") -> Any:
    """The variant a config selects (PEFT: use_dora; plain LoRA otherwise)."""
    return VARIANTS["dora" if config.use_dora else "lora"]


def extra_keys() -> dict[str, Any]:
    """Key suffix -> the variant whose files carry it (for reading files)."""
    return {k: v for v in VARIANTS.values() for k in v.file_keys}
