"""Batched LoRA ops: one batch, a different adapter per row, no Python loop over rows.

Adapters are stacked in slots: A (S, r, in) and B (S, out, r), with each adapter's scaling already
folded into its B and smaller ranks padded with zeros (zero rows of A / columns of B add nothing).
`slots[b]` names row b's slot; -1 means the base model (no low-rank term). A row is a whole
sequence: its T tokens share its adapter.

How the work is laid out (a `RowPlan`, worked out once per batch on the host and reused by every
layer): the base matmul runs once for the whole batch (the caller does it); the low-rank part is a
grouped matmul over contiguous segments, one weight pair per segment, in one of two layouts:

  runs:   rows stay in place; the weights of each run of equal consecutive slots are gathered
          (cheap when there are few runs of many tokens: prefill).
  sorted: tokens are gathered in slot order and the bank's slots are used in place, without a copy
          (cheap when tokens are few and adapters many: decode); results are scattered back.

Each op below states its semantics in plain PyTorch and has a `*_ref` loop implementation; tests
check the fast path against the loops (and against per-adapter runs of real models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_GROUPED_MM = getattr(F, "grouped_mm", None)  # torch >= 2.8 (CPU: float32/bf16/fp16)
_NO_GROUPED: set[tuple] = set()  # (device type, dtype, k, n) where grouped_mm refused to run


# ---- grouped matmul ---------------------------------------------------------------------------
def grouped_matmul(a: Tensor, b: Tensor, ends: Tensor, ends_list: Sequence[int]) -> Tensor:
    """Segment-wise matmul (SGMV): rows [ends[g-1], ends[g]) of `a` times b[g].

    Semantics:
        out = torch.empty(a.shape[0], b.shape[-1])
        start = 0
        for g, end in enumerate(ends_list):
            out[start:end] = a[start:end] @ b[g]
            start = end
    a: (N, k); b: (G, k, n) (any strides); ends: int32 (G,) cumulative segment ends, ends[-1] == N.
    Uses torch's grouped_mm (one call, no Python loop) where it runs for this device and dtype,
    else one matmul per non-empty segment (a loop over adapters, never over rows).
    """
    key = (a.device.type, a.dtype, a.shape[1], b.shape[-1])
    if _GROUPED_MM is not None and key not in _NO_GROUPED:
        try:
            return _GROUPED_MM(a, b, offs=ends)
        except (RuntimeError, ValueError, TypeError):
            _NO_GROUPED.add(key)
    pieces, start = [], 0
    for g, end in enumerate(ends_list):
        if end > start:
            pieces.append(a[start:end] @ b[g])
        start = end
    if not pieces:
        return a.new_zeros(a.shape[0], b.shape[-1])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def grouped_matmul_ref(a: Tensor, b: Tensor, ends_list: Sequence[int]) -> Tensor:
    out = a.new_zeros(a.shape[0], b.shape[-1])
    start = 0
    for g, end in enumerate(ends_list):
        for i in range(start, end):
            out[i] = a[i] @ b[g]
        start = end
    return out


# ---- the per-batch plan -----------------------------------------------------------------------
@dataclass
class _TokenPlan:
    """Index tensors for one (tokens per row, device)."""

    run_slots: Tensor  # (n_runs,) slot of each run (base runs: 0, masked by run_base)
    run_base: Tensor | None  # (n_runs,) bool, True for base runs; None if there are none
    run_ends: Tensor  # int32 token ends of the runs
    run_ends_list: list[int]
    order: Tensor  # token indices of adapter rows, sorted by slot (stable)
    sorted_ends: Tensor  # int32 token ends of slots lo..hi in `order`
    sorted_ends_list: list[int]
    sorted_slot_ids: Tensor  # (n_tokens_sorted,) slot of each sorted token (for lookups)


@dataclass
class RowPlan:
    """Where each row's adapter sits, computed once per batch (host side), reused by every layer."""

    slots: list[int]
    runs: list[tuple[int, int, int]] = field(init=False)  # (slot, first row, end row)
    lo: int = field(init=False)  # smallest / largest adapter slot used (-1 if none)
    hi: int = field(init=False)
    single: int | None = field(init=False)  # the slot, if every row uses the same adapter
    adapter_rows: int = field(init=False)  # rows with an adapter (slot >= 0)
    used: frozenset = field(init=False)  # the adapter slots in use
    _cache: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.slots = [int(s) for s in self.slots]
        runs: list[tuple[int, int, int]] = []
        for i, s in enumerate(self.slots):
            if runs and runs[-1][0] == s:
                runs[-1] = (s, runs[-1][1], i + 1)
            else:
                runs.append((s, i, i + 1))
        self.runs = runs
        used = [s for s in self.slots if s >= 0]
        self.adapter_rows = len(used)
        self.used = frozenset(used)
        self.lo, self.hi = (min(used), max(used)) if used else (-1, -1)
        self.single = runs[0][0] if len(runs) == 1 and runs[0][0] >= 0 else None

    @property
    def empty(self) -> bool:
        return self.adapter_rows == 0

    def tokens(self, T: int, device: torch.device) -> _TokenPlan:
        key = (T, str(device))
        tp = self._cache.get(key)
        if tp is None:
            tp = self._cache[key] = self._build(T, device)
        return tp

    def _build(self, T: int, device: torch.device) -> _TokenPlan:
        long = dict(dtype=torch.long)
        run_slots = torch.tensor([max(s, 0) for s, _, _ in self.runs], **long)
        base = [s < 0 for s, _, _ in self.runs]
        run_ends_list = [e * T for _, _, e in self.runs]
        rows = [i for i in sorted(range(len(self.slots)), key=lambda i: self.slots[i]) if self.slots[i] >= 0]
        order = (torch.tensor(rows, **long)[:, None] * T + torch.arange(T)).reshape(-1)
        counts = [0] * (self.hi - self.lo + 1 if self.hi >= 0 else 0)
        for s in self.slots:
            if s >= 0:
                counts[s - self.lo] += T
        ends, acc = [], 0
        for c in counts:
            acc += c
            ends.append(acc)
        slot_ids = torch.tensor([self.slots[i] for i in rows], **long).repeat_interleave(T)
        i32 = dict(dtype=torch.int32, device=device)
        return _TokenPlan(
            run_slots=run_slots.to(device), run_base=torch.tensor(base).to(device) if any(base) else None,
            run_ends=torch.tensor(run_ends_list, **i32), run_ends_list=run_ends_list,
            order=order.to(device), sorted_ends=torch.tensor(ends, **i32), sorted_ends_list=ends,
            sorted_slot_ids=slot_ids.to(device),
        )


