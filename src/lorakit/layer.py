"""LoraLayer wraps one base module and holds any number of named adapters beside it.

Per-adapter state lives in containers keyed by adapter name (lora_A, lora_B, lora_dropout,
scaling, variants), so adding, switching or deleting an adapter never touches the base module.
What differs between variants (plain LoRA, DoRA) is asked of each adapter's variant object, and
what differs between layer types of its `Kind`. Which adapters apply is decided by one
`LoraState` object shared by every wrapped layer of a model: switching adapters is a single
assignment, whatever the number of layers or adapters.

Also here, as the one home for them: the module-tree edits (`wrap`, `save_module`,
`replace_module`) and the state guards (`require_state`, `require_adapter`; adapters.require_unmerged sees every wrapper).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, Protocol

import torch
from torch import Tensor, nn

from . import core, kinds
from .config import changes_base
from .errors import LoraError, TargetError
from .init import init_from_base
from .kinds import Kind
from .variants import LORA


class Rows(Protocol):
    """What a mixed batch (lorakit.batch, set on the state by per_row / a bank's rows()) answers
    for the wrapped layers: they call it instead of importing the batching code."""

    def layer_forward(self, layer: "LoraLayer", x: Tensor, y: Tensor) -> Tensor: ...

    def single_weights(self, layer: "LoraLayer", x: Tensor) -> tuple[Tensor, Tensor, float] | None: ...

    def saved_forward(self, mod: "ModulesToSave", x: Tensor, args: tuple, kwargs: dict) -> Tensor: ...


@dataclass
class LoraState:
    """Model-wide adapter state, shared by reference between all wrapped layers."""

    configs: dict[str, Any] = field(default_factory=dict)  # adapter name -> LoraConfig
    active: tuple[str, ...] = ()
    disabled: bool = False
    rows: Rows | None = None  # under per_row() / bank.rows(): each row's adapter
    n_merged: int = 0  # (layer, adapter) pairs merged into weights: lets set_adapter check in O(1)
    merge_on_the_fly: bool = True  # no-grad forwards over many tokens may form W + dW (benchmarks turn it off)
    slot_layers: list = field(default_factory=list)  # prepared for compile (lorakit.hotswap): these run slots
    trainable: set | None = None  # adapters lorakit last made trainable (None: unknown); set_adapter flips only
    # the difference, through `params` (adapter -> its parameters; dropped whenever the adapter changes)
    params: dict = field(default_factory=dict)
    compute_dtype: Any = "auto"  # what the adapters' matmuls run in (core.compute_dtype; set_compute_dtype)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in ("active", "disabled") and self.__dict__.get("slot_layers"):
            self.load_slots()  # a compiled model: the switch is a copy into the slots, never a new graph

    def load_slots(self) -> None:
        """Copy the active adapter (none if disabled) into every prepared layer's slot tensors."""
        name = None if self.disabled or not self.active else self.active[0]
        for layer in self.slot_layers:
            layer.load_slot(name)


_IDENTITY = nn.Identity()  # shared by every adapter without dropout: no module built per adapter


class _Wrapper(nn.Module):
    """Attribute fallback to the wrapped module, so code reading `layer.weight` keeps working."""

    _inner = "base_layer"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self._inner or name.startswith("__"):
                raise
            return getattr(super().__getattr__(self._inner), name)


class LoraLayer(_Wrapper):
    """y = base(x) + the active adapters' contributions (plain LoRA: s * B(A(dropout(x)))).

    A is stored as an (r x in) matrix and B as (out x r), whatever the base kind; `kind` says how
    the input meets A (matmul, lookup, convolution) and how to view the weight as (out x in).
    """

    def __init__(self, base_layer: nn.Module, kind: Kind, state: LoraState):
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.state = state
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.variants: dict[str, Any] = {}  # adapter -> its variant object (lorakit.variants)
        self.unbatchable: set[str] = set()  # adapters whose variant cannot share stacked slots
        self.merged: list[str] = []  # stack: merged adapters, oldest first
        self.originals: dict[str, Tensor] = {}  # adapter -> weight before its merge (keep_original)
        self.in_features, self.out_features = kind.dims(base_layer)

    # ---- adapters ---------------------------------------------------------------------------
    def add(self, name: str, r: int, alpha: float, *, rslora: bool = False, dropout: float = 0.0,
            init: bool | str = True, dtype: torch.dtype | None = None, variant: Any = LORA,
            path: str = "", weights: tuple[Tensor, Tensor] | None = None) -> None:
        """Add adapter `name`: A (r x in), B (out x r) initialised by `init`, or taken from
        `weights` (loading: no initialisation work, no copy when dtype and device already fit)."""
        weight = self.weight_tensor()
        dtype = dtype or adapter_dtype(weight)
        if weights is not None and not changes_base(init):
            A, B = (t.to(dtype=dtype, device=weight.device).contiguous() for t in weights)
        else:
            A = torch.empty(r, self.in_features, dtype=dtype, device=weight.device)
            B = torch.empty(self.out_features, r, dtype=dtype, device=weight.device)
            core.init_ab(A, B, True if changes_base(init) else init, zero_a=self.kind.zero_a)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.scaling[name] = core.scaling(alpha, r, rslora)
        if changes_base(init):  # PiSSA / OLoRA: A, B from W, and W becomes the residual
            init_from_base(self, name, init, path)
        self.variants[name] = variant
        if not variant.batchable:
            self.unbatchable.add(name)
        variant.add(self, name)
        use = dropout > 0 and self.kind.uses_dropout
        # a new module starts in training mode: follow the layer's, or an adapter loaded into an
        # eval-mode model would drop inputs at inference
        self.lora_dropout[name] = nn.Dropout(dropout).train(self.training) if use else _IDENTITY

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise LoraError(f"adapter {name!r} is merged into the weights: unmerge(model) first")
        variant = self.variants.pop(name, None)
        if variant is not None:
            variant.remove(self, name)
        for container in (self.lora_A, self.lora_B, self.lora_dropout):
            if name in container:
                del container[name]
        self.scaling.pop(name, None)
        self.unbatchable.discard(name)

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0]

    def weight_tensor(self) -> Tensor:
        w = getattr(self.base_layer, "weight", None)
        if w is None:
            raise LoraError(f"{type(self.base_layer).__name__} has no weight")
        return w

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        """What trains for adapter `name` in this layer: A, B and its variant's own tensors."""
        return [self.lora_A[name], self.lora_B[name], *self.variants[name].parameters(self, name)]

    # ---- the math, through core and the kind ----------------------------------------------------
    def delta(self, name: str) -> Tensor:
        """dW = s * B @ A for one adapter, (out x in), float32, no gradient (merging, norms)."""
        return core.delta(self.lora_A[name].detach(), self.lora_B[name].detach(), self.scaling[name])

    def lora_out(self, x: Tensor, name: str) -> Tensor:
        """s * B(A(x)) for one adapter: the input meets A as the kind says (no dropout here)."""
        return core.lora_out(x, self.lora_A[name], self.lora_B[name], self.scaling[name],
                             project=partial(self.kind.apply_a, self.base_layer), channel_dim=self.kind.channel_dim)

    def lora_delta_out(self, x: Tensor, name: str, y: Tensor | None = None) -> Tensor:
        """The adapter's contribution to the output, by its variant. `y` (the output so far) lets
        a DoRA adapter reuse the base output instead of recomputing it."""
        return self.variants[name].delta_out(self, x, name, y)

    def unmerged_matrix(self) -> Tensor:
        """The weight with every merged adapter taken out again (float32 out x in)."""
        m = self.kind.matrix(self.base_layer).float()
        for n in reversed(self.merged):
            m = self.variants[n].undo(self, n, m)
        return m

    def owns_output(self) -> bool:
        """The base output may be updated in place: no hook of the base module may hold it."""
        base = self.base_layer
        return not (base._forward_hooks or base._forward_pre_hooks)

    # ---- forward ----------------------------------------------------------------------------
    def _merge_on_the_fly(self, x: Tensor, st: LoraState) -> tuple[Tensor, Tensor, float] | None:
        """(A, B, scaling) of the one adapter of this no-grad forward (the active one, or every row's
        in a mixed batch), if the forward is cheaper with dW merged on the fly."""
        if (torch.is_grad_enabled() or not st.merge_on_the_fly or st.disabled or not torch.is_tensor(x)
                or torch.is_autocast_enabled(x.device.type)):
            return None  # (under autocast W + dW would be formed in half precision)
        base = self.base_layer
        if not kinds.plain_forward(base) or base._forward_hooks or base._forward_pre_hooks:
            return None  # a subclass, a quantized weight or a hook: run the module itself
        tokens = x.numel() // max(self.in_features, 1)
        if tokens * (self.in_features + self.out_features) <= self.in_features * self.out_features:
            return None
        if st.rows is not None:
            w = st.rows.single_weights(self, x)
        else:
            name = st.active[0] if len(st.active) == 1 else None
            if name is None or name not in self.lora_A or name in self.merged or not self.variants[name].fusable:
                return None
            drop = self.lora_dropout[name]
            if isinstance(drop, nn.Dropout) and drop.training:
                return None
            w = self.lora_A[name], self.lora_B[name], self.scaling[name]
        if w is None or base.weight.dtype not in (torch.float32, torch.float64) or w[0].dtype != base.weight.dtype:
            return None
        return w

    # ---- slots: a compiled model whose adapters change without recompiling (lorakit.hotswap) ---------
    def make_slots(self, max_rank: int) -> None:
        """Fixed tensors for the active adapter: A zero-padded to (max_rank, in), B to (out,
        max_rank), the scaling as a 0-d tensor. A compiled forward reads only these, whose identity
        and shape never change, so switching or replacing adapters copies values, never retraces."""
        w = self.weight_tensor()
        kw = {"dtype": adapter_dtype(w), "device": w.device}
        self.register_buffer("slot_A", torch.zeros(max_rank, self.in_features, **kw), persistent=False)
        self.register_buffer("slot_B", torch.zeros(self.out_features, max_rank, **kw), persistent=False)
        self.register_buffer("slot_s", torch.zeros((), **kw), persistent=False)

    @torch.no_grad()
    def load_slot(self, name: str | None) -> None:
        self.slot_A.zero_()
        self.slot_B.zero_()
        if name is None or name not in self.lora_A:
            self.slot_s.zero_()
            return
        r = self.rank(name)
        self.slot_A[:r].copy_(self.lora_A[name])
        self.slot_B[:, :r].copy_(self.lora_B[name])
        self.slot_s.fill_(self.scaling[name])

    def _slot_forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.kind.meets == "matmul":
            return core.lora_linear(y, x, self.slot_A, self.slot_B, self.slot_s, 0.0, inplace=self.owns_output(),
                                    cdt=core.compute_dtype(x, self.slot_A, self.state.compute_dtype))
        h = core.lora_out(x, self.slot_A, self.slot_B, self.slot_s, project=partial(self.kind.apply_a, self.base_layer),
                          channel_dim=self.kind.channel_dim)
        return y + h.to(y.dtype)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        st = self.state
        if st.slot_layers:  # prepared for compile: the active adapter lives in the slots
            return self._slot_forward(x, self.base_layer(x, *args, **kwargs))
        w = self._merge_on_the_fly(x, st) if not args and not kwargs else None
        if w is not None:
            return core.linear_merged(x, self.kind.matrix(self.base_layer), self.base_layer.bias, *w)
        y = self.base_layer(x, *args, **kwargs)
        if st.disabled:
            return y
        if st.rows is not None:  # a mixed batch: row i gets its own adapter (lorakit.batch)
            return st.rows.layer_forward(self, x, y)
        for name in st.active:
            if name in self.lora_A and name not in self.merged:
                y = self.variants[name].forward(self, x, y, name)
        return y

    def extra_repr(self) -> str:
        ranks = {n: self.rank(n) for n in self.lora_A}
        return f"kind={self.kind.name}, adapters={ranks}, merged={self.merged}"


