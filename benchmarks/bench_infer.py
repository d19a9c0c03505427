"""Inference: unmerged LoRA forward vs the base model, against the FLOP limit; merged vs base.

FLOP limit: per targeted layer and token LoRA adds 2r(d_in + d_out) FLOPs to the layer's
2·d_in·d_out. The limit ratio is (base FLOPs + LoRA FLOPs) / base FLOPs for the whole model
(attention score FLOPs included); the goal is measured overhead <= 1.5x the limit's overhead.
"unmerged" is the adapter path itself; "lorakit" is the default forward, which for a no-grad pass
over this many tokens (512 > in*out/(in+out)) merges dW into W on the fly instead.
--dtype bfloat16: the base in bf16 (the adapters' master weights float32, their matmuls bf16);
results go to inference_bf16.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import torch

from benchmarks.common import (bar_plot, build_model, environment, interleaved, median, round_ratio, targets_for,
                               unmerged, write_results)

BATCH, SEQ = 4, 128


def model_flops_per_token(model, seq: int) -> float:
    """2 x (weights of every matmul, lm_head included) + attention scores and mixing (4·T·d per layer)."""
    from transformers.pytorch_utils import Conv1D

    total = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)):
            total += 2 * m.weight.numel()
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    return total + layers * 4 * seq * hidden


def lora_flops_per_token(model, r: int) -> float:
    import lorakit as lk

    return sum(2 * r * (layer.in_features + layer.out_features)
               for layer in model.modules() if isinstance(layer, lk.LoraLayer))


def unmerged_forward(model, batch):
    with unmerged(model):
        return model(input_ids=batch).logits


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", default=None)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    import lorakit as lk
    from peft import LoraConfig, get_peft_model

    size = args.size or ("full" if args.device.startswith("cuda") else "small")
    rows = []
    for model_name in (["llama"] if args.quick else ["llama", "gpt2"]):
        base = build_model(model_name, size, device=args.device, dtype=dtype).eval()
        batch = torch.randint(0, 16000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)).to(args.device)
        for r, targets in [(8, "attention"), (16, "all-linear")]:
            ours = copy.deepcopy(base)
            lk.inject(ours, lk.LoraConfig(r=r, alpha=2 * r, targets=targets_for(model_name, targets), init=False))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
                    r=r, lora_alpha=2 * r, target_modules=targets_for(model_name, targets), init_lora_weights=False))
            merged = copy.deepcopy(ours)
            lk.merge(merged)
            fns = {name: (lambda m=m: m(input_ids=batch).logits) for name, m in
                   (("base", base), ("lorakit", ours), ("peft", theirs.eval()), ("lorakit_merged", merged))}
            fns["lorakit_unmerged"] = lambda: unmerged_forward(ours, batch)
            with torch.inference_mode():
                t = interleaved(fns, args.reps, warmup=1, device=args.device)
            base_f = model_flops_per_token(base, SEQ)
            extra_f = lora_flops_per_token(ours, r)
            limit_overhead = extra_f / base_f
            row = {"model": model_name, "dtype": args.dtype, "r": r, "targets": targets,
                   "base_s": median(t["base"]), "lorakit_s": median(t["lorakit"]), "peft_s": median(t["peft"]),
                   "merged_s": median(t["lorakit_merged"]), "unmerged_s": median(t["lorakit_unmerged"]),
                   "flop_limit_ratio": 1 + limit_overhead}
            # medians of per-round ratios: the rounds' common slow drifts cancel
            row["lorakit_ratio"] = round_ratio(t, "lorakit", "base")
            row["unmerged_ratio"] = round_ratio(t, "lorakit_unmerged", "base")
            row["peft_ratio"] = round_ratio(t, "peft", "base")
            row["merged_ratio"] = round_ratio(t, "lorakit_merged", "base")
            row["overhead_vs_limit"] = (row["unmerged_ratio"] - 1) / limit_overhead
            row["default_overhead_vs_limit"] = (row["lorakit_ratio"] - 1) / limit_overhead
            row["peft_overhead_vs_limit"] = (row["peft_ratio"] - 1) / limit_overhead
            rows.append(row)
            print(json.dumps(row), flush=True)
    goals = {"unmerged overhead <= 1.5x FLOP limit": all(r["overhead_vs_limit"] <= 1.5 for r in rows),
             "merged == base within 3%": all(abs(r["merged_ratio"] - 1) <= 0.03 for r in rows)}
    suffix = ("" if args.device == "cpu" else "_gpu") + ("_bf16" if args.dtype == "bfloat16" else "")
    payload = {"environment": environment(args.device, args.threads), "size": size, "dtype": args.dtype,
               "batch": [BATCH, SEQ],
               "rows": rows, "goals": goals}
    stem = write_results("inference", payload, rows, suffix)
    labels = [f"{r['model']} r{r['r']} {r['targets']}" for r in rows]
    bar_plot(stem.with_suffix(".png"), labels, {
        "FLOP limit": [r["flop_limit_ratio"] for r in rows], "lorakit unmerged": [r["unmerged_ratio"] for r in rows],
        "lorakit default": [r["lorakit_ratio"] for r in rows],
        "PEFT unmerged": [r["peft_ratio"] for r in rows], "lorakit merged": [r["merged_ratio"] for r in rows]},
        f"forward time / base ({args.device}, {args.dtype}, {args.threads} threads)", "ratio to base", hline=1.0)
    print(json.dumps(goals))


if __name__ == "__main__":
    main()
