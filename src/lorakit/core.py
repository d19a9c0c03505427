"""The LoRA math, once.

For a frozen weight W viewed as an (out x in) matrix, an adapter is A: (r x in), B: (out x r) and
a scale s. The update is dW = s * B @ A and the adapted layer computes base(x) + s * B(A(x)).
Everything else in lorakit (layer kinds, merging, batching, variants) calls these functions
instead of multiplying A and B itself.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """s = alpha / r (LoRA), or alpha / sqrt(r) (rsLoRA: keeps the update's scale stable as r grows)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


@torch.no_grad()
def init_ab(A: Tensor, B: Tensor, method: bool | str | None = True, zero_a: bool = False) -> None:
    """Initialise in place so the adapted model starts equal to the base (B = 0).

    method True/"default": A ~ kaiming-uniform(a=sqrt(5)) as nn.Linear and PEFT do;
    "gaussian": A ~ N(0, 1/r); False: A and B random (non-zero delta; for tests and debugging);
    None: untouched (the caller is about to copy weights in). zero_a (embeddings, as PEFT): the
    zero goes to A and B ~ N(0, 1) instead, for the default and gaussian methods.
    """
    if method is None:  # the caller fills A and B (loading from a file)
        return
    if zero_a and method in (True, "default", "gaussian"):
        A.zero_()
        torch.nn.init.normal_(B)
    elif method is True or method == "default":
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
    Computed in the adapter's dtype (float32 adapters on a bf16 base stay accurate), autocast or not
    (under autocast _Up's backward would otherwise meet the dtypes its forward did not use).
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return lora_out(x, A, B, s, project, channel_dim)
    if x.is_floating_point():
        x = x.to(A.dtype)
    h = project(x, A) * s
    if channel_dim == -1:
        return _Up.apply(h, B)
    return _Up.apply(h.movedim(channel_dim, -1), B).movedim(-1, channel_dim)


class _Up(torch.autograd.Function):
    """F.linear(h, B) for an r-wide h: the same forward, a backward that computes B's gradient as
    an r-row product (h^T g, r x out), as _LoraLinear does (autograd's g^T h, out x r, is slower)."""

    @staticmethod
    def forward(ctx, h: Tensor, B: Tensor) -> Tensor:
        ctx.save_for_backward(h, B)
        return F.linear(h, B)

    @staticmethod
    def backward(ctx, g: Tensor):
        h, B = ctx.saved_tensors
        g2, h2 = g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1])
        dh = (g2 @ B).reshape(h.shape) if ctx.needs_input_grad[0] else None
        dB = (h2.t() @ g2).t() if ctx.needs_input_grad[1] else None
        return dh, dB


_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def keep_bits(x: Tensor, p: float) -> Tensor:
    """A dropout mask for x as int8: -1 (every bit set) where an element is kept, with probability
    1-p, 0 where it is dropped. Each 63-bit draw of torch's global RNG gives four 15-bit uniforms
    (p resolved to 1/32768; seeded runs repeat): torch's own kernel draws one number per element.
    Why bits: `apply_bits` then drops with one AND over x's bits (0.08 ms for a 512 x 768 bf16
    input against 0.58 ms for a masked multiply; the 1/(1-p) goes into the adapter's scale).
    Under torch.compile the same draw runs as one opaque op (Dynamo has no Tensor.random_, and
    inductor's own per-element RNG measured 5x slower on the CPU)."""
    if torch.compiler.is_compiling():
        return torch.ops.lorakit.keep_bits(x, p)
    return _draw_bits(x, p)


def _draw_bits(x: Tensor, p: float) -> Tensor:
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    lanes = words.view(torch.int16)[:n].view(x.shape)
    thr = round((1.0 - p) * 32768)  # kept: lane < thr, i.e. lane - thr < 0, whose sign bit >> 15 is -1
    return torch.bitwise_and(lanes, 0x7FFF).add_(-thr).bitwise_right_shift_(15).to(torch.int8)


# a random op: the tag keeps compilers from merging two draws or recomputing one in backward
_keep_bits_op = torch.library.custom_op("lorakit::keep_bits", _draw_bits, mutates_args=(),
                                        tags=(torch.Tag.nondeterministic_seeded,))