class ModulesToSave(_Wrapper):
    """A fully trainable copy of a module per adapter (e.g. a classifier head); original kept.
    A copy loaded from a classification adapter may have its own label count (see io._plan)."""

    _inner = "original_module"

    def __init__(self, original_module: nn.Module, state: LoraState):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.state = state

    def add(self, name: str, tensors: dict[str, Tensor] | None = None) -> None:
        """A trainable copy of the original for `name`, holding `tensors` (a state dict) if given."""
        clone = copy_with(self.original_module, tensors) if tensors is not None else copy.deepcopy(self.original_module)
        if any(p.dtype in core.LOW_PRECISION for p in clone.parameters()):
            clone.float()  # a trainable copy of a bf16/fp16 module: float32 master weights (run_saved casts)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def current(self) -> nn.Module:
        st = self.state
        if not st.disabled:
            for name in reversed(st.active):
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        st = self.state
        if st.rows is None or st.disabled:
            return run_saved(self.current(), x, args, kwargs)
        return st.rows.saved_forward(self, x, args, kwargs)


def run_saved(module: nn.Module, x: Tensor, args: tuple = (), kwargs: dict | None = None) -> Tensor:
    """module(x, ...), with a floating x cast to the module's dtype where they differ (a float32
    copy of a bf16 model's head: its output stays float32, as logits for a loss should)."""
    p = next(module.parameters(), None)
    if p is not None and torch.is_tensor(x) and x.is_floating_point() and x.dtype != p.dtype:
        x = x.to(p.dtype)
    return module(x, *args, **(kwargs or {}))


