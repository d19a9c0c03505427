"""LoRA on a quantized frozen base (QLoRA): the base weight stays 4-bit or 8-bit, A and B train in float32.

Three kinds of quantized linear layer join the kinds table (string keys, so importing lorakit
imports neither bitsandbytes nor torchao):

  bitsandbytes Linear4bit (NF4/FP4)   what transformers builds for BitsAndBytesConfig(load_in_4bit=True)
  bitsandbytes Linear8bitLt (LLM.int8) BitsAndBytesConfig(load_in_8bit=True)
  torchao Int8Tensor weights           quantize_(model, Int8WeightOnlyConfig()) (and int8 dynamic):
                                       the module stays nn.Linear, so the kind is keyed by the
                                       weight's class (kinds.kind_of looks there first)

For each, the base forward is the quantized module's own; x meets A with a plain F.linear; the
(out x in) `matrix` is the dequantized weight (a float copy, not a view) and `write` re-quantizes.

Merging, two ways (pick by what you need):
  * `lorakit.merge(model)` in place: dequantize W, add s*B@A in float32, re-quantize with the
    layer's own scheme. The base stays small, but the sum is rounded to the 4/8-bit grid, which
    is coarse next to a LoRA update: `MergeReport.max_abs_error` is that requantization error
    (max |dequant(stored) - (W + dW)|). `unmerge` subtracts dW and requantizes again (drifts);
    with keep_original=True it puts the original quantized weight back exactly.
  * Dense export, no requantization: `dequantize(model)` turns every quantized layer into a plain
    nn.Linear (LoRA wrappers stay), `unload(model, merge=True)` merges in float32 and rounds once
    into the weight dtype, and `model.to(torch.bfloat16).save_pretrained(dir)` writes an ordinary
    bf16 checkpoint (what `lorakit` recommends for sharing a QLoRA result).
`merged_state_dict` refuses a quantized base (its keys mix packed data and quantization state).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from . import kinds
from .errors import LoraError
from .layer import LoraLayer

QUANTIZE = {
    "nf4": "bitsandbytes 4-bit NormalFloat (QLoRA), Linear4bit",
    "fp4": "bitsandbytes 4-bit float, Linear4bit",
    "int8": "bitsandbytes LLM.int8 (8-bit weights, int8 matmul with fp16 outliers), Linear8bitLt",
    "int8-wo": "torchao int8 weight-only, per output row (activations stay float)",
}
LIBRARY = {"nf4": "bitsandbytes", "fp4": "bitsandbytes", "int8": "bitsandbytes", "int8-wo": "torchao"}  # what each needs


def _linear_dims(m: nn.Module) -> tuple[int, int]:
    return m.in_features, m.out_features


# ---- bitsandbytes Linear4bit ---------------------------------------------------------------------
def _bnb4_unpack(m: nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU inference kernel on the first
    eval forward; dequantize_4bit only reads the canonical layout, so undo it (as bnb's own
    state_dict does). The next eval forward repacks."""
    w = m.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        m.quant_state = w.quant_state


def _bnb4_matrix(m: nn.Module) -> Tensor:
    from bitsandbytes.functional import dequantize_4bit

    _bnb4_unpack(m)
    return dequantize_4bit(m.weight.data, m.weight.quant_state)


def _bnb4_write(m: nn.Module, value: Tensor) -> None:
    """Quantize `value` (out x in) with the layer's own settings, or put back a weight object the
    layer held before (unmerge with keep_original). Always a new object: the old one stays intact."""
    from bitsandbytes.nn import Params4bit

    w = m.weight
    if not isinstance(value, Params4bit):
        value = Params4bit(value.detach().contiguous().cpu(), requires_grad=False, blocksize=w.blocksize,
                           compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                           quant_storage=w.quant_storage, module=m)._quantize(w.device)
    m.weight = value
    m.quant_state = value.quant_state


def _bnb4_check(m: nn.Module) -> str | None:
    if getattr(m.weight, "quant_state", None) is None:
        return "its 4-bit weight is not quantized yet (move the layer to a device first: bitsandbytes quantizes on .to())"
    return None


# ---- bitsandbytes Linear8bitLt ---------------------------------------------------------------------
def _bnb8_scales(m: nn.Module) -> Tensor:
    # Int8Params carry their row scales (SCB) until the first forward moves them onto m.state.
    scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
    if scb is None:
        raise LoraError(f"{type(m).__name__}: 8-bit weight has no scales (not quantized yet?)")
    return scb


