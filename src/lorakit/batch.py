"""Many adapters in one batch: row i of the batch uses adapter names[i] (None: the base).

The base layers run once for the whole batch; the low-rank part of every wrapped layer is two
batched matmuls over the batch's row groups (`ops.lora_rows` / `ops.embedding_rows`), never a Python
loop over rows or adapters. A batch whose rows all use one adapter runs like that adapter alone
(merged on the fly where that is cheaper). Adapter weights come from stacked slots: at inference
from a slot store (an `AdapterBank`, lorakit.bank), under autograd from the adapters' own
parameters, stacked on the fly so gradients reach them (a training batch may mix adapters).

A `RowGroups` set on the model's state (`rows(state, groups)`) is what the wrapped layers ask
(layer.Rows): this module is above the layers and imports them, never the other way round.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .errors import LoraError
from .layer import LoraLayer, LoraState, ModulesToSave, run_saved

FAST = {"matmul": "linear", "lookup": "embedding"}  # how the input meets A -> the batched op


class RowGroups(dict):
    """adapter -> row indices (what the reference loop reads), plus what the fast path needs.

    `slots` (the slot store: `ensure(names)`, `stacks(layer, plan)`, `saved_module(mod, name)`)
    gives the per-layer stacks; the plan (runs, sorted order) is built once per batch.
    """

    def __init__(self, names: Sequence[str | None], *, slots: Any, keys: Sequence[str | None],
                 trainable: bool | Callable[[], bool], model_mode: bool):
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            if n is not None:
                groups.setdefault(n, []).append(i)
        super().__init__({n: torch.tensor(idx, dtype=torch.long) for n, idx in groups.items()})
        self.names = list(names)
        self.keys = list(keys)  # the slot store's key for each row (None: base)
        self.slots = slots
        self._trainable = trainable  # some used adapter has parameters that require grad (lazy)
        self.model_mode = model_mode  # adapters live in the model's ParameterDicts (per_row)
        self.used = list(groups)  # distinct adapters, first-seen order
        local = {n: i for i, n in enumerate(self.used)}
        self.local_plan = ops.plan_rows([local[n] if n is not None else -1 for n in names])
        self._bank_plan: ops.RowPlan | None = None

    @property
    def trainable(self) -> bool:
        if callable(self._trainable):
            self._trainable = bool(self._trainable())
        return self._trainable

    def bank_plan(self) -> ops.RowPlan:
        if self._bank_plan is None:
            slots = self.slots.ensure([k for k in self.keys if k is not None])
            self._bank_plan = ops.plan_rows([slots[k] if k is not None else -1 for k in self.keys])
        return self._bank_plan

    def saved_module(self, mod: ModulesToSave, name: str) -> nn.Module | None:
        if self.model_mode:
            return mod.modules_to_save[name] if name in mod.modules_to_save else None
        return self.slots.saved_module(mod, name)

    # ---- what the wrapped layers ask (layer.Rows) ------------------------------------------------
    def layer_forward(self, layer: LoraLayer, x: Tensor, y: Tensor) -> Tensor:
        return layer_forward(layer, x, y, self)

    def single_weights(self, layer: LoraLayer, x: Tensor) -> tuple[Tensor, Tensor, float] | None:
        return single_weights(layer, x, self)

    def saved_forward(self, mod: ModulesToSave, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        return saved_forward(mod, x, args, kwargs, self)


def _fast_kind(layer: LoraLayer) -> str | None:
    kind = FAST.get(layer.kind.meets)
    if kind == "embedding" and getattr(layer.base_layer, "max_norm", None) is not None:
        return None  # max_norm renormalises the looked-up table in place
    return kind


def _stack_params(layer: LoraLayer, used: list[str], kind: str) -> tuple[Tensor, Tensor]:
    """Differentiable stacks (A, Bt) of the layer's own adapters (zeros where one is absent here)."""
    present = [n for n in used if n in layer.lora_A]
    r = max(layer.lora_A[n].shape[0] for n in present)
    ref = layer.lora_A[present[0]]
    As, Bs = [], []
    for n in used:
        if n in layer.lora_A:
            A, B = layer.lora_A[n], layer.lora_B[n] * layer.scaling[n]
            pad = r - A.shape[0]
            if pad:
                A, B = F.pad(A, (0, 0, 0, pad)), F.pad(B, (0, pad))
        else:
            A = ref.new_zeros(r, layer.in_features)
            B = ref.new_zeros(layer.out_features, r)
        As.append(A.T if kind == "embedding" else A)
        Bs.append(B.T)
    return torch.stack(As), torch.stack(Bs)


