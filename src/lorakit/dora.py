"""DoRA (weight-decomposed LoRA, Liu et al. 2024) as a hook on the core LoRA path.

DoRA writes the adapted weight as a learned per-output-row magnitude m times a direction:
    W' = m * (W + dW) / ||W + dW||_row,   dW = s * B @ A (core.delta)
so, with g = m / ||W + dW||_row (a constant for the backward pass, as in the paper and PEFT),
    W' x = W x + (g - 1) * W x + g * dW x.
The layer adds the last two terms to its base output: (g - 1) * (base(x) - bias) + g * s*B(A(x)),
with s*B(A(x)) from core.lora_out, so nothing here multiplies A and B except core.delta. Rows are
the rows of the kind's (out x in) matrix view, so linear, GPT-2 Conv1D, embedding and conv layers
share this code (PEFT has one DoRA class per layer type).

PEFT compatibility: the magnitude is saved under `<module>.lora_magnitude_vector` with PEFT's
shape ((out,), or (1, out, 1, ...) for convolutions); like PEFT, with several active adapters a
DoRA adapter rescales the output accumulated so far (the order of `set_adapter` matters), and its
norm always uses the unmerged base weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import core
from .errors import LoraError

if TYPE_CHECKING:  # pragma: no cover
    from .kinds import Kind
    from .layer import LoraLayer

KEY = "lora_magnitude_vector"


def _row_norm(W: Tensor, dW: Tensor) -> Tensor:
    """||W + dW|| per output row, float32 (out,)."""
    return torch.linalg.vector_norm(W.float() + dW, dim=1)


def _delta(layer: "LoraLayer", name: str) -> Tensor:
    return core.delta(layer.lora_A[name].detach(), layer.lora_B[name].detach(), layer.scaling[name])


@torch.no_grad()
def init_magnitude(layer: "LoraLayer", name: str) -> None:
    """m = ||W + dW||_row, so the adapted layer starts equal to plain LoRA with the same A, B."""
    A = layer.lora_A[name]
    W = layer.kind.matrix(layer.base_layer)
    layer.lora_magnitude_vector[name] = nn.Parameter(_row_norm(W, _delta(layer, name)).to(A.dtype))


def _along(v: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    """Shape a per-output-channel vector to broadcast against `like` at `channel_dim`."""
    if channel_dim == -1:
        return v
    shape = [1] * like.dim()
    shape[channel_dim] = -1
    return v.view(shape)


def delta_out(layer: "LoraLayer", x: Tensor, name: str, y: Tensor | None = None) -> Tensor:
    """What DoRA adds to the layer's output: (g - 1) * base_nobias + g * s*B(A(dropout(x))).

    `y`: the layer's output so far (base plus earlier adapters, PEFT's `result`). Without it
    (per-row batches) or under active dropout in training (as PEFT), the base term is recomputed
    as the kind's projection of x onto W.
    """
    A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
    base, kind = layer.base_layer, layer.kind
    W = kind.matrix(base)
    with torch.no_grad():
        norm = _row_norm(W, _delta(layer, name)).to(A.dtype)
    g = layer.lora_magnitude_vector[name] / norm
    drop = layer.lora_dropout[name]
    if layer.training and not isinstance(drop, nn.Identity):
        x = drop(x)
        y = None
    xin = x.to(A.dtype) if x.is_floating_point() else x
    if y is None:
        base_out = kind.project(base, xin, W.to(A.dtype))
    else:
        base_out = y.to(A.dtype)
        bias = getattr(base, "bias", None)
        if bias is not None:
            base_out = base_out - _along(bias.to(A.dtype), base_out, kind.channel_dim)
    lora = core.lora_out(xin, A, B, s, project=lambda xx, aa: kind.project(base, xx, aa),
                         channel_dim=kind.channel_dim)
    g = _along(g, lora, kind.channel_dim)
    return (g - 1) * base_out + g * lora


# ---- merge / unmerge --------------------------------------------------------------------------
def base_matrix(layer: "LoraLayer") -> Tensor:
    """The weight with every merged adapter taken out again (float32 out x in): DoRA norms are
    always taken against it, as in PEFT, however many adapters are merged already."""
    from .merge import layer_delta

    m = layer.kind.matrix(layer.base_layer).float()
    for n in reversed(layer.merged):
        if n in layer.lora_magnitude_vector:
            m = _undo(layer, n, m, layer.dora_norms[n])
        else:
            m = m - layer_delta(layer, n)
    return m


def merge_matrix(layer: "LoraLayer", name: str, m: Tensor, base: Tensor) -> tuple[Tensor, Tensor]:
    """(g * (m + dW), norm) where g = magnitude / ||base + dW||_row: PEFT's DoRA merge."""
    dW = _delta(layer, name)
    norm = _row_norm(base, dW)
    g = layer.lora_magnitude_vector[name].detach().float() / norm
    return g[:, None] * (m + dW), norm


def _undo(layer: "LoraLayer", name: str, m: Tensor, norm: Tensor) -> Tensor:
    g = layer.lora_magnitude_vector[name].detach().float() / norm
    if (g == 0).any():
        raise LoraError(f"DoRA adapter {name!r} has a zero magnitude entry: its merge cannot be undone")
    return m / g[:, None] - _delta(layer, name)


def unmerge_matrix(layer: "LoraLayer", name: str, m: Tensor) -> Tensor:
    """Inverse of merge_matrix, with the norm recorded at merge time."""
    return _undo(layer, name, m, layer.dora_norms.pop(name))


# ---- files ------------------------------------------------------------------------------------
def file_shape(kind: "Kind", base: nn.Module) -> tuple[int, ...]:
    """PEFT's shape for the saved magnitude: (out,), or (1, out, 1, ...) for convolutions."""
    out = kind.dims(base)[1]
    if kind.channel_dim == -1:
        return (out,)
    return (1, out) + (1,) * (base.weight.dim() - 2)