def _bnb8_matrix(m: nn.Module) -> Tensor:
    from bitsandbytes.functional import int8_vectorwise_dequant

    return int8_vectorwise_dequant(m.weight.data, _bnb8_scales(m))


def _bnb8_write(m: nn.Module, value: Tensor) -> None:
    from bitsandbytes.nn import Int8Params

    old = m.weight
    if old.SCB is None:  # give the outgoing weight its scales back, so it can be put back as is
        old.CB, old.SCB = old.data, m.state.SCB
    if not isinstance(value, Int8Params):
        value = Int8Params(value.detach().float().cpu(), requires_grad=False, has_fp16_weights=False).to(old.device)
    m.weight = value
    m.state.reset_grads()  # the next forward takes CB/SCB from the new weight


def _bnb8_check(m: nn.Module) -> str | None:
    if m.state.has_fp16_weights:
        return "Linear8bitLt with has_fp16_weights=True keeps a float weight that trains; LoRA needs a frozen int8 base"
    if m.weight.dtype != torch.int8:
        return "its 8-bit weight is not quantized yet (move the layer to a device first)"
    return None


# ---- torchao Int8Tensor weights --------------------------------------------------------------------
def _ao_matrix(m: nn.Module) -> Tensor:
    return m.weight.dequantize()


def _ao_granularity(w: Any):
    from torchao.quantization import PerGroup, PerRow, PerTensor

    block = list(w.block_size)
    if block == list(w.shape):
        return PerTensor()
    if block[-1] == w.shape[-1]:
        return PerRow()
    return PerGroup(block[-1])


def _ao_write(m: nn.Module, value: Tensor) -> None:
    from torchao.quantization.quant_primitives import MappingType

    w = m.weight
    if type(value) is not type(w):
        asym = w.zero_point is not None and bool(w.zero_point.any())
        value = type(w).from_hp(value.detach().to(w.dtype), _ao_granularity(w),
                                mapping_type=MappingType.ASYMMETRIC if asym else MappingType.SYMMETRIC,
                                act_quant_kwargs=w.act_quant_kwargs, reduce_range=w.reduce_range)
    m.weight = nn.Parameter(value, requires_grad=False)


def _ao_check(m: nn.Module) -> str | None:
    if not isinstance(m, nn.Linear) or m.weight.dim() != 2:
        return f"torchao int8 weights are supported on nn.Linear only, not {type(m).__name__} {tuple(m.weight.shape)}"
    return None


def _quantized_kind(name: str, matrix, write, check) -> kinds.Kind:
    return kinds.Kind(
        name=name,
        dims=_linear_dims,
        matrix=matrix,
        meets="matmul",  # x meets A by a plain matmul: the fused and batched paths apply
        a_shape=lambda m, r: (r, m.in_features),
        b_shape=lambda m, r: (m.out_features, r),
        write=write,
        check=check,
    )


BNB_4BIT = _quantized_kind("bnb_4bit", _bnb4_matrix, _bnb4_write, _bnb4_check)
BNB_8BIT = _quantized_kind("bnb_8bit", _bnb8_matrix, _bnb8_write, _bnb8_check)
TORCHAO_INT8 = _quantized_kind("torchao_int8", _ao_matrix, _ao_write, _ao_check)
QUANTIZED_KINDS = (BNB_4BIT, BNB_8BIT, TORCHAO_INT8)

kinds.register("bitsandbytes.nn.modules.Linear4bit", BNB_4BIT)
kinds.register("bitsandbytes.nn.modules.Linear8bitLt", BNB_8BIT)
kinds.register("torchao.quantization.Int8Tensor", TORCHAO_INT8)  # torchao sets __module__ to its public path


def is_quantized(module: nn.Module) -> bool:
    return kinds.kind_of(module) in QUANTIZED_KINDS


# ---- loading and exporting -------------------------------------------------------------------------
# Task heads stay dense: small, often tied to the embeddings or freshly initialised and trained.
HEADS = ("lm_head", "classifier", "score")