def plan_rows(slots: Sequence[int]) -> RowPlan:
    return RowPlan(list(slots))


# ---- linear-like layers -----------------------------------------------------------------------
def lora_rows(x: Tensor, A: Tensor, B: Tensor, plan: RowPlan, y: Tensor | None = None,
              layout: str | None = None) -> Tensor:
    """y + the per-row low-rank term, for Linear-like layers (nn.Linear, GPT-2 Conv1D, ...).

    Semantics:
        out = y.clone()  (zeros if y is None)
        for b, s in enumerate(plan.slots):
            if s >= 0:
                out[b] += (x[b] @ A[s].T @ B[s].T).to(out.dtype)
    x: (rows, ..., in); A: (S, r, in); B: (S, out, r), scaling folded in; y: (rows, ..., out).
    Computed in A's dtype. `layout` forces "runs" or "sorted" (default: the cheaper by data moved).
    """
    rows, n_in = x.shape[0], x.shape[-1]
    n_out = B.shape[1]
    out_shape = (*x.shape[:-1], n_out)
    if y is None:
        y = torch.zeros(out_shape, dtype=A.dtype, device=x.device)
    if plan.empty:
        return y
    T = x.numel() // (rows * n_in) if rows else 0
    x2 = x.reshape(rows * T, n_in).to(A.dtype)
    if plan.single is not None and layout is None:  # one adapter for the whole batch: two matmuls
        s = plan.single
        return y + F.linear(F.linear(x2, A[s]), B[s]).view(out_shape).to(y.dtype)
    r = A.shape[1]
    if layout is None:
        layout = "runs" if len(plan.runs) * r <= plan.adapter_rows * T else "sorted"
    tp = plan.tokens(T, x.device)
    if layout == "runs":
        Ag = A.index_select(0, tp.run_slots)
        if tp.run_base is not None:
            Ag = Ag.masked_fill(tp.run_base[:, None, None], 0)
        Bg = B.index_select(0, tp.run_slots)
        h = grouped_matmul(x2, Ag.transpose(1, 2), tp.run_ends, tp.run_ends_list)
        d = grouped_matmul(h, Bg.transpose(1, 2), tp.run_ends, tp.run_ends_list)
        return y + d.view(out_shape).to(y.dtype)
    xs = x2.index_select(0, tp.order)
    As, Bs = A[plan.lo:plan.hi + 1], B[plan.lo:plan.hi + 1]  # views: no copy of the bank
    h = grouped_matmul(xs, As.transpose(1, 2), tp.sorted_ends, tp.sorted_ends_list)
    d = grouped_matmul(h, Bs.transpose(1, 2), tp.sorted_ends, tp.sorted_ends_list)
    return y.reshape(rows * T, n_out).index_add(0, tp.order, d.to(y.dtype)).view(out_shape)


