"""Initialisations that start the adapter from the base weight itself: PiSSA and OLoRA.

Both split the frozen weight W (the kind's out x in view) into W = W_res + s * B0 @ A0, put the
principal part in the adapter (B0, A0) and leave the residual W_res in the base layer, so the
adapted model starts exactly equal to the original one but trains the most important directions.

    init="pissa"            A0 = sqrt(S_r / s) Vh_r, B0 = U_r sqrt(S_r / s)   (exact SVD, PEFT's rule)
    init="pissa_niter_N"    the same from torch.svd_lowrank(W, r, niter=N): fast, but randomized
    init="olora"            B0 = Q[:, :r], A0 = R[:r] of W = QR (PEFT's OLoRA)

These CHANGE THE BASE WEIGHTS. The adapter files hold the trained A and B and the config keeps
`init_lora_weights` (what PEFT saves). Loading such an adapter (here or in PEFT) into the
*original* base model recomputes the same split from the original weight and subtracts it again,
so the result reloads. Consequences, as in PEFT: load it only into an unmodified base model, not
next to other adapters that expect the original weights; `pissa_niter_N` uses a randomized SVD,
so its residual is only reproduced approximately on reload (prefer "pissa" for files you share).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import core
from .config import svd_iterations
from .errors import LoraError

if TYPE_CHECKING:  # pragma: no cover
    from .layer import LoraLayer

@torch.no_grad()
def init_from_base(layer: "LoraLayer", name: str, method: str, path: str = "") -> None:
    """Set A, B of adapter `name` from the base weight and subtract s * B @ A from that weight."""
    kind = layer.kind
    if kind.channel_dim != -1 or not kind.linear_like:
        raise LoraError(
            f"LoraConfig.init={method!r}: applies to linear layers only, but {path or 'a target'} is a "
            f"{kind.name} layer; leave it out of targets or use init=True"
        )
    W = kind.matrix(layer.base_layer)
    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise LoraError(f"LoraConfig.init={method!r}: needs a float weight, {path} has {W.dtype}")
    Wf = W.float()
    r, s = layer.rank(name), layer.scaling[name]
    if method == "olora":
        Q, R = torch.linalg.qr(Wf)
        B, A = Q[:, :r], R[:r]
    else:
        niter = svd_iterations(method)
        if niter is None:
            U, S, Vh = torch.linalg.svd(Wf, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:
            U, S, V = torch.svd_lowrank(Wf, r, niter=niter)
            Vh = V.t()
        S = S / s
        A = torch.diag(torch.sqrt(S)) @ Vh
        B = U @ torch.diag(torch.sqrt(S))
    if A.shape[0] != r:
        raise LoraError(f"LoraConfig.init={method!r}: rank {r} exceeds min{tuple(W.shape)} of {path}")
    layer.lora_A[name].copy_(A)
    layer.lora_B[name].copy_(B)
    residual = Wf - core.delta(layer.lora_A[name], layer.lora_B[name], s)
    kind.store(layer.base_layer, residual.to(W.dtype))
