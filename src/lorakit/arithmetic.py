"""Adapter arithmetic: combine weighted adapters into one new, ordinary adapter.

For each wrapped layer, adapter i contributes dW_i = s_i * B_i @ A_i (core.delta). Methods:

    linear     exact: A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], scaling 1, so
               B @ A = sum_i w_i dW_i with no cross terms (the rank is the sum of the ranks).
               PEFT's `linear` averages A's and B's separately, giving cross terms B_i @ A_j.
    svd        sum_i w_i dW_i truncated to `rank` by SVD; the relative error is reported.
    ties       TIES-merging (Yadav et al. 2023) of the dW_i: keep the top `density` fraction of
               each by magnitude, elect a sign per entry, average the agreeing weighted entries;
               then SVD to `rank`. Deterministic.
    dare       DARE (Yu et al. 2023): drop entries of each dW_i with probability 1 - density and
               rescale by 1/density, then the weighted sum; SVD to `rank`. Seeded, so repeatable.

The result is added to the model as adapter `new` (inactive, frozen) with a config that saves
and loads like any other (per-layer ranks go to rank_pattern, scaling 1 through alpha = r).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .errors import LoraError
from .inject import check_adapter_name
from .layer import LoraLayer, lora_layers, require_adapter, require_state
from .progress import progress_bar
from .variants import LORA, variant_for

METHODS = ("linear", "svd", "ties", "dare")


@dataclass(frozen=True)
class CombineReport:
    """What combine_adapters built and how far the compressed update is from the exact one."""

    adapter: str
    method: str
    ranks: dict[str, int]  # layer path -> rank of the new adapter there
    errors: dict[str, float] = field(default_factory=dict)  # path -> ||dW - dW_r||_F / ||dW||_F
    error: float = 0.0  # the same over all layers together

    def __str__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        return (f"{self.method}: adapter {self.adapter!r} on {len(self.ranks)} layers, rank "
                f"{ranks[0] if len(ranks) == 1 else ranks}, relative error {self.error:.3g}")


def _check(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], new: str, method: str,
           density: float) -> dict[str, LoraConfig]:
    state = require_state(model)
    if method not in METHODS:
        raise LoraError(f"combine_adapters: method={method!r}; choose one of {METHODS}")
    if isinstance(adapters, str) or not adapters:
        raise LoraError("combine_adapters: adapters must be a non-empty list of adapter names")
    if len(weights) != len(adapters):
        raise LoraError(f"combine_adapters: {len(adapters)} adapters but {len(weights)} weights")
    for w in weights:
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
            raise LoraError(f"combine_adapters: weight {w!r} is not a finite number")
    if not 0.0 < density <= 1.0:
        raise LoraError(f"combine_adapters: density={density!r} must be in (0, 1]")
    check_adapter_name(new)
    if new in state.configs:
        raise LoraError(f"combine_adapters: adapter {new!r} already exists; pick another name")
    configs = {}
    for a in adapters:
        require_adapter(state, a)
        cfg = state.configs[a]
        variant = variant_for(cfg)
        for what, bad in ((f"a {variant.name} variant", variant is not LORA),
                          (f"modules_to_save={cfg.modules_to_save!r}", cfg.modules_to_save),
                          (f"bias={cfg.bias!r}", cfg.bias != "none"),
                          (f"init={cfg.init!r}", isinstance(cfg.init, str) and cfg.init not in ("default", "gaussian"))):
            if bad:
                raise LoraError(
                    f"combine_adapters: adapter {a!r} has {what}; only plain LoRA updates (dW = s*B@A on an "
                    "unchanged base) can be combined"
                )
        configs[a] = cfg
    return configs


# ---- the dense methods (also used by tests against PEFT's merge_utils) --------------------------
def magnitude_prune(t: Tensor, density: float) -> Tensor:
    """Keep the int(density * numel) entries of largest magnitude (PEFT's magnitude_based_pruning)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * mask.view_as(t)


def ties(deltas: list[Tensor], weights: Sequence[float], density: float) -> Tensor:
    """TIES: trim, elect the sign by total mass, mean over the weighted entries that agree."""
    stacked = torch.stack([magnitude_prune(d, density) for d in deltas])
    sign = stacked.sign()
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = sign == majority
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, 1, 1)
    mixed = (stacked * w * agree).sum(0)
    return mixed / agree.sum(0).clamp(min=1)


