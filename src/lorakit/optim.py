"""LoRA+ (Hayou et al. 2024): train B with a learning rate `ratio` times A's.

With B = 0 at the start, A's gradient is zero until B moves; a larger step for B (ratio ~ 16)
lets both factors learn at their natural speed and converges faster at no cost. The groups follow
PEFT's `create_loraplus_optimizer` for A and B; other trainable tensors of the adapter (DoRA
magnitudes, biases, modules_to_save copies) keep the base rate and no weight decay is put on
1-d tensors. Embedding adapters can get their own rate (PEFT defaults to 1e-6 there).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .errors import LoraError
from .inject import adapter_parameters
from .layer import lora_layers


def lora_plus_groups(model: nn.Module, adapter: str | None = None, *, lr: float, ratio: float = 16.0,
                     weight_decay: float = 0.0, embedding_lr: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups for `adapter`'s parameters (every adapter's if None)."""
    for name, v in (("lr", lr), ("ratio", ratio), ("weight_decay", weight_decay)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise LoraError(f"lora_plus: {name}={v!r} must be a finite number >= 0")
    if ratio <= 0:
        raise LoraError(f"lora_plus: ratio={ratio!r} must be > 0 (LoRA+ uses about 16)")
    params = adapter_parameters(model, adapter)
    wanted = {id(p) for p in params}
    a, b, emb = [], [], []
    for _, layer in lora_layers(model):
        is_emb = embedding_lr is not None and layer.kind.meets == "lookup"
        for d, bucket in ((layer.lora_A, a), (layer.lora_B, b)):
            for p in d.values():
                if id(p) in wanted:
                    (emb if is_emb else bucket).append(p)
    placed = {id(p) for p in a + b + emb}
    rest = [p for p in params if id(p) not in placed]
    decay = [p for p in rest if p.dim() > 1]
    no_decay = [p for p in rest if p.dim() <= 1]
    groups = [
        {"params": a, "lr": lr, "weight_decay": weight_decay},
        {"params": b, "lr": lr * ratio, "weight_decay": weight_decay},
        {"params": emb, "lr": embedding_lr, "weight_decay": weight_decay},
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def lora_plus_optimizer(model: nn.Module, adapter: str | None = None, *, lr: float, ratio: float = 16.0,
                        weight_decay: float = 0.0, embedding_lr: float | None = None,
                        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                        **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer (AdamW by default) whose B matrices step `ratio` times faster than A."""
    groups = lora_plus_groups(model, adapter, lr=lr, ratio=ratio, weight_decay=weight_decay,
                              embedding_lr=embedding_lr)
    return optimizer_cls(groups, lr=lr, **kwargs)
