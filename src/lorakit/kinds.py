"""The table of base-module kinds LoRA can wrap: the one dispatch on layer types.

Each kind says, for its module type, how the weight looks as an (out x in) matrix, how the input
meets A (`meets`: a matmul, a lookup or a convolution), and how A and B are shaped in PEFT files.
Everything that depends on the layer type reads the kind: the layer's forward (the fused linear
node for "matmul" kinds), merging on the fly, mixed-adapter batches, the adapter bank's slots,
LoRA+'s embedding group. The LoRA math itself stays in `core`; adding a module type is one
`register()` call, never a new branch in the layer code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Kind:
    """How LoRA meets one type of base module.

    dims(m) -> (in, out): the sizes of the (out x in) matrix view of the weight.
    matrix(m) -> Tensor: that view. Plain kinds share storage with the weight, so merging writes
        through it; quantized kinds return a dequantized copy and store back through `write`.
    meets: how the input meets A. "matmul": h = x @ A.T (linear-like layers: the fused autograd
        node and the batched mixed-adapter path apply); "lookup": h = rows of A.T picked by the
        input ids (embeddings; batched too); "conv": A as a convolution kernel.
    project(m, x, A) -> h: the input meeting A (r x in), r channels at `channel_dim`; None: the
        standard one for `meets` (see `apply_a`).
    a_shape / b_shape(m, r): the shapes of lora_A / lora_B in PEFT's safetensors files.
    keys: the key suffixes of A and B in PEFT files.
    write(m, matrix): store a new weight given as the matrix view (quantized kinds re-quantize).
    """

    name: str
    dims: Callable[[nn.Module], tuple[int, int]]
    matrix: Callable[[nn.Module], Tensor]
    a_shape: Callable[[nn.Module, int], tuple[int, ...]]
    b_shape: Callable[[nn.Module, int], tuple[int, ...]]
    meets: str = "matmul"
    project: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None
    keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")
    channel_dim: int = -1
    linear_like: bool = True  # counted by targets="all-linear"
    uses_dropout: bool = True
    fan_in_fan_out: bool = False
    zero_a: bool = False  # start with A = 0 and B random (PEFT's rule for embeddings)
    plain_linear: bool = False  # the registered class's forward is exactly F.linear(x, matrix(m), m.bias)
    check: Callable[[nn.Module], str | None] | None = None  # reason it can't be wrapped, or None
    write: Callable[[nn.Module, Tensor], None] | None = None

    def __post_init__(self) -> None:
        if self.meets not in MEETS:
            raise ValueError(f"Kind {self.name!r}: meets={self.meets!r}, expected one of {MEETS}")

    def apply_a(self, module: nn.Module, x: Tensor, A: Tensor) -> Tensor:
        """h: the input meeting A (r x in), by the kind's `project` or the standard one."""
        return (self.project or _PROJECT[self.meets])(module, x, A)

    def store(self, module: nn.Module, m: Tensor) -> None:
        if self.write is not None:
            self.write(module, m)
        else:
            self.matrix(module).copy_(m)


MEETS = ("matmul", "lookup", "conv")


def _linear_project(m: nn.Module, x: Tensor, A: Tensor) -> Tensor:
    return F.linear(x, A)


def _embedding_project(m: nn.Embedding, x: Tensor, A: Tensor) -> Tensor:
    return F.embedding(x, A.T, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)


def _conv_project(m: nn.Module, x: Tensor, A: Tensor) -> Tensor:
    return m._conv_forward(x, A.view(A.shape[0], *m.weight.shape[1:]), None)


def _conv_check(m: nn.Module) -> str | None:
    return f"grouped convolution (groups={m.groups}) is not supported" if m.groups != 1 else None


def _conv_b_shape(m: nn.Module, r: int) -> tuple[int, ...]:
    return (m.weight.shape[0], r) + (1,) * (m.weight.dim() - 2)


_PROJECT = {"matmul": _linear_project, "lookup": _embedding_project, "conv": _conv_project}

