"""LoRA on nn.Parameters (PEFT's `target_parameters`): mixture-of-experts weight stacks and other
parameters that no module type of the kinds table owns.

Most mixture-of-experts models keep their experts as 3-D parameters on one module (Qwen3-MoE and
Mixtral: `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I), i.e. (E, out, in); GPT-OSS stores
them transposed, (E, in, out), and says so with the module's `is_transposed`). The module's own
forward indexes and multiplies them, so there is no input to meet A. As in PEFT, the adapted
module runs its own forward on W + dW, formed for each forward (`torch.func.functional_call`:
autograd reaches A and B; the frozen base parameter gets no gradient).

Each expert has its own rank-r pair; PEFT stores all of them in one A and one B:
    A: (r*E, in)   rows expert-major: row e*r + j is expert e's j-th row
    B: (out, r*E)  columns rank-major: column j*E + e is expert e's j-th column
    dW[e] = s * B_e @ A_e  (out x in; transposed for (E, in, out) parameters), s = alpha / r
A 2-D parameter (out, in) is the case E = 1. PEFT's restrictions hold (no dropout, DoRA, lora_bias
or fan_in_fan_out: LoraConfig refuses them). Mixed-adapter batches cannot run these adapters (a
parameter cannot differ between rows of one module call): per_row and the adapter bank refuse them.

Files: PEFT wraps a module once per targeted parameter, nesting the wrappers in the module's
parameter registration order (the first registered innermost), and saves each parameter's A and B
under the module's path with one `.base_layer` per wrapper around it. So for an adapter targeting
k parameters of a module, the i-th (registration order) is saved under
`<module path>` + ".base_layer" * (k - 1 - i) + ".lora_A.weight". `file_path` computes it, both
for writing and for reading; lorakit itself keeps one wrapper per module (`ParamLayer`).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor, nn

from . import core
from .config import LoraConfig
from .errors import LoraError, TargetError
from .layer import LoraLayer, LoraState, ModulesToSave, adapter_dtype, replace_module, walk
from .patterns import suffix_match


def param_dims(module: nn.Module, pname: str) -> tuple[int, int, int, str]:
    """(E, in, out, layout) of parameter `pname` of `module`, as PEFT reads them: a 3-D parameter
    is (E, out, in) ("eoi"), or (E, in, out) ("eio") when the module says `is_transposed`; a 2-D
    one (out, in) ("oi"), E = 1."""
    shape = tuple(module._parameters[pname].shape)
    if len(shape) == 3:
        if getattr(module, "is_transposed", False):
            return shape[0], shape[1], shape[2], "eio"
        return shape[0], shape[2], shape[1], "eoi"
    return 1, shape[1], shape[0], "oi"


class ParamTarget(nn.Module):
    """The adapters of one parameter of the wrapped module: A and B per adapter, in PEFT's layout."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.param_name = name
        self.experts, self.in_features, self.out_features, self.layout = param_dims(module, name)
        self.lora_A = nn.ParameterDict()  # adapter -> (r*E, in)
        self.lora_B = nn.ParameterDict()  # adapter -> (out, r*E)
        self.scaling: dict[str, float] = {}

    def a_shape(self, r: int) -> tuple[int, int]:
        return (r * self.experts, self.in_features)

    def b_shape(self, r: int) -> tuple[int, int]:
        return (self.out_features, r * self.experts)

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0] // self.experts

    def factors(self, name: str, A: Tensor | None = None, B: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(lhs, rhs) with lhs @ rhs = B_e @ A_e per expert, in the parameter's own layout:
        (E, out, r) @ (E, r, in), (E, in, r) @ (E, r, out), or (out, r) @ (r, in) for E = 1."""
        A = self.lora_A[name] if A is None else A
        B = self.lora_B[name] if B is None else B
        if self.layout == "oi":
            return B, A
        E = self.experts
        r = A.shape[0] // E
        Ae = A.reshape(E, r, self.in_features)  # expert-major rows
        Be = B.reshape(self.out_features, r, E).permute(2, 0, 1)  # rank-major columns -> (E, out, r)
        if self.layout == "eoi":
            return Be, Ae
        return Ae.transpose(1, 2), Be.transpose(1, 2)

    def delta(self, name: str) -> Tensor:
        """dW for adapter `name` in the parameter's shape, float32, no gradient (merging)."""
        lhs, rhs = self.factors(name, self.lora_A[name].detach(), self.lora_B[name].detach())
        return core.delta(rhs, lhs, self.scaling[name])  # (lhs @ rhs) * s, batched over experts

    def adapted(self, W: Tensor, names: list[str]) -> Tensor:
        """W + the named adapters' dW, in W's dtype (one fused baddbmm/addmm each, as PEFT; autocast
        off, so the parameter keeps its dtype)."""
        with torch.autocast(device_type=W.device.type, enabled=False):
            for n in names:
                lhs, rhs = self.factors(n)
                lhs, rhs = lhs.to(W.dtype), rhs.to(W.dtype)
                W = (torch.addmm if W.dim() == 2 else torch.baddbmm)(W, lhs, rhs, alpha=self.scaling[n])
        return W


class ModuleWrapper(nn.Module):
    """A lorakit wrapper that runs the module it wraps with some of its parameters replaced
    (LoRA on parameters here, trainable token rows in lorakit.tokens). Attributes not found on the
    wrapper are read from the module; `merged` is the stack of adapters written into its weights."""

    def __init__(self, base_layer: nn.Module, state: LoraState):
        super().__init__()
        self.base_layer = base_layer
        self.state = state
        self.merged: list[str] = []  # stack: merged adapters, oldest first

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or name.startswith("__"):
                raise
            return getattr(super().__getattr__("base_layer"), name)

    def adapters(self) -> list[str]:  # pragma: no cover - every wrapper defines it
        raise NotImplementedError

    def refuse_rows(self, st: LoraState, what: str) -> None:
        """Mixed-adapter batches cannot run this wrapper's adapters (nor any while one is merged)."""
        if self.merged:
            raise LoraError(f"cannot run a mixed batch while adapters {self.merged} are merged into "
                            f"{type(self.base_layer).__name__}: unmerge(model) first")
        used = set(st.rows) if isinstance(st.rows, dict) else None  # batch.RowGroups: adapter -> rows
        mine = set(self.adapters())
        hit = mine if used is None else mine & used
        if hit:
            raise LoraError(
                f"adapters {sorted(hit)} {what} of {type(self.base_layer).__name__}: a mixed-adapter batch (per_row, "
                "AdapterBank) cannot run them, as every row of one module call sees the same weights; run such an "
                "adapter alone (set_adapter) or merge it")


class ParamLayer(ModuleWrapper):
    """Wraps a module some of whose parameters carry LoRA adapters (one `ParamTarget` each).

    forward(*args, **kwargs): the module's own forward with each adapted parameter replaced by
    W + the active (unmerged) adapters' dW.
    """

    def __init__(self, base_layer: nn.Module, state: LoraState):
        super().__init__(base_layer, state)
        self.targets = nn.ModuleDict()  # parameter name -> ParamTarget
        self.originals: dict[str, dict[str, Tensor]] = {}  # adapter -> {parameter: value before merge}

    # ---- adapters ---------------------------------------------------------------------------
    def target(self, pname: str) -> ParamTarget:
        if pname not in self.targets:
            try:
                self.targets[pname] = ParamTarget(self.base_layer, pname)
            except KeyError as e:  # a parameter named like a ModuleDict attribute ("keys", "items", ...)
                raise LoraError(f"parameter {pname!r} of {type(self.base_layer).__name__}: {e}") from None
        return self.targets[pname]

    def add(self, adapter: str, pname: str, r: int, alpha: float, *, rslora: bool = False, init: bool | str = True,
            weights: tuple[Tensor, Tensor] | None = None) -> None:
        """Adapter `adapter` on parameter `pname`: A (r*E, in), B (out, r*E), from `weights` or by
        `init` (True/"default", "gaussian", False: core.init_ab on the stacked A and B, as PEFT
        initialises its nn.Linear(in, r*E) and nn.Linear(r*E, out))."""
        t = self.target(pname)
        param = self.base_layer._parameters[pname]
        dtype = adapter_dtype(param)
        if weights is not None:
            A, B = (w.to(dtype=dtype, device=param.device).contiguous() for w in weights)
        else:
            if not (init is True or init is False or init in ("default", "gaussian")):
                raise LoraError(f"LoraConfig.init={init!r} is not supported with target_parameters "
                                "(PEFT's ParamWrapper initialises A and B like a linear layer: True, 'gaussian' or False)")
            A = torch.empty(t.a_shape(r), dtype=dtype, device=param.device)
            B = torch.empty(t.b_shape(r), dtype=dtype, device=param.device)
            core.init_ab(A, B, init)
            if init == "gaussian":  # PEFT: std 1/r for the rank r (init_ab reads A's rows, r*E here)
                torch.nn.init.normal_(A, std=1.0 / r)
        t.lora_A[adapter] = nn.Parameter(A)
        t.lora_B[adapter] = nn.Parameter(B)
        t.scaling[adapter] = core.scaling(alpha, r, rslora)

    def remove(self, adapter: str) -> None:
        if adapter in self.merged:
            raise LoraError(f"adapter {adapter!r} is merged into the weights: unmerge(model) first")
        for pname in list(self.targets):
            t = self.targets[pname]
            if adapter in t.lora_A:
                del t.lora_A[adapter], t.lora_B[adapter]
                t.scaling.pop(adapter, None)
            if not len(t.lora_A):
                del self.targets[pname]

    def adapters(self) -> list[str]:
        return list(dict.fromkeys(n for t in self.targets.values() for n in t.lora_A))

    def params_of(self, adapter: str) -> list[str]:
        """The parameters `adapter` adapts here, in the module's registration order."""
        return [p for p in self.base_layer._parameters if p in self.targets and adapter in self.targets[p].lora_A]

    def parameters_of(self, adapter: str) -> list[nn.Parameter]:
        return [x for p in self.params_of(adapter) for x in (self.targets[p].lora_A[adapter],
                                                               self.targets[p].lora_B[adapter])]

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        st = self.state
        if st.rows is not None:
            self.refuse_rows(st, f"adapt parameters {list(self.targets)} (target_parameters)")
        if st.disabled:
            return self.base_layer(*args, **kwargs)
        replaced = {}
        for pname, t in self.targets.items():
            names = [n for n in st.active if n in t.lora_A and n not in self.merged]
            if names:
                replaced[pname] = t.adapted(self.base_layer._parameters[pname], names)
        if not replaced:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.base_layer, replaced, args, kwargs)

    # ---- merge ------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, adapter: str, keep_original: bool = False) -> float:
        """Write W + dW into each adapted parameter (float32 sum, one rounding); returns the
        worst rounding error. keep_original: keep the values for a bit-exact unmerge."""
        worst = 0.0
        kept = {}
        for pname in self.params_of(adapter):
            param = self.base_layer._parameters[pname]
            if keep_original:
                kept[pname] = param.detach().clone()
            exact = param.float() + self.targets[pname].delta(adapter)
            param.copy_(exact.to(param.dtype))
            worst = max(worst, (param.float() - exact).abs().max().item())
        if keep_original:
            self.originals[adapter] = kept
        self.merged.append(adapter)
        return worst

    @torch.no_grad()
    def unmerge_last(self) -> str:
        """Undo the newest merge: the kept values, or W - dW in float32."""
        adapter = self.merged.pop()
        kept = self.originals.pop(adapter, None)
        for pname in self.params_of(adapter):
            param = self.base_layer._parameters[pname]
            if kept is not None:
                param.copy_(kept[pname])
            else:
                param.copy_((param.float() - self.targets[pname].delta(adapter)).to(param.dtype))
        return adapter

    def merged_values(self, names: list[str]) -> dict[str, Tensor]:
        """{parameter: value with the named adapters (not yet merged) merged in}, leaving the model alone."""
        out = {}
        for pname, t in self.targets.items():
            todo = [n for n in names if n in t.lora_A and n not in self.merged]
            if todo:
                param = self.base_layer._parameters[pname]
                m = param.detach().float()
                for n in todo:
                    m = m + t.delta(n)
                out[pname] = m.to(param.dtype)
        return out

    def extra_repr(self) -> str:
        return f"parameters={ {p: {n: t.rank(n) for n in t.lora_A} for p, t in self.targets.items()} }, merged={self.merged}"