def load_quantized(path: str | os.PathLike, quantize: str = "nf4", *, dtype: torch.dtype = torch.float32,
                   double_quant: bool = False, model_class: Any = None, device: str = "cpu",
                   skip: Sequence[str] = HEADS, cpu_bf16_kernel: bool = False, **kwargs: Any) -> Any:
    """A transformers model from `path` with its linear layers quantized, but the modules named in
    `skip` (names or dotted-path suffixes; by default the task heads). Extra kwargs go to
    `from_pretrained` (with output_loading_info=True the (model, info) pair comes back).

    quantize: "nf4" / "fp4" (bitsandbytes 4-bit, computing in `dtype`), "int8" (bitsandbytes
    LLM.int8), "int8-wo" (torchao int8 weight-only). Works on CPU. `dtype` is the precision of
    everything left unquantized (norms, embeddings, head) and of the 4-bit compute; bfloat16 halves
    those. Then `inject` as usual: the LoRA layers sit on the quantized modules.

    cpu_bf16_kernel=False turns off bitsandbytes' AVX512-BF16 CPU inference kernel (4-bit): on its
    first eval/no-grad forward it repacks the weight in place, rounds the scales to bf16 and
    computes in bf16 (outputs off by ~1e-2 relative), and from then on the layer cannot train
    (its forward raises in backward-enabled mode). Off, every forward dequantizes exactly.
    """
    if quantize not in QUANTIZE:
        raise LoraError(f"quantize={quantize!r}: choose one of {sorted(QUANTIZE)}")
    try:
        if quantize == "int8-wo":
            import torchao  # noqa: F401
        else:
            import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise LoraError(f"quantize={quantize!r} needs {e.name}: pip install 'lorakit[quant]'") from e
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cls = model_class or AutoModelForCausalLM
    if quantize == "int8-wo":
        out = cls.from_pretrained(path, dtype=dtype, device_map=device, **kwargs)
        quantize_int8_wo(out[0] if isinstance(out, tuple) else out, skip)
        return out
    if quantize == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip))
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=dtype,
                                bnb_4bit_use_double_quant=double_quant, llm_int8_skip_modules=list(skip))
    out = cls.from_pretrained(path, quantization_config=qc, dtype=dtype, device_map=device, **kwargs)
    if not cpu_bf16_kernel:
        for module in (out[0] if isinstance(out, tuple) else out).modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return out


def quantize_int8_wo(model: nn.Module, skip: Sequence[str] = HEADS) -> nn.Module:
    """torchao int8 weight-only quantization of every nn.Linear but the output head and `skip`, in place."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None

    def wanted(m: nn.Module, fqn: str) -> bool:
        return type(m) is nn.Linear and m is not head and not any(fqn == s or fqn.endswith("." + s) for s in skip)

    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=wanted)
    return model


@torch.no_grad()
def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized linear (also under LoRA wrappers) by a plain nn.Linear, in place;
    `dtype` defaults to the model's (transformers' `model.dtype`), so it keeps running as is.
    For exporting: then `unload(model, merge=True)` and `save_pretrained` give an ordinary
    checkpoint whose only rounding is the one into the weight dtype (no requantization)."""
    dtype = dtype or getattr(model, "dtype", None) or torch.float32
    for path, module in list(model.named_modules()):
        kind = kinds.kind_of(module)
        if kind not in QUANTIZED_KINDS:
            continue
        w = kind.matrix(module)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          dtype=dtype, device=w.device)
        dense.weight.copy_(w)
        if module.bias is not None:
            dense.bias.copy_(module.bias.to(dtype))
        dense.requires_grad_(False)
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, dense)
        if isinstance(parent, LoraLayer):  # its merges now go through the plain linear kind
            parent.kind = kinds.kind_of(dense)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # so save_pretrained writes a plain config
        quantizer.remove_quantization_config(model)
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers as stored (packed 4-bit, int8 + scales),
    each tensor counted once."""
    seen: dict[int, int] = {}

    def add(t: Tensor | None) -> None:
        if t is None or not isinstance(t, Tensor):
            return
        inner = [getattr(t, n, None) for n in getattr(t, "tensor_data_names", [])]
        inner += [getattr(t, n, None) for n in getattr(t, "optional_tensor_data_names", [])]
        if any(isinstance(i, Tensor) for i in inner):  # torchao subclass: count its data tensors
            for i in inner:
                add(i)
            return
        seen[t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)] = t.untyped_storage().nbytes()
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            for v in qs.as_dict(packed=True).values():
                add(v)
        add(getattr(t, "SCB", None))

    for p in model.parameters():
        add(p)
    for b in model.buffers():
        add(b)
    for m in model.modules():
        add(getattr(getattr(m, "state", None), "SCB", None))
    return sum(seen.values())