def dare(deltas: list[Tensor], weights: Sequence[float], density: float, generator: torch.Generator) -> Tensor:
    """DARE: random drop (keep prob. density), rescale by 1/density, weighted sum."""
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        keep = torch.rand(d.shape, generator=generator, dtype=d.dtype, device="cpu").to(d.device) < density
        out = out + w * d * keep / density
    return out


def _svd(target: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """(A r x in, B out x r, relative error) of the best rank-r approximation B @ A of target."""
    U, S, Vh = torch.linalg.svd(target, full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    B, A = U[:, :r] * root, root[:, None] * Vh[:r]
    total = S.square().sum()
    err = (S[r:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return A, B, err


# ---- the public function ----------------------------------------------------------------------
@torch.no_grad()
def combine_adapters(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], new: str, *,
                     method: str = "linear", rank: int | None = None, density: float = 1.0,
                     seed: int = 0, progress: bool | None = None) -> CombineReport:
    """Add adapter `new` = the weighted combination of `adapters` (see the module docstring).

    rank: the target rank for svd/ties/dare (default: the largest input rank); linear is exact
    and uses the sum of the ranks. density: the kept fraction for ties/dare. seed: dare's drops.
    """
    configs = _check(model, adapters, weights, new, method, density)
    if method == "linear" and rank is not None:
        raise LoraError("combine_adapters: method='linear' is exact and its rank is the sum of the input "
                        "ranks; use method='svd' to choose a rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise LoraError(f"combine_adapters: rank={rank!r} must be a positive integer")
    state = require_state(model)
    gen = torch.Generator().manual_seed(seed)
    layers = [(p, l) for p, l in lora_layers(model) if any(a in l.lora_A for a in adapters)]
    built: dict[str, tuple[Tensor, Tensor]] = {}
    errors: dict[str, float] = {}
    num = den = 0.0
    for path, layer in progress_bar(layers, f"combine ({method})", progress):
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
        if method == "linear":
            A = torch.cat([layer.lora_A[a].float() for a, _ in present])
            B = torch.cat([layer.lora_B[a].float() * (w * layer.scaling[a]) for a, w in present], dim=1)
            built[path] = (A, B)
            continue
        deltas = [layer.delta(a) for a, _ in present]
        ws = [w for _, w in present]
        if method == "svd":
            target = sum(w * d for d, w in zip(deltas, ws))
        elif method == "ties":
            target = ties(deltas, ws, density)
        else:
            target = dare(deltas, ws, density, gen)
        r = rank or max(layer.rank(a) for a, _ in present)
        A, B, err = _svd(target, r)
        built[path] = (A, B)
        errors[path] = err
        sq = target.square().sum().item()
        num += err * err * sq
        den += sq
    _install(model, state, configs[adapters[0]], new, built, dict(layers))
    ranks = {p: A.shape[0] for p, (A, _) in built.items()}
    return CombineReport(new, method, ranks, errors, math.sqrt(num / den) if den > 0 else 0.0)


def _install(model: nn.Module, state, first: LoraConfig, new: str, built: dict[str, tuple[Tensor, Tensor]],
             layers: dict[str, LoraLayer]) -> None:
    """Add the factors as adapter `new` with scaling 1 (alpha = r), and record a config that saves."""
    ranks = [A.shape[0] for A, _ in built.values()]
    r0 = max(set(ranks), key=ranks.count)
    pattern = {re.escape(p): A.shape[0] for p, (A, _) in built.items() if A.shape[0] != r0}
    config = first.replace(
        r=r0, alpha=r0, rslora=False, targets=list(built), exclude=None, rank_pattern=pattern,
        alpha_pattern={k: float(v) for k, v in pattern.items()}, init=True, use_dora=False,
        layers_to_transform=None, layers_pattern=None, modules_to_save=None, bias="none",
        fan_in_fan_out=any(layers[p].kind.fan_in_fan_out for p in built), inference_mode=True,
    )
    for path, (A, B) in built.items():
        layer = layers[path]
        r = A.shape[0]
        layer.add(new, r, float(r), dropout=first.dropout)
        layer.lora_A[new].copy_(A)
        layer.lora_B[new].copy_(B)
        layer.lora_A[new].requires_grad_(False)
        layer.lora_B[new].requires_grad_(False)
    state.configs[new] = config
