"""Scores, peak memory and the loss plot of a training run."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any, Sequence

from ..files import write_file_atomic


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    return sum(p == g for p, g in zip(pred, gold)) / len(gold) if gold else 0.0


def macro_f1(pred: Sequence[int], gold: Sequence[int], n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions."""
    scores = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


# ---- peak memory ----------------------------------------------------------------------------
# Why resident set size: torch allocates CPU tensors with its own allocator (tracemalloc does not
# see them) and keeps no CPU peak statistics, so the honest figure is what the OS counts. Linux
# keeps the peak RSS (VmHWM) per process and lets a process reset it (/proc/self/clear_refs, "5"),
# which gives the peak of the training phase alone: model weights + activations + gradients +
# optimizer state. Elsewhere we fall back to getrusage's whole-process peak.
def reset_peak_memory() -> str:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "peak RSS during training (Linux VmHWM, reset before training)"
    except OSError:
        return "peak RSS of the whole process (getrusage ru_maxrss)"


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MB, or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_memory_mb() -> float:
    mb = _status_mb("VmHWM")
    if mb is not None:
        return mb
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    mb = _status_mb("VmRSS")
    return mb if mb is not None else peak_memory_mb()


# ---- files ----------------------------------------------------------------------------------
def write_json_atomic(path: str | Path, data: Any) -> None:
    write_file_atomic(Path(path), lambda p: p.write_text(json.dumps(data, indent=2)))


def save_figure_atomic(fig: Any, path: str | Path) -> None:
    write_file_atomic(Path(path), lambda p: fig.savefig(p, dpi=110, bbox_inches="tight"))


def smooth(values: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_loss(metrics: dict[str, Any], path: str | Path) -> None:
    """Training loss per step (raw and smoothed), eval loss and the main eval score per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in metrics["loss_history"]]
    losses = [v for _, v in metrics["loss_history"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train loss")
    ax.plot(steps, smooth(losses, max(1, len(losses) // 20)), color="tab:blue", lw=2, label="train loss (smoothed)")
    evals = [e for e in metrics["epochs"] if e.get("eval")]
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval"]["loss"] for e in evals], "o-", color="tab:red", label="eval loss")
        key = "accuracy" if metrics["task"] == "classification" else "exact_match"
        scores = [e["eval"].get(key) for e in evals]
        if all(s is not None for s in scores):
            ax2 = ax.twinx()
            ax2.plot([e["step"] for e in evals], scores, "s--", color="tab:green", label=f"eval {key}")
            ax2.set_ylim(0, 1.02)
            ax2.set_ylabel(key.replace("_", " "))
            ax2.legend(loc="center right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{metrics['mode']} {metrics['task']}: {Path(str(metrics['model'])).name}")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    save_figure_atomic(fig, path)
    plt.close(fig)


def same_answer(generated: str, gold: str) -> bool:
    """Exact match after normalising case, surrounding whitespace and trailing punctuation
    ("Sports." == "sports"), as SQuAD-style exact match does."""
    def norm(t: str) -> str:
        return " ".join(t.strip().strip(".,;:!?\"'").lower().split())
    return norm(generated) == norm(gold)
