"""`lorakit inspect DIR`: what an adapter folder holds, without loading any model.

Prints the config, the targeted modules with their ranks and scalings, the parameter count, and
per layer the singular values of dW = s * B @ A and its effective rank (Roy & Vetterli: exp of the
entropy of the normalised singular values; r means all directions are used equally, 1 means one
dominates). Writes a PNG of the spectra. `--json` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from lorakit.core import scaling
from lorakit.errors import LoraError
from lorakit.files import write_file_atomic
from lorakit.io import read_adapter
from lorakit.progress import progress_bar
from lorakit.variants import extra_keys

_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<which>lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                  r"lora_embedding_B|" + "|".join(map(re.escape, extra_keys())) + ")$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--plot", default=None, help="PNG to write (default: inspect-<folder name>.png here)")
    p.add_argument("--no-plot", action="store_true", help="do not write a PNG")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@dataclass
class LayerInfo:
    path: str
    rank: int
    scaling: float
    shape: tuple[int, int]  # dW as (out x in)
    singular_values: list[float]
    effective_rank: float
    dora: bool


def spectrum(A: Tensor, B: Tensor, s: float) -> Tensor:
    """Singular values of s * B @ A (out x in) from two thin QRs and an r x r SVD: the same
    numbers as svdvals of the dense dW, at O((in + out) r^2) cost instead of O(out * in * min)."""
    _, Rb = torch.linalg.qr(B.double())
    _, Ra = torch.linalg.qr(A.double().T)
    return torch.linalg.svdvals(Rb @ Ra.T).mul(abs(s)).float()


def effective_rank(sv: Tensor) -> float:
    total = sv.sum()
    if total <= 0:
        return 0.0
    p = sv / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def inspect_adapter(folder: str | os.PathLike) -> dict:
    """The report as a dict (config, layers, counts)."""
    config, tensors = read_adapter(folder)
    parts: dict[str, dict[str, Tensor]] = {}
    other = 0
    extras = extra_keys()
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m:  # a variant's keys stay whole ("lora_B.bias" is not lora_B)
            which = m["which"] if m["which"] in extras else m["which"].split(".")[0].replace("embedding_", "")
            parts.setdefault(m["path"], {})[which] = t
        else:
            other += t.numel()
    layers = []
    for path in progress_bar(sorted(parts, key=_natural), "spectra", None):
        d = parts[path]
        if "lora_A" not in d or "lora_B" not in d:
            continue
        A = d["lora_A"].float()
        r = A.shape[0]
        A = A.reshape(r, -1)
        B = d["lora_B"].float().reshape(d["lora_B"].shape[0], r)
        s = scaling(config.alpha_for(path), config.rank_for(path), config.rslora)
        sv = spectrum(A, B, s)
        layers.append(LayerInfo(path, r, s, (B.shape[0], A.shape[1]), sv.tolist(), effective_rank(sv),
                                any(k in d for k, v in extras.items() if v.name == "dora")))
    cfg = {f.name: getattr(config, f.name) for f in fields(config)}
    return {
        "folder": str(folder),
        "config": cfg,
        "targets": [l.path for l in layers],
        "ranks": sorted({l.rank for l in layers}),
        "parameters": sum(t.numel() for t in tensors.values()),
        "other_parameters": other,  # modules_to_save copies, biases
        "layers": [asdict(l) for l in layers],
    }


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def plot(report: dict, out: str | os.PathLike) -> Path:
    """Two panels: normalised singular values per layer, and effective rank vs rank per layer."""
    try:
        import matplotlib
    except ImportError:
        raise LoraError("the plot needs matplotlib: pip install 'lorakit[train]' (or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, l in enumerate(layers):
        sv = l["singular_values"]
        top = sv[0] if sv and sv[0] > 0 else 1.0
        ax1.plot(range(1, len(sv) + 1), [v / top for v in sv], marker=".", lw=1,
                 color=cmap(i / max(1, len(layers) - 1)), label=l["path"] if len(layers) <= 8 else None)
    ax1.set_yscale("log")
    ax1.set_xlabel("index i")
    ax1.set_ylabel("sigma_i / sigma_1")
    ax1.set_title("singular values of dW per layer (colour: depth)")
    if len(layers) <= 8:
        ax1.legend(fontsize=6)
    x = range(len(layers))
    ax2.bar(x, [l["rank"] for l in layers], color="#ddd", label="rank r")
    ax2.bar(x, [l["effective_rank"] for l in layers], color="#3a7", label="effective rank")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels([_short(l["path"]) for l in layers], rotation=90, fontsize=6)
    ax2.set_title("effective rank per layer")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{Path(report['folder']).name}: {report['parameters']:,} parameters, "
                 f"{len(layers)} layers", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_file_atomic(out, lambda p: fig.savefig(p, dpi=110))
    finally:
        plt.close(fig)
    return out


def _short(path: str) -> str:
    parts = path.split(".")
    nums = [p for p in parts if p.isdigit()]
    return ".".join(nums[-1:] + parts[-1:])


def format_report(report: dict) -> str:
    cfg = report["config"]
    keys = ("r", "alpha", "rslora", "use_dora", "init", "dropout", "targets", "rank_pattern",
            "alpha_pattern", "layers_to_transform", "modules_to_save", "bias", "base_model_name_or_path")
    lines = [f"adapter {report['folder']}"]
    lines += [f"  {k:<24} {cfg[k]!r}" for k in keys if k in cfg]
    lines.append(f"  parameters               {report['parameters']:,}"
                 + (f" ({report['other_parameters']:,} outside A/B)" if report["other_parameters"] else ""))
    lines.append(f"  layers                   {len(report['layers'])}, ranks {report['ranks']}")
    width = max([len(l["path"]) for l in report["layers"]] + [5])
    lines.append(f"\n  {'layer':<{width}}  {'r':>3}  {'scale':>6}  {'eff.rank':>8}  top singular values of dW")
    for l in report["layers"]:
        sv = ", ".join(f"{v:.3g}" for v in l["singular_values"][:6])
        more = ", ..." if len(l["singular_values"]) > 6 else ""
        tag = " (DoRA)" if l["dora"] else ""
        lines.append(f"  {l['path']:<{width}}  {l['rank']:>3}  {l['scaling']:>6.3g}  "
                     f"{l['effective_rank']:>8.2f}  [{sv}{more}]{tag}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = inspect_adapter(args.dir)
    if not args.no_plot:
        name = Path(args.dir).resolve().name or "adapter"
        report["plot"] = str(plot(report, args.plot or f"inspect-{name}.png"))
    if args.json:
        print(json.dumps(report, indent=1, default=_jsonable))
    else:
        print(format_report(report))
        if "plot" in report:
            print(f"\n  plot: {report['plot']}")
    return 0


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)