def param_layers(model: nn.Module) -> list[tuple[str, ParamLayer]]:
    return [(n, m) for n, m in walk(model) if isinstance(m, ParamLayer)]


def module_wrappers(model: nn.Module) -> list[tuple[str, ModuleWrapper]]:
    """Every ParamLayer and lorakit.tokens wrapper (not descending into them)."""
    return [(n, m) for n, m in outer_modules(model) if isinstance(m, ModuleWrapper)]


def file_path(path: str, order: list[str], pname: str) -> str:
    """The module path PEFT saves parameter `pname`'s A and B under, for an adapter targeting
    the parameters `order` (the module's registration order) of the module at `path`."""
    return path + ".base_layer" * (len(order) - 1 - order.index(pname))


def outer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module, not descending into lorakit's wrappers (a wrapper's path
    stands for the module it wraps)."""
    inside: list[str] = []
    for path, module in walk(model):
        if inside and any(path.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, ModuleWrapper):
            inside.append(path)
        yield path, module


def holder(module: nn.Module) -> nn.Module:
    """The module whose own parameters a path stands for (a wrapper's wrapped module)."""
    if isinstance(module, (ModuleWrapper, LoraLayer)):
        return module.base_layer
    if isinstance(module, ModulesToSave):
        return module.original_module
    return module


def find_parameter_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """(module path, parameter name) of every parameter `config.target_parameters` names, in
    model order and, per module, registration order. Pure; TargetError if none matches."""
    wanted = set(config.target_parameters or ())
    if not wanted:
        return []
    found = []
    for pname in model._parameters:
        if suffix_match(pname, wanted):
            raise TargetError(f"target_parameters: {pname!r} is a parameter of the top-level module, which cannot "
                              "be wrapped (as in PEFT); target parameters of its submodules")
    for path, module in outer_modules(model):
        base = holder(module)
        for pname, p in base._parameters.items():
            key = f"{path}.{pname}"
            if p is None or not suffix_match(key, wanted):
                continue
            if base is not module and not isinstance(module, ParamLayer):
                raise TargetError(f"target_parameters: {key!r} belongs to a module that already carries "
                                  f"{type(module).__name__} adapters; a module is adapted either through its "
                                  "parameters or as a module, not both (as in PEFT)")
            if p.dim() not in (2, 3) or not p.is_floating_point():
                raise TargetError(f"target_parameters: {key!r} has shape {tuple(p.shape)} and dtype {p.dtype}; "
                                  "LoRA on a parameter needs a 2-D or 3-D floating-point one (as in PEFT)")
            found.append((path, pname))
    if not found:
        names = [f"{path}.{p}" for path, m in outer_modules(model) for p, t in holder(m)._parameters.items()
                 if t is not None and t.dim() == 3]
        raise TargetError(f"target_parameters {config.target_parameters!r} match no parameter of {type(model).__name__}"
                          + (f"; 3-D parameters include {names[:4]}" if names else ""))
    return found


def by_module(targets: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{module path: its targeted parameter names in registration order} from find_parameter_targets."""
    out: dict[str, list[str]] = {}
    for path, pname in targets:
        out.setdefault(path, []).append(pname)
    return out


def wrap_params(model: nn.Module, path: str, state: LoraState) -> ParamLayer:
    """The ParamLayer at `path`, wrapping the module there first if needed (in its train/eval mode)."""
    module = model.get_submodule(path)
    if isinstance(module, ParamLayer):
        return module
    layer = ParamLayer(module, state).train(module.training)
    replace_module(model, path, layer)
    return layer


def shared_elsewhere(model: nn.Module, layer: ParamLayer, path: str, pname: str) -> list[str]:
    """Other names of the parameter (tied weights): merging into it would change them too."""
    p = layer.base_layer._parameters[pname]
    return [n for n, q in model.named_parameters(remove_duplicate=False)
            if q is p and not n.startswith(path + ".")]


def split_targets(model: nn.Module, names: list[str]) -> tuple[list[str], list[str]]:
    """(module names, parameter names) of a mixed list such as `lorakit train --targets`: an entry
    that names no module (exact path or dotted suffix) but some parameter (PEFT's target_parameters
    rule, e.g. "mlp.experts.gate_up_proj") is a parameter target; every other entry stays a module
    target (and inject reports those that match nothing)."""
    paths = [path for path, _ in outer_modules(model)]
    keys = [f"{path}.{p}" for path, m in outer_modules(model) for p, t in holder(m)._parameters.items() if t is not None]
    modules, params = [], []
    for name in names:
        names_module = any(p == name or p.endswith("." + name) for p in paths)
        names_param = any(suffix_match(k, {name}) for k in keys)
        (params if names_param and not names_module else modules).append(name)
    return modules, params