@_keep_bits_op.register_fake
def _(x: Tensor, p: float) -> Tensor:
    return torch.empty(x.shape, dtype=torch.int8, device=x.device)


def apply_bits(x: Tensor, bits: Tensor) -> Tensor:
    """x with the elements `bits` drops set to 0 (not scaled): x's bits AND the sign-extended mask."""
    ints = _INT_OF_WIDTH[x.element_size()]
    return torch.bitwise_and(x.view(ints), bits).view(x.dtype)


def dropout(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(x with elements zeroed with probability p and the rest scaled by 1/(1-p), the bool keep
    mask): F.dropout's result from `keep_bits` (what the fused linear path draws)."""
    bits = keep_bits(x, p)
    return apply_bits(x, bits) * (1.0 / (1.0 - p)), bits != 0


def _lora_linear_forward(y: Tensor, x: Tensor, A: Tensor, B: Tensor, s: Any, p: float, inplace: bool,
                         cdt: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """The forward of _LoraLinear in compute dtype `cdt`: (output, s * x A^T as (N, r), dropout
    mask, whether y was updated in place). With p > 0, s already holds dropout's 1/(1-p)."""
    x2 = x.reshape(-1, x.shape[-1]).to(cdt)
    Ac, Bc = A.to(cdt), B.to(cdt)  # r x in and out x r: the casts a low-precision base costs, not N x in
    mask = None
    if p:  # s * dropout(x) = s/(1-p) * (x with the dropped elements zeroed): the caller scaled s
        mask = keep_bits(x2, p)
        x2 = apply_bits(x2, mask)
    h = (x2 @ Ac.t()).mul_(s)  # (N, r)
    # in place only on a plain tensor: not a leaf autograd tracks, not a view (a view made by a
    # custom Function, as bitsandbytes' outputs are, must not be modified in place)
    plain = inplace and y.is_contiguous() and y._base is None and not (y.is_leaf and y.requires_grad)
    y2 = y.view(-1, y.shape[-1]) if plain else None
    if y2 is not None and y2.dtype == cdt:
        y2.addmm_(h, Bc.t())  # in place: the base output is not needed by its own backward
        return y, h, mask, True
    if y.dtype == cdt:
        return torch.addmm(y.reshape(-1, y.shape[-1]), h, Bc.t()).view(y.shape), h, mask, False
    # a base output in another dtype than the compute one: add once, in the base's dtype
    return y + (h @ Bc.t()).to(y.dtype).view(y.shape), h, mask, False


class _LoraLinear(torch.autograd.Function):
    """y + s * dropout_p(x) @ A.T @ B.T for linear-like layers, as one autograd node.

    Why: the scale multiplies the r-wide h (not the out-wide output), the add is fused into the
    second matmul (addmm, in place of y when autograd allows), and with dropout only the 1-byte
    keep-mask is kept for backward, where dropout(x) is recomputed, instead of dropout(x) itself
    (4 bytes per input element per adapted layer, what a stock nn.Dropout + nn.Linear chain keeps).
    B's gradient is computed as h^T g (r x out, r rows), not g^T h (out x r): BLAS runs a matmul
    with 8-16 output columns slower than one with 8-16 rows (1.2-1.5x in torch 2.13, 4-9x in
    older builds). h = x A^T and its gradient g B stay N x r: in torch 2.13 they measured 1.4-2x
    faster than the transposed r x N forms, in float32 and bf16 (so did the whole node, by 1-9%).

    Precision: the four matmuls run in `cdt`, the compute dtype (lora_linear picks it: a bf16 base
    runs them in bf16, which accumulates in float32), with A and B cast to it (r x in, out x r: the
    inputs are never copied to float32); their gradients come back in A's and B's own dtype, the
    float32 master weights an optimizer steps.
    Shapes: x (..., in), y (..., out), A (r, in), B (out, r).
    """

    @staticmethod
    def forward(ctx, y: Tensor, x: Tensor, A: Tensor, B: Tensor, s: Any, p: float, inplace: bool,
                cdt: torch.dtype) -> Tensor:
        if p:
            s = s * (1.0 / (1.0 - p))  # dropout's 1/(1-p) (the mask only zeroes)
        out, h, mask, dirty = _lora_linear_forward(y, x, A, B, s, p, inplace, cdt)
        if dirty:
            ctx.mark_dirty(y)
        ctx.save_for_backward(x, A, B, h, mask)
        ctx.s, ctx.p, ctx.cdt = s, p, cdt
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, A, B, h, mask = ctx.saved_tensors
        s, p, cdt = ctx.s, ctx.p, ctx.cdt
        g2 = g.reshape(-1, g.shape[-1]).to(cdt)
        dB = (h.t() @ g2).t().to(B.dtype) if ctx.needs_input_grad[3] else None  # r x out, read transposed
        dA = dx = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dh = (g2 @ B.to(cdt)).mul_(s)  # (N, r)
            if ctx.needs_input_grad[2]:
                x2 = x.reshape(-1, x.shape[-1]).to(cdt)
                if p:  # the dropped x again, from the mask (one AND; s holds the 1/(1-p))
                    x2 = apply_bits(x2, mask)
                dA = (dh.t() @ x2).to(A.dtype)
            if ctx.needs_input_grad[1]:
                dx2 = dh @ A.to(cdt)
                if p:
                    dx2 = apply_bits(dx2, mask)
                dx = dx2.view(x.shape).to(x.dtype)
        return g, dx, dA, dB, None, None, None, None


def linear_merged(x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, s: float) -> Tensor:
    """x @ (W + s * B @ A).T + bias: the adapted layer with dW merged on the fly (inference).

    Why: forming dW costs out*in*r multiply-adds once, the separate path N*r*(in+out) plus a
    second pass over x and y; with many tokens (N > in*out/(in+out)) merging is the cheaper one.
    W: (out, in) as the weight's matrix view; float32/64 only (a half-precision W + dW would round
    most of a small dW away)."""
    return F.linear(x, torch.addmm(W, B.to(W.dtype), A.to(W.dtype), alpha=s), bias)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(x: Tensor, A: Tensor, choice: Any = "auto") -> torch.dtype:
    """The dtype an adapter's matmuls run in. "auto": the input's when it is bf16/fp16 (a low-
    precision base: its own speed, float32 accumulation inside the matmul), else the adapter's;
    a torch.dtype: that one (float32 reproduces the all-float32 path on a bf16 base)."""
    if choice == "auto":
        return x.dtype if x.dtype in LOW_PRECISION and A.dtype not in LOW_PRECISION else A.dtype
    return choice


def lora_linear(y: Tensor, x: Tensor, A: Tensor, B: Tensor, s: Any, p: float = 0.0, inplace: bool = False,
                cdt: torch.dtype | None = None) -> Tensor:
    """y + s * B(A(dropout_p(x))) for layers whose input meets A by a plain matmul.

    The same function as `y + lora_out(dropout(x), A, B, s)`, cheaper in time and memory (see
    _LoraLinear). p > 0 draws a dropout mask from torch's global RNG (pass p=0 in eval mode).
    inplace: y may be updated in place and returned (a layer's fresh output that no other
    autograd node needs, as a Linear's is). cdt: the compute dtype (default: compute_dtype(x, A)).

    Without gradients to compute (no_grad / inference, or nothing requires grad) the same forward
    runs outside the autograd node: nothing is saved, and torch.compile traces it in one graph (an
    autograd.Function that marks its input dirty breaks Dynamo's graph when grad is off)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):  # autocast: its dtype, cast here once (the node runs outside it,
        cdt = torch.get_autocast_dtype(device)  # so its backward sees the dtypes its forward used)
        with torch.autocast(device, enabled=False):
            return lora_linear(y, x, A, B, s, p, inplace, cdt)
    cdt = cdt or compute_dtype(x, A)
    if torch.is_grad_enabled() and (y.requires_grad or x.requires_grad or A.requires_grad or B.requires_grad):
        return _LoraLinear.apply(y, x, A, B, s, p, inplace, cdt)
    return _lora_linear_forward(y, x, A, B, s * (1.0 / (1.0 - p)) if p else s, p, inplace, cdt)[0]