def copy_with(module: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """A deep copy of `module` holding state dict `tensors` (cast to the copy's dtypes). A tensor
    whose shape differs replaces the copy's own, so an adapter's classification head may have its
    own label count (io.plan_adapter decides which differences an adapter file may carry)."""
    clone = copy.deepcopy(module)
    own = clone.state_dict()
    for key, t in tensors.items():
        if key in own and own[key].shape != t.shape:
            owner, _, leaf = key.rpartition(".")
            sub = clone.get_submodule(owner)
            old = getattr(sub, leaf)
            new = old.new_empty(t.shape)
            if isinstance(old, nn.Parameter):
                setattr(sub, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                sub._buffers[leaf] = new
            if isinstance(sub, nn.Linear) and leaf == "weight":
                sub.out_features, sub.in_features = t.shape
    ref = clone.state_dict()
    clone.load_state_dict({k: v.to(ref[k].dtype) for k, v in tensors.items()}, strict=True)
    return clone


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapters train in float32 on low-precision or quantized bases, else in the base's dtype."""
    if weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return torch.float32


STATE_ATTR = "_lorakit_state"


def state_of(model: nn.Module, create: bool = False) -> LoraState | None:
    """The model's shared adapter state (found on any wrapped layer, cached on the model)."""
    st = model.__dict__.get(STATE_ATTR)
    if st is None:
        for m in model.modules():
            if isinstance(m, (LoraLayer, ModulesToSave)):
                st = m.state
                break
    if st is None and create:
        st = LoraState()
    if st is not None:
        model.__dict__[STATE_ATTR] = st
    return st


def require_state(model: nn.Module) -> LoraState:
    st = state_of(model)
    if st is None or not st.configs:
        raise LoraError("this model has no LoRA adapters: call inject() or load_adapter() first")
    return st


def set_compute_dtype(model: nn.Module, dtype: Any = "auto") -> None:
    """The dtype the adapters' matmuls run in. "auto" (default): a bf16/fp16 base runs them in its
    own precision (bf16 matmuls accumulate in float32; A and B stay float32 master weights, their
    gradients and optimizer state too); torch.float32: every adapter matmul in float32, inputs
    cast up (the slower path lorakit took on low-precision bases before)."""
    if dtype != "auto" and dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise LoraError(f"set_compute_dtype: {dtype!r}; expected 'auto' or a float torch dtype")
    require_state(model).compute_dtype = dtype


def require_adapter(state: LoraState, name: Any) -> None:
    """An adapter the model has, or a LoraError listing those it has."""
    if name not in state.configs:
        raise LoraError(f"no adapter named {name!r}; adapters: {list(state.configs)}")


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module, not descending into lorakit wrappers (whose insides,
    one container per adapter, would make a full named_modules() grow with the adapter count)."""
    for name, child in module._modules.items():
        if child is None:
            continue
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if not isinstance(child, _Wrapper):
            yield from walk(child, path)


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in walk(model) if isinstance(m, LoraLayer)]


def saved_modules(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    return [(n, m) for n, m in walk(model) if isinstance(m, ModulesToSave)]


# ---- module-tree edits -----------------------------------------------------------------------
def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def wrap(model: nn.Module, path: str, state: LoraState) -> LoraLayer:
    """The LoraLayer at `path`, wrapping the module there first if needed (in its train/eval mode)."""
    module = model.get_submodule(path)
    if isinstance(module, LoraLayer):
        return module
    kind = kinds.kind_of(module)
    if kind is None:
        raise TargetError(f"module {path!r} of type {type(module).__name__} cannot be wrapped")
    layer = LoraLayer(module, kind, state).train(module.training)
    replace_module(model, path, layer)
    return layer


def save_module(model: nn.Module, path: str, state: LoraState) -> ModulesToSave:
    """The ModulesToSave at `path` (per-adapter trainable copies), wrapping the module if needed."""
    module = model.get_submodule(path)
    if not isinstance(module, ModulesToSave):
        module = ModulesToSave(module, state).train(module.training)
        replace_module(model, path, module)
    return module