def lora_rows_ref(x: Tensor, A: Tensor, B: Tensor, slots: Sequence[int], y: Tensor | None = None) -> Tensor:
    out = torch.zeros((*x.shape[:-1], B.shape[1]), dtype=A.dtype, device=x.device) if y is None else y.clone()
    for b, s in enumerate(slots):
        if s >= 0:
            out[b] += (x[b].to(A.dtype) @ A[s].T @ B[s].T).to(out.dtype)
    return out


# ---- embeddings -------------------------------------------------------------------------------
def embedding_rows(ids: Tensor, At: Tensor, B: Tensor, plan: RowPlan, y: Tensor | None = None,
                   padding_idx: int | None = None) -> Tensor:
    """y + the per-row low-rank term of an Embedding: A is looked up, not multiplied.

    Semantics:
        out = y.clone()  (zeros if y is None)
        for b, s in enumerate(plan.slots):
            if s >= 0:
                out[b] += (At[s][ids[b]] @ B[s].T).to(out.dtype)
    ids: (rows, ...) token ids; At: (S, vocab, r) (A transposed, contiguous); B: (S, out, r).
    `padding_idx` only stops gradients at that id, as in F.embedding.
    """
    rows = ids.shape[0]
    n_out, V, r = B.shape[1], At.shape[1], At.shape[2]
    out_shape = (*ids.shape, n_out)
    if y is None:
        y = torch.zeros(out_shape, dtype=At.dtype, device=ids.device)
    if plan.empty:
        return y
    T = ids.numel() // rows
    flat = ids.reshape(rows * T)
    if plan.single is not None:
        s = plan.single
        return y + F.linear(F.embedding(flat, At[s], padding_idx), B[s]).view(out_shape).to(y.dtype)
    tp = plan.tokens(T, ids.device)
    tok = flat.index_select(0, tp.order)
    h = F.embedding(tok + tp.sorted_slot_ids * V, At.reshape(-1, r))
    if padding_idx is not None and h.requires_grad:
        h = torch.where((tok == padding_idx)[:, None], h.detach(), h)
    Bs = B[plan.lo:plan.hi + 1]
    d = grouped_matmul(h, Bs.transpose(1, 2), tp.sorted_ends, tp.sorted_ends_list)
    return y.reshape(rows * T, n_out).index_add(0, tp.order, d.to(y.dtype)).view(out_shape)


def embedding_rows_ref(ids: Tensor, At: Tensor, B: Tensor, slots: Sequence[int], y: Tensor | None = None) -> Tensor:
    out = torch.zeros((*ids.shape, B.shape[1]), dtype=At.dtype, device=ids.device) if y is None else y.clone()
    for b, s in enumerate(slots):
        if s >= 0:
            out[b] += (At[s][ids[b]] @ B[s].T).to(out.dtype)
    return out


# ---- dropout with a rate per row --------------------------------------------------------------
def dropout_rows(x: Tensor, p: Sequence[float]) -> Tensor:
    """Inverted dropout where row b drops with probability p[b] (training only).

    Semantics: for each b, x[b] * bernoulli(1 - p[b]) / (1 - p[b]), elementwise."""
    keep = torch.tensor([1.0 - q for q in p], dtype=x.dtype, device=x.device).view(-1, *([1] * (x.dim() - 1)))
    return x * (torch.rand_like(x) < keep).to(x.dtype) / keep
