"""Where a training step's time goes: torch.profiler over one step of each setup, ops grouped.

Issue 14's setting by default: Llama-like, 4 layers, hidden 768, all-linear r=16, dropout 0,
batch 4x128, 1 thread. Setups, in one process and interleaved: full fine-tuning, the frozen-base
floor (no adapter, backward through every layer), lorakit, lorakit with its adapters' matmuls
forced to float32 (`set_compute_dtype(model, torch.float32)`: the path lorakit took on bf16 bases
before, every layer input copied to float32), and PEFT.

    python -m benchmarks.profile_step [--dtype bfloat16] [--steps 3]

Writes benchmarks/results/profile_<dtype>.{json,md}: per setup the step time and the self time
per step of each op group (matmuls, casts/copies, elementwise, norms, attention, optimizer, ...).
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from collections import defaultdict

import torch

from benchmarks.common import RESULTS, build_model, environment, interleaved, median, train_step

GROUPS = [  # (group, op-name fragments), first match wins
    ("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm")),
    ("cast / copy", ("_to_copy", "copy_", "to", "clone", "contiguous")),
    ("loss", ("cross_entropy", "nll", "log_softmax")),  # before attention: "softmax" is in both
    ("attention", ("scaled_dot_product", "attention", "softmax")),
    ("norm", ("rms", "layer_norm", "norm", "rsqrt", "pow", "mean")),
    ("dropout", ("dropout", "bernoulli", "rand", "keep_bits", "bitwise")),  # lorakit's mask: random_ + bit ops
    ("optimizer", ("adam", "foreach", "_fused")),
    ("elementwise", ("mul", "add", "sub", "div", "silu", "neg", "cat", "where", "sum", "fill", "zero", "exp", "cos", "sin")),
]


def group_of(name: str) -> str:
    op = name.split("::")[-1].lower()
    for group, frags in GROUPS:
        if any(f in op for f in frags):
            return group
    return "other"


def setups(dtype: torch.dtype, r: int, targets: str, dropout: float = 0.0):
    import lorakit as lk
    from peft import LoraConfig, get_peft_model

    base = build_model("llama", "small", dtype=dtype)
    out = {}
    full = copy.deepcopy(base)
    out["full"] = (full, torch.optim.AdamW(full.parameters(), lr=1e-5))
    frozen = copy.deepcopy(base).requires_grad_(False)
    # backward runs through every layer (the embedding's output requires grad, not its weight: no
    # vocab x hidden gradient, the same floor as bench_train's)
    frozen.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    out["frozen floor"] = (frozen, None)
    for name, compute in (("lorakit", "auto"), ("lorakit, fp32 adapter matmuls", torch.float32)):
        m = copy.deepcopy(base)
        lk.inject(m, lk.LoraConfig(r=r, alpha=2 * r, targets=targets, dropout=dropout, init=False))
        lk.set_compute_dtype(m, compute)
        out[name] = (m, torch.optim.AdamW(lk.adapter_parameters(m), lr=1e-4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                           lora_dropout=dropout, init_lora_weights=False))
    out["peft"] = (p, torch.optim.AdamW([q for q in p.parameters() if q.requires_grad], lr=1e-4))
    return out


class _NoOpt:
    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per setup")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per setup (interleaved)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    models = setups(dtype, args.r, args.targets, args.dropout)
    batch = torch.randint(0, 16000, (4, 128), generator=torch.Generator().manual_seed(0))
    fns = {n: (lambda m=m, o=o: train_step(m, o or _NoOpt(), batch)) for n, (m, o) in models.items()}
    times = interleaved(fns, args.reps, warmup=1)
    report = {}
    for name, fn in fns.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                fn()
        groups: dict[str, float] = defaultdict(float)
        ops: dict[str, float] = defaultdict(float)
        for ev in prof.key_averages():
            if ev.self_cpu_time_total <= 0 or ev.key.startswith("ProfilerStep"):
                continue
            ms = ev.self_cpu_time_total / 1e3 / args.steps
            ops[ev.key] += ms
            groups[group_of(ev.key)] += ms
        report[name] = {"step_s": median(times[name]), "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
                        "top_ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:12])}
        print(name, json.dumps({k: round(v, 1) for k, v in report[name]["groups_ms"].items()}), flush=True)
    full = report["full"]["step_s"]
    for r in report.values():
        r["vs_full"] = r["step_s"] / full
    payload = {"environment": environment("cpu", args.threads), "dtype": args.dtype, "r": args.r,
               "targets": args.targets, "batch": [4, 128], "setups": report}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / (f"profile_{args.dtype}" + (f"_dropout{args.dropout:g}".replace(".", "p") if args.dropout else ""))
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    names = list(report)
    all_groups = sorted({g for r in report.values() for g in r["groups_ms"]},
                        key=lambda g: -max(r["groups_ms"].get(g, 0) for r in report.values()))
    lines = [f"# Training step profile ({args.dtype}, Llama-like 4x768, {args.targets} r={args.r}, dropout {args.dropout:g}, batch 4x128, "
             f"{args.threads} thread(s))", "",
             "Self time per step in ms, by op group (torch.profiler; profiling adds its own overhead, so the groups "
             "sum to more than the unprofiled step time).", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| step time (unprofiled, median) | " + " | ".join(f"{report[n]['step_s'] * 1e3:.0f} ms" for n in names) + " |",
             "| / full fine-tuning | " + " | ".join(f"{report[n]['vs_full']:.2f}x" for n in names) + " |",
             "| / frozen floor | " + " | ".join(f"{report[n]['step_s'] / report['frozen floor']['step_s']:.2f}x"
                                                for n in names) + " |"]
    for g in all_groups:
        lines.append(f"| {g} | " + " | ".join(f"{report[n]['groups_ms'].get(g, 0):.0f}" for n in names) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
