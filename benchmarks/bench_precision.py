"""Does bf16 training reach float32's accuracy? The demo's tasks, its settings, several seeds.

Each (task, mode, seed) is trained twice through `lorakit train`, once in fp32 and once in bf16,
each in a fresh process, two processes at a time (one thread each; the pair of a seed starts
together), so every run's time is measured beside another run: the same load for both precisions. The data split is the demo's (seed 0); the seed varies
the initialisation, dropout and batch order. A single seed is not enough to compare precisions
here: on the tweet task one fp32 seed to the next moves LoRA's accuracy by a few points.

    python -m benchmarks.bench_precision [--seeds 5] [--modes lora] [--tasks topic,sentiment]

Writes benchmarks/results/precision.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, environment, write_results

PRECISIONS = ("fp32", "bf16")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--modes", default="lora", help="comma list of head, lora, full")
    ap.add_argument("--tasks", default="topic,sentiment")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    ap.add_argument("--device", default="cpu", help="(accepted for benchmarks.run; trains on the CPU)")
    args = ap.parse_args(argv)
    from lorakit.cli.demo import default_tasks, run_jobs, train_options
    from lorakit.train import datasets
    from lorakit.train.precision import resolve

    import torch

    resolve("bf16", torch.device("cpu"))  # this machine must run bf16 fast, or the comparison means nothing
    tasks = [t for t in default_tasks() if t.name in args.tasks.split(",")]
    modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="lorakit-precision-"))
    plan, steps = {}, 0
    for task in tasks:
        train_rec, test_rec = task.load()
        tr = datasets.write_jsonl(work / "data" / task.name / "train.jsonl", train_rec)
        te = datasets.write_jsonl(work / "data" / task.name / "test.jsonl", test_rec)
        for mode in modes:
            for seed in range(args.seeds):
                for p in PRECISIONS:  # the pair runs side by side: adjacent in the plan, 2 workers
                    key = f"{task.name}/{mode}/{seed}/{p}"
                    opts = train_options(task, mode, "minilm", tr, te, work / key, args.threads, 2, p)
                    plan[key] = {**opts, "seed": seed}
                    steps += task.epochs * -(-len(train_rec) // task.batch_size)
    run_jobs(plan, 2, steps)
    runs = {k: json.loads((Path(v["out"]) / "metrics.json").read_text()) for k, v in plan.items()}
    rows, raw = [], {}
    for task in tasks:
        for mode in modes:
            acc = {p: [runs[f"{task.name}/{mode}/{s}/{p}"]["final_eval"]["accuracy"] for s in range(args.seeds)]
                   for p in PRECISIONS}
            secs = {p: [runs[f"{task.name}/{mode}/{s}/{p}"]["train_time_s"] for s in range(args.seeds)]
                    for p in PRECISIONS}
            mem = {p: [runs[f"{task.name}/{mode}/{s}/{p}"]["peak_memory_mb"] for s in range(args.seeds)]
                   for p in PRECISIONS}
            raw[f"{task.name}/{mode}"] = {"accuracy": acc, "train_time_s": secs, "peak_memory_mb": mem}
            row = {"task": task.name, "mode": mode, "seeds": args.seeds}
            for p in PRECISIONS:
                row[f"{p}_acc_mean"] = statistics.mean(acc[p])
                row[f"{p}_acc_sd"] = statistics.stdev(acc[p]) if len(acc[p]) > 1 else 0.0
            row["bf16_minus_fp32_points"] = 100 * (row["bf16_acc_mean"] - row["fp32_acc_mean"])
            row["paired_diff_sd_points"] = (statistics.stdev([100 * (b - f) for b, f in zip(acc["bf16"], acc["fp32"])])
                                            if args.seeds > 1 else 0.0)
            row["bf16_time_ratio"] = statistics.median(b / f for b, f in zip(secs["bf16"], secs["fp32"]))
            row["bf16_memory_ratio"] = statistics.median(b / f for b, f in zip(mem["bf16"], mem["fp32"]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    payload = {"environment": environment("cpu", args.threads), "rows": rows, "raw": raw,
               "note": "same split as the demo; the seed varies init, dropout and batch order; 2 runs at a time",
               "goal": "bf16 mean accuracy within 1 point of fp32"}
    stem = write_results("precision", payload, rows)
    _plot(stem.with_suffix(".png"), raw)
    print(f"results: {stem}.json")
    return 0


def _plot(path: Path, raw: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 2.2 * len(raw)), 4))
    for i, (name, r) in enumerate(raw.items()):
        for j, (p, color) in enumerate(zip(PRECISIONS, ("tab:blue", "tab:orange"))):
            vals = r["accuracy"][p]
            x = i + (j - 0.5) * 0.35
            ax.bar(x, statistics.mean(vals), 0.3, color=color, alpha=0.5, label=p if i == 0 else None)
            ax.scatter([x] * len(vals), vals, color=color, s=12, zorder=3)
    ax.set_xticks(range(len(raw)))
    ax.set_xticklabels(list(raw))
    ax.set_ylabel("test accuracy (bars: mean; dots: seeds)")
    ax.set_title("bf16 vs float32 training, the demo's tasks")
    lo = min(min(v) for r in raw.values() for v in r["accuracy"].values())
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
