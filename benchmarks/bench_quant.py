"""QLoRA: SmolLM2-135M fine-tuning memory and step time on a quantized vs a dense base.

Variants (LoRA: r=16, alpha=32 on every linear layer but the head; AdamW):
  full-fp32     full fine-tuning, fp32 weights
  lora-fp32     LoRA on an fp32 base
  lora-bf16     LoRA on a bf16 base (adapters fp32)
  qlora-nf4     LoRA on a bitsandbytes NF4 base, bf16 compute and bf16 for the rest (QLoRA recipe)
  lora-int8     LoRA on a bitsandbytes LLM.int8 base, rest bf16
  lora-int8-wo  LoRA on a torchao int8 weight-only base, rest bf16

Step time (forward + backward + AdamW) is measured in one process, interleaved and rotated, and
reported as medians and as ratios to lora-fp32. Memory is measured per variant in a fresh process:
the bytes the loaded model holds (packed 4-bit data and quantization state counted as stored), the
peak RSS of training steps above the loaded model (activations, gradients, optimizer state), and
the process's whole peak RSS (libraries and load-time copies included). Absolute CPU times on the shared 2-core machines are noisy: read the
ratios. Writes benchmarks/results/quant{,_gpu}.json, .md and .png.

    python -m benchmarks.bench_quant --threads 1 [--batch 4 --seq 128 --reps 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

from benchmarks.common import PeakMemory, environment, hwm_bytes, interleaved, median, run_probe, write_results
from benchmarks.common import train_step as step

VARIANTS: dict[str, dict] = {
    "full-fp32": dict(dtype="float32", full=True),
    "lora-fp32": dict(dtype="float32"),
    "lora-bf16": dict(dtype="bfloat16"),
    "qlora-nf4": dict(dtype="bfloat16", quantize="nf4"),
    "lora-int8": dict(dtype="bfloat16", quantize="int8"),
    "lora-int8-wo": dict(dtype="bfloat16", quantize="int8-wo"),
}
R = 16


def load(name: str, device: str):
    """(model, optimizer) for a variant, from the cached offline SmolLM2 copy."""
    from transformers import AutoModelForCausalLM

    import lorakit as lk
    from lorakit.models import model_path

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    spec = VARIANTS[name]
    dtype = getattr(torch, spec["dtype"])
    path = model_path("smollm2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "quantize" in spec:
            model = lk.load_quantized(path, spec["quantize"], dtype=dtype, device=device)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if spec.get("full"):
        params = list(model.parameters())
    else:
        lk.inject(model, lk.LoraConfig(r=R, alpha=2 * R, targets="all-linear"))
        params = lk.adapter_parameters(model)
    model.train()
    return model, torch.optim.AdamW(params, lr=1e-4)


def make_batch(batch: int, seq: int, device: str) -> torch.Tensor:
    return torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)


def probe(spec: dict) -> dict:
    """In a fresh process: model bytes, and peak memory of 2 training steps above the loaded model."""
    from lorakit.quant import model_bytes

    torch.set_num_threads(spec["threads"])
    model, opt = load(spec["variant"], spec["device"])
    weights = model_bytes(model)
    batch = make_batch(spec["batch"], spec["seq"], spec["device"])
    with PeakMemory(spec["device"]) as mem:
        losses = [step(model, opt, batch) for _ in range(2)]
    trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return {"weights_bytes": weights, "train_peak_bytes": mem.peak, "process_peak_bytes": hwm_bytes(),
            "trainable": trainable, "loss": losses[-1]}


def plot(path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(names))
    if "weights_MB" in rows[0]:
        a.bar([i - 0.2 for i in x], [r["weights_MB"] for r in rows], 0.4, label="model weights")
        a.bar([i + 0.2 for i in x], [r["train_peak_MB"] for r in rows], 0.4, label="training peak above model")
        a.set_ylabel("MB")
        a.legend()
    a.set_title("memory")
    b.bar(list(x), [r["step_s"] for r in rows], 0.6, color="tab:green")
    b.set_ylabel("seconds per step")
    b.set_title("step time (median)")
    for ax in (a, b):
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; reported)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return
    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    from tqdm import tqdm

    models = {n: load(n, args.device) for n in tqdm(names, desc="loading variants")}
    batch = make_batch(args.batch, args.seq, args.device)
    losses = {n: step(*models[n], batch) for n in names}  # every variant trains (and is warm)
    times = interleaved({n: (lambda n=n: step(*models[n], batch)) for n in names}, args.reps, warmup=0,
                        device=args.device)
    del models
    ref = median(times["lora-fp32"]) if "lora-fp32" in times else None
    rows = []
    for n in tqdm(names, desc="memory probes", disable=args.no_memory):
        row = {"variant": n, "step_s": median(times[n]), "loss": losses[n]}
        if ref:
            row["time_vs_lora_fp32"] = row["step_s"] / ref
        if not args.no_memory:
            spec = dict(variant=n, device=args.device, threads=args.threads, batch=args.batch, seq=args.seq)
            m = run_probe("benchmarks.bench_quant", spec, args.threads)
            row.update(weights_MB=m["weights_bytes"] / 2**20, train_peak_MB=m["train_peak_bytes"] / 2**20,
                       process_peak_MB=m["process_peak_bytes"] / 2**20, trainable=m["trainable"])
            row["working_MB"] = row["weights_MB"] + row["train_peak_MB"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.no_memory and "lora-fp32" in names:
        base = next(r for r in rows if r["variant"] == "lora-fp32")
        for r in rows:
            r["weights_vs_lora_fp32"] = r["weights_MB"] / base["weights_MB"]
    suffix = "" if args.device == "cpu" else "_gpu"
    payload = {"environment": environment(args.device, args.threads), "model": "SmolLM2-135M-Instruct",
               "batch": [args.batch, args.seq], "lora": {"r": R, "alpha": 2 * R, "targets": "all-linear"},
               "rows": rows, "times": times}
    stem = write_results("quant", payload, rows, suffix)
    plot(stem.with_suffix(".png"), rows,
         f"SmolLM2-135M fine-tuning, batch {args.batch}x{args.seq}, {args.device}, {args.threads} thread(s)")
    print(f"wrote {stem}.json/.md/.png")


if __name__ == "__main__":
    main()