LINEAR = Kind(
    name="linear",
    dims=lambda m: (m.weight.shape[1], m.weight.shape[0]),
    matrix=lambda m: m.weight,
    a_shape=lambda m, r: (r, m.weight.shape[1]),
    b_shape=lambda m, r: (m.weight.shape[0], r),
    plain_linear=True,
)
# transformers' GPT-2 Conv1D stores its weight as (in x out): PEFT's fan_in_fan_out.
CONV1D_HF = Kind(
    name="hf_conv1d",
    dims=lambda m: (m.weight.shape[0], m.weight.shape[1]),
    matrix=lambda m: m.weight.T,
    a_shape=lambda m, r: (r, m.weight.shape[0]),
    b_shape=lambda m, r: (m.weight.shape[1], r),
    fan_in_fan_out=True,
    plain_linear=True,
)
EMBEDDING = Kind(
    name="embedding",
    dims=lambda m: (m.weight.shape[0], m.weight.shape[1]),
    matrix=lambda m: m.weight.T,
    meets="lookup",
    a_shape=lambda m, r: (r, m.weight.shape[0]),
    b_shape=lambda m, r: (m.weight.shape[1], r),
    keys=("lora_embedding_A", "lora_embedding_B"),
    linear_like=False,
    uses_dropout=False,
    zero_a=True,
)
CONV = Kind(
    name="conv",
    dims=lambda m: (math.prod(m.weight.shape[1:]), m.weight.shape[0]),
    matrix=lambda m: m.weight.flatten(1),
    meets="conv",
    a_shape=lambda m, r: (r, *m.weight.shape[1:]),
    b_shape=_conv_b_shape,
    channel_dim=1,
    linear_like=False,
    check=_conv_check,
)

# Keys are classes or "module.QualName" strings, so optional libraries are never imported here.
KINDS: dict[type | str, Kind] = {
    nn.Linear: LINEAR,
    "transformers.pytorch_utils.Conv1D": CONV1D_HF,
    nn.Embedding: EMBEDDING,
    nn.Conv1d: CONV,
    nn.Conv2d: CONV,
    nn.Conv3d: CONV,
}


def register(key: type | str, kind: Kind) -> None:
    """Teach lorakit a new base-module type (e.g. a quantized linear)."""
    KINDS[key] = kind
    _CACHE.clear()


_CACHE: dict[tuple[type, type], tuple[Kind | None, bool]] = {}


def kind_of(module: nn.Module) -> Kind | None:
    """The kind for this module's class, looking up its MRO so subclasses inherit their parent's.

    The weight's class is looked up first: torchao quantizes by swapping an nn.Linear's weight
    for a tensor subclass, so the module's class alone would say "plain linear"."""
    return _entry(module)[0]


def plain_forward(module: nn.Module) -> bool:
    """Whether the module computes exactly F.linear(x, matrix, bias): its kind says so for the
    class it was registered for, and the module's class does not override that forward (a
    subclass with its own forward, or a quantized weight, must run its own code)."""
    return _entry(module)[1]


def _entry(module: nn.Module) -> tuple[Kind | None, bool]:
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    key = (type(module), type(weight))
    if key not in _CACHE:
        _CACHE[key] = _lookup(key)
    return _CACHE[key]


def _lookup(key: tuple[type, type]) -> tuple[Kind | None, bool]:
    module_type, weight_type = key
    weight_mro = weight_type.__mro__ if weight_type is not type(None) else ()
    for cls in (*weight_mro, *module_type.__mro__):
        kind = KINDS.get(cls) or KINDS.get(f"{cls.__module__}.{cls.__qualname__}")
        if kind is not None:
            own = cls in module_type.__mro__ and getattr(module_type, "forward", None) is getattr(cls, "forward", None)
            return kind, kind.plain_linear and own and weight_type in (type(None), nn.Parameter)
    return None, False


def supported_names() -> list[str]:
    return sorted(k if isinstance(k, str) else f"{k.__module__}.{k.__qualname__}" for k in KINDS)
