"""Which precision a run trains in, decided (and checked) before anything loads.

    auto  bf16 where the hardware runs it fast: a CUDA device that supports it, or a CPU with
          AMX-BF16 or AVX512-BF16 (a bf16 matmul ~3x faster than float32 there); else fp32
    fp32  everything in float32
    bf16  the base in bfloat16; LoRA's matmuls in bf16 (float32 accumulation), its master
          weights, gradients and optimizer state in float32 (lorakit.core.compute_dtype)
    fp16  the base in float16, the same split, and a loss scaler (torch.amp.GradScaler): fp16's
          range loses small gradients otherwise; for LoRA only (a float16 model cannot be the
          master copy of its own weights)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoraError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    why: str  # what decided it, for the log and metrics.json

    @property
    def dtype(self) -> str:
        return DTYPES[self.name]

    @property
    def needs_scaler(self) -> bool:
        return self.name == "fp16"


def cpu_bf16() -> str | None:
    """The CPU feature that makes bf16 fast here (AMX-BF16, AVX512-BF16, Arm BF16), or None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("bf16", "Arm BF16")):
        if flag in flags:
            return name
    return None


def bf16_hardware(device: torch.device) -> tuple[bool, str]:
    """(whether bf16 runs fast on `device`, the hardware in words)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "this machine (no CUDA)"
        # not torch.cuda.is_bf16_supported(): it says True for GPUs that only emulate bf16 (T4, V100)
        # and asks the current device, not this one
        return torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8, \
            torch.cuda.get_device_name(device)
    feature = cpu_bf16()
    return feature is not None, f"this CPU ({feature or 'no AMX-BF16, AVX512-BF16 or Arm BF16'})"


def resolve(choice: str, device: torch.device, full: bool = False) -> Precision:
    """The run's precision; a LoraError, before any loading, for a choice the hardware or the
    mode cannot honour."""
    if choice not in PRECISIONS:
        raise LoraError(f"--precision {choice!r}: expected one of {PRECISIONS}")
    if choice == "fp16" and full:
        raise LoraError("--precision fp16 with --full: a float16 model cannot hold its own master weights; "
                        "use bf16 or fp32")
    fast, hardware = bf16_hardware(device)
    if choice == "auto":
        return Precision("bf16", f"auto: bf16 runs fast on {hardware}") if fast else \
            Precision("fp32", f"auto: no fast bf16 on {hardware}")
    if choice == "bf16" and not fast:
        raise LoraError(f"--precision bf16: {hardware} has no fast bf16 (it would be emulated, slower than float32); "
                        "use --precision fp32 (or auto)")
    if choice == "fp16" and device.type == "cpu":
        raise LoraError("--precision fp16: CPUs have no fast float16 matmuls; use --precision bf16 or fp32")
    return Precision(choice, f"--precision {choice}")
