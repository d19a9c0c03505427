"""DoRA (weight-decomposed LoRA, Liu et al. 2024), as a variant object (lorakit.variants).

DoRA writes the adapted weight as a learned per-output-row magnitude m times a direction:
    W' = m * (W + dW) / ||W + dW||_row,   dW = s * B @ A (core.delta)
so, with g = m / ||W + dW||_row (a constant for the backward pass, as in the paper and PEFT),
    W' x = W x + (g - 1) * W x + g * dW x.
The layer adds the last two terms to its base output: (g - 1) * (base(x) - bias) + g * s*B(A(x)),
with s*B(A(x)) from the layer's lora_out, so nothing here multiplies A and B itself. Rows are
the rows of the kind's (out x in) matrix view, so linear, GPT-2 Conv1D, embedding and conv layers
share this code (PEFT has one DoRA class per layer type).

PEFT compatibility: the magnitude is saved under `<module>.lora_magnitude_vector` with PEFT's
shape ((out,), or (1, out, 1, ...) for convolutions); like PEFT, with several active adapters a
DoRA adapter rescales the output accumulated so far (the order of `set_adapter` matters), and its
norm always uses the unmerged base weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import LoraError

if TYPE_CHECKING:  # pragma: no cover
    from .kinds import Kind

KEY = "lora_magnitude_vector"


def _row_norm(W: Tensor, dW: Tensor) -> Tensor:
    """||W + dW|| per output row, float32 (out,)."""
    return torch.linalg.vector_norm(W.float() + dW, dim=1)


def _along(v: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    """Shape a per-output-channel vector to broadcast against `like` at `channel_dim`."""
    if channel_dim == -1:
        return v
    shape = [1] * like.dim()
    shape[channel_dim] = -1
    return v.view(shape)


class DoRA:
    """The DoRA variant (see the module docstring). Its state on a layer: `layer.lora_magnitude_vector`
    (adapter -> (out,) magnitudes, trainable, created with the first DoRA adapter) and
    `layer.dora_norms` (adapter -> row norms recorded at merge time, for unmerge)."""

    name = "dora"
    batchable = False  # the magnitude rescales the base output per adapter: no shared slots
    fusable = False
    file_keys = (KEY,)

    @torch.no_grad()
    def add(self, layer: Any, name: str) -> None:
        """m = ||W + dW||_row, so the adapted layer starts equal to plain LoRA with the same A, B."""
        if getattr(layer, KEY, None) is None:
            layer.lora_magnitude_vector = nn.ParameterDict()
            layer.dora_norms = {}
        A = layer.lora_A[name]
        W = layer.kind.matrix(layer.base_layer)
        layer.lora_magnitude_vector[name] = nn.Parameter(_row_norm(W, layer.delta(name)).to(A.dtype))

    def remove(self, layer: Any, name: str) -> None:
        if getattr(layer, KEY, None) is not None and name in layer.lora_magnitude_vector:
            del layer.lora_magnitude_vector[name]
            layer.dora_norms.pop(name, None)

    def parameters(self, layer: Any, name: str) -> list[nn.Parameter]:
        return [layer.lora_magnitude_vector[name]]

    def forward(self, layer: Any, x: Tensor, y: Tensor, name: str) -> Tensor:
        return y + self.delta_out(layer, x, name, y).to(y.dtype)

    def delta_out(self, layer: Any, x: Tensor, name: str, y: Tensor | None = None) -> Tensor:
        """What DoRA adds to the layer's output: (g - 1) * base_nobias + g * s*B(A(dropout(x))).

        `y`: the layer's output so far (base plus earlier adapters, PEFT's `result`). Without it
        (per-row batches) or under active dropout in training (as PEFT), the base term is
        recomputed as the kind's projection of x onto W.
        """
        A = layer.lora_A[name]
        base, kind = layer.base_layer, layer.kind
        W = kind.matrix(base)
        with torch.no_grad():
            norm = _row_norm(W, layer.delta(name)).to(A.dtype)
        g = layer.lora_magnitude_vector[name] / norm
        drop = layer.lora_dropout[name]
        if layer.training and not isinstance(drop, nn.Identity):
            x = drop(x)
            y = None
        xin = x.to(A.dtype) if x.is_floating_point() else x
        if y is None:
            base_out = kind.apply_a(base, xin, W.to(A.dtype))
        else:
            base_out = y.to(A.dtype)
            bias = getattr(base, "bias", None)
            if bias is not None:
                base_out = base_out - _along(bias.to(A.dtype), base_out, kind.channel_dim)
        lora = layer.lora_out(xin, name)
        g = _along(g, lora, kind.channel_dim)
        return (g - 1) * base_out + g * lora

    # ---- merge / unmerge ----------------------------------------------------------------------
    def merge(self, layer: Any, name: str, m: Tensor, record: bool = True) -> Tensor:
        """g * (m + dW) with g = magnitude / ||base + dW||_row (PEFT's DoRA merge), where base is
        the weight with every merged adapter taken out again; `record`: keep the norm for unmerge."""
        dW = layer.delta(name)
        norm = _row_norm(layer.unmerged_matrix(), dW)
        if record:
            layer.dora_norms[name] = norm
        g = layer.lora_magnitude_vector[name].detach().float() / norm
        return g[:, None] * (m + dW)

    def undo(self, layer: Any, name: str, m: Tensor) -> Tensor:
        g = layer.lora_magnitude_vector[name].detach().float() / layer.dora_norms[name]
        if (g == 0).any():
            raise LoraError(f"DoRA adapter {name!r} has a zero magnitude entry: its merge cannot be undone")
        return m / g[:, None] - layer.delta(name)

    def unmerge(self, layer: Any, name: str, m: Tensor) -> Tensor:
        out = self.undo(layer, name, m)
        self.forget_merge(layer, name)
        return out

    def forget_merge(self, layer: Any, name: str) -> None:
        layer.dora_norms.pop(name, None)

    # ---- files --------------------------------------------------------------------------------
    def file_tensors(self, layer: Any, name: str) -> dict[str, Tensor]:
        mag = layer.lora_magnitude_vector[name].detach()
        return {KEY: mag.reshape(file_shape(layer.kind, layer.base_layer))}

    def check_file(self, kind: "Kind", base: nn.Module, suffix: str, t: Tensor) -> str | None:
        want = file_shape(kind, base)
        return None if tuple(t.shape) == want else f"has shape {tuple(t.shape)}, but the layer needs {want}"

    @torch.no_grad()
    def load(self, layer: Any, name: str, tensors: dict[str, Tensor]) -> None:
        layer.lora_magnitude_vector[name].copy_(tensors[KEY].reshape(-1))


def file_shape(kind: "Kind", base: nn.Module) -> tuple[int, ...]:
    """PEFT's shape for the saved magnitude: (out,), or (1, out, 1, ...) for convolutions."""
    out = kind.dims(base)[1]
    if kind.channel_dim == -1:
        return (out,)
    return (1, out) + (1,) * (base.weight.dim() - 2)


DORA = DoRA()