def layer_forward(layer: LoraLayer, x: Tensor, y: Tensor, g: RowGroups) -> Tensor:
    """The mixed-batch branch of LoraLayer.forward: y (base output) + each row's adapter term."""
    if x.shape[0] != len(g.names):
        raise LoraError(f"per_row was given {len(g.names)} adapter names but the batch has {x.shape[0]} rows")
    kind = _fast_kind(layer)
    if kind is None or (g.model_mode and layer.unbatchable and not layer.unbatchable.isdisjoint(g.used)):
        if not g.model_mode:
            raise LoraError(f"the adapter bank cannot run a {layer.kind.name} layer")
        return reference_layer(layer, x, y, g)  # (DoRA adapters, kinds without a batched op: a loop)
    if g.model_mode and torch.is_grad_enabled() and g.trainable:
        if not any(n in layer.lora_A for n in g.used):
            return y
        A, B = _stack_params(layer, g.used, kind)
        plan = g.local_plan
        if layer.training and kind == "linear":
            p = [_dropout_p(layer, n) for n in g.names]
            if any(p):
                x = ops.dropout_rows(x, p)
    else:
        plan = g.bank_plan()
        stacks = g.slots.stacks(layer, plan)
        if stacks is None:
            return y
        A, B = stacks
    inplace = not torch.is_grad_enabled() and layer.owns_output()  # y: this layer's fresh base output
    if kind == "embedding":
        return ops.embedding_rows(x, A, B, plan, y=y, padding_idx=layer.base_layer.padding_idx, inplace=inplace)
    return ops.lora_rows(x, A, B, plan, y=y, inplace=inplace)


def single_weights(layer: LoraLayer, x: Tensor, g: RowGroups) -> tuple[Tensor, Tensor, float] | None:
    """(A, B, scaling) when every row of this no-grad mixed batch uses one adapter that this
    (linear) layer carries: the layer may then merge it on the fly like a single active adapter."""
    if len(g.used) != 1 or None in g.names or x.shape[0] != len(g.names):
        return None
    name = g.used[0]
    if g.model_mode:
        if name not in layer.lora_A or not layer.variants[name].fusable:
            return None
        return layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
    plan = g.bank_plan()
    stacks = g.slots.stacks(layer, plan)
    if stacks is None or _fast_kind(layer) != "linear":
        return None
    A, Bt = stacks
    return A[plan.single], Bt[plan.single].T, 1.0


def _dropout_p(layer: LoraLayer, name: str | None) -> float:
    d = layer.lora_dropout[name] if name is not None and name in layer.lora_dropout else None
    return float(d.p) if isinstance(d, nn.Dropout) else 0.0


def reference_layer(layer: LoraLayer, x: Tensor, y: Tensor, groups: dict[str, Tensor]) -> Tensor:
    """Reference mixed batch: one pass of each adapter over its rows (a loop over adapters)."""
    for name, idx in groups.items():
        if name not in layer.lora_A:
            continue
        idx = idx.to(x.device)
        d = layer.lora_delta_out(x.index_select(0, idx), name, y.index_select(0, idx))
        y = y.index_add(0, idx, d.to(y.dtype))
    return y


def saved_forward(mod: ModulesToSave, x: Tensor, args: tuple, kwargs: dict, g: RowGroups) -> Tensor:
    """The per_row branch of ModulesToSave.forward: each adapter's copy runs on its rows only;
    rows of adapters without a copy (and base rows) get the original module.

    Copies may differ in output width (classification heads, each with its own label count).
    Then every row is padded on the last dim to the widest output used, with -inf: row i's first
    n_i entries are exactly its adapter's logits, and softmax/argmax over the whole row are those
    of its own n_i labels (the padding gets probability 0). Semantics, in plain PyTorch:
        W = max(width of each row's output)
        y[i] = F.pad(module_for(names[i])(x[i:i+1]), (0, W - its width), value=-inf)[0]
    """
    modules = {n: g.saved_module(mod, n) for n in g}
    modules = {n: m for n, m in modules.items() if m is not None}
    if len(modules) == 1 and len(g) == 1 and len(next(iter(g.values()))) == x.shape[0]:
        return run_saved(next(iter(modules.values())), x, args, kwargs)  # every row: one adapter
    y = mod.original_module(x, *args, **kwargs)
    outs = []
    for name, m in modules.items():
        idx = g[name].to(x.device)
        outs.append((idx, run_saved(m, x.index_select(0, idx), args, kwargs)))
    widths = {o.shape[-1] for _, o in outs}
    if sum(len(i) for i, _ in outs) < x.shape[0]:  # some rows keep the original's output
        widths.add(y.shape[-1])
    width = max(widths, default=y.shape[-1])
    if y.shape[-1] != width:  # wider only when no row keeps it: every row is overwritten below
        y = _pad_last(y, width) if y.shape[-1] < width else y[..., :width]
    for idx, out in outs:
        y = y.index_copy(0, idx, _pad_last(out, width).to(y.dtype))
    return y


def _pad_last(t: Tensor, width: int) -> Tensor:
    """`t` widened on its last dim to `width` with -inf (logits no label can take)."""
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]), value=float("-inf"))


@contextmanager
def rows(state: LoraState, groups: RowGroups) -> Iterator[None]:
    """Inside the block, the model's wrapped layers run `groups`' mixed batch."""
    prev = state.rows
    state.rows = groups
    try:
        yield
    finally:
        state.rows = prev


__all__ = ["RowGroups", "layer_forward", "reference_layer", "rows", "saved_forward", "single_weights"]
