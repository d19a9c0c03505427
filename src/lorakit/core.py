"""The LoRA math, once.

For a frozen weight W viewed as an (out x in) matrix, an adapter is A: (r x in), B: (out x r) and
a scale s. The update is dW = s * B @ A and the adapted layer computes base(x) + s * B(A(x)).
Everything else in lorakit (layer kinds, merging, batching, variants) calls these functions
instead of multiplying A and B itself.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """s = alpha / r (LoRA), or alpha / sqrt(r) (rsLoRA: keeps the update's scale stable as r grows)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


@torch.no_grad()
def init_ab(A: Tensor, B: Tensor, method: bool | str = True) -> None:
    """Initialise in place so the adapted model starts equal to the base (B = 0).

    method True/"default": A ~ kaiming-uniform(a=sqrt(5)) as nn.Linear and PEFT do;
    "gaussian": A ~ N(0, 1/r); False: A and B random (non-zero delta; for tests and debugging);
    None: untouched (the caller is about to copy weights in).
    """
    if method is None:  # the caller fills A and B (loading from a file)
        return
    if method is True or method == "default":
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B.zero_()
    elif method == "gaussian":
        torch.nn.init.normal_(A, std=1.0 / A.shape[0])
        B.zero_()
    elif method is False:
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        torch.nn.init.normal_(B, std=0.02)
    else:
        raise ValueError(f"unknown init method {method!r}")


def delta(A: Tensor, B: Tensor, s: float) -> Tensor:
    """dW = s * B @ A as an (out x in) float32 matrix: the one place A and B meet for merging."""
    return (B.float() @ A.float()) * s


def lora_out(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    s: float,
    project: Callable[[Tensor, Tensor], Tensor] = F.linear,
    channel_dim: int = -1,
) -> Tensor:
    """s * B(A(x)) without ever forming dW.

    `project(x, A)` is how the input meets A for the layer kind (a matmul, an embedding lookup, a
    convolution); it yields r channels at `channel_dim`, which B (out x r) mixes into `out`.
    Computed in the adapter's dtype (float32 adapters on a bf16 base stay accurate).
    """
    if x.is_floating_point():
        x = x.to(A.dtype)
    h = project(x, A) * s
    if channel_dim == -1:
        return F.linear(h, B)
    return F.linear(h.movedim(channel_dim, -1), B).movedim(-1, channel_dim)
