"""LoraLayer wraps one base module and holds any number of named adapters beside it.

Per-adapter state lives in containers keyed by adapter name (lora_A, lora_B, lora_dropout,
scaling), so adding, switching or deleting an adapter never touches the base module. Which
adapters apply is decided by one `LoraState` object shared by every wrapped layer of a model:
switching adapters is a single assignment, whatever the number of layers or adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from . import core, dora
from .errors import LoraError
from .init import changes_base, init_from_base
from .kinds import Kind, _linear_project


@dataclass
class LoraState:
    """Model-wide adapter state, shared by reference between all wrapped layers."""

    configs: dict[str, Any] = field(default_factory=dict)  # adapter name -> LoraConfig
    active: tuple[str, ...] = ()
    disabled: bool = False
    rows: list[str | None] | None = None  # per-row adapter names under per_row()
    row_groups: dict[str, Tensor] | None = None  # adapter -> row indices, for per_row()
    n_merged: int = 0  # (layer, adapter) pairs merged into weights: lets set_adapter check in O(1)
    merge_on_the_fly: bool = True  # no-grad forwards over many tokens may form W + dW (benchmarks turn it off)


_PLAIN_FORWARDS = ("Linear.forward", "Conv1D.forward")  # forwards that are exactly F.linear(x, W, b)
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
    """y = base(x) + sum over active adapters of s * B(A(dropout(x))).

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
        self.merged: list[str] = []  # stack: merged adapters, oldest first
        self.originals: dict[str, Tensor] = {}  # adapter -> weight before its merge (keep_original)
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters: (out,) magnitudes
        self.dora_norms: dict[str, Tensor] = {}  # DoRA: row norms at merge time, for unmerge
        self.in_features, self.out_features = kind.dims(base_layer)

    # ---- adapters ---------------------------------------------------------------------------
    def add(self, name: str, r: int, alpha: float, *, rslora: bool = False, dropout: float = 0.0,
            init: bool | str = True, dtype: torch.dtype | None = None, use_dora: bool = False,
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
        if use_dora:
            dora.init_magnitude(self, name)
        use = dropout > 0 and self.kind.uses_dropout
        # a new module starts in training mode: follow the layer's, or an adapter loaded into an
        # eval-mode model would drop inputs at inference
        self.lora_dropout[name] = nn.Dropout(dropout).train(self.training) if use else _IDENTITY

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise LoraError(f"adapter {name!r} is merged into the weights: unmerge(model) first")
        for container in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in container:
                del container[name]
        self.scaling.pop(name, None)

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0]

    def weight_tensor(self) -> Tensor:
        w = getattr(self.base_layer, "weight", None)
        if w is None:
            raise LoraError(f"{type(self.base_layer).__name__} has no weight")
        return w

    # ---- forward ----------------------------------------------------------------------------
    def lora_delta_out(self, x: Tensor, name: str, y: Tensor | None = None) -> Tensor:
        """s * B(A(dropout(x))) for one adapter: the adapter's contribution to the output.
        `y` (the output so far) lets a DoRA adapter reuse the base output instead of recomputing it."""
        if name in self.lora_magnitude_vector:
            return dora.delta_out(self, x, name, y)
        return core.lora_out(
            self.lora_dropout[name](x),
            self.lora_A[name],
            self.lora_B[name],
            self.scaling[name],
            project=partial(self.kind.project, self.base_layer),
            channel_dim=self.kind.channel_dim,
        )

    def _merge_on_the_fly(self, x: Tensor, st: LoraState) -> tuple[Tensor, Tensor, float] | None:
        """(A, B, scaling) of the one adapter of this no-grad forward (the active one, or every row's
        in a mixed batch), if the forward is cheaper with dW merged on the fly."""
        if (torch.is_grad_enabled() or not st.merge_on_the_fly or not self.kind.plain_linear or st.disabled
                or not torch.is_tensor(x)
                or torch.is_autocast_enabled(x.device.type)):
            return None  # (under autocast W + dW would be formed in half precision)
        base = self.base_layer
        if (type(base).forward.__qualname__ not in _PLAIN_FORWARDS or base._forward_hooks
                or base._forward_pre_hooks):  # a subclass or a hook: run the module itself
            return None
        tokens = x.numel() // max(self.in_features, 1)
        if tokens * (self.in_features + self.out_features) <= self.in_features * self.out_features:
            return None
        if st.row_groups is not None:
            from .batch import single_weights

            w = single_weights(self, x, st)
        else:
            name = st.active[0] if len(st.active) == 1 else None
            if name is None or name not in self.lora_A or name in self.merged or name in self.lora_magnitude_vector:
                return None
            drop = self.lora_dropout[name]
            if isinstance(drop, nn.Dropout) and drop.training:
                return None
            w = self.lora_A[name], self.lora_B[name], self.scaling[name]
        if w is None or base.weight.dtype not in (torch.float32, torch.float64) or w[0].dtype != base.weight.dtype:
            return None
        return w

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        st = self.state
        w = self._merge_on_the_fly(x, st) if not args and not kwargs else None
        if w is not None:
            return core.linear_merged(x, self.kind.matrix(self.base_layer), self.base_layer.bias, *w)
        y = self.base_layer(x, *args, **kwargs)
        if st.disabled:
            return y
        if st.row_groups is not None:
            return self._per_row(x, y, st)
        for name in st.active:
            if name in self.lora_A and name not in self.merged:
                if self.kind.project is _linear_project and name not in self.lora_magnitude_vector:
                    drop = self.lora_dropout[name]
                    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
                    y = core.lora_linear(y, x, self.lora_A[name], self.lora_B[name], self.scaling[name], p,
                                         inplace=self._owns_output())
                else:
                    y = y + self.lora_delta_out(x, name, y).to(y.dtype)
        return y

    def _owns_output(self) -> bool:
        """The base output may be updated in place: no hook of the base module may hold it."""
        base = self.base_layer
        return not (base._forward_hooks or base._forward_pre_hooks)

    def _per_row(self, x: Tensor, y: Tensor, st: LoraState) -> Tensor:
        """Mixed batch: row i gets st.rows[i]'s adapter, as two batched matmuls (lorakit.batch)."""
        from .batch import layer_forward

        return layer_forward(self, x, y, st)

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
        import copy

        clone = copy_with(self.original_module, tensors) if tensors is not None else copy.deepcopy(self.original_module)
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
        if st.row_groups is None or st.disabled:
            return self.current()(x, *args, **kwargs)
        from .batch import saved_forward

        return saved_forward(self, x, args, kwargs, st)


def copy_with(module: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """A deep copy of `module` holding state dict `tensors` (cast to the copy's dtypes). A tensor
    whose shape differs replaces the copy's own, so an adapter's classification head may have its
    own label count (io._plan decides which differences an adapter file may carry)."""
    import copy

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


def walk(module: nn.Module, prefix: str = ""):
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
