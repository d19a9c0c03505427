"""Scaling: `lorakit train` steps/s with 1 and 2 processes under torchrun (DDP and FSDP).

Real run end to end: the embedded MiniLM encoder (22.7M parameters), LoRA r=8 + classifier head,
BBC News articles cut to 128 tokens, each configuration launched with torchrun and timed by the
training loop itself (metrics.json train_time_s: the steps, without model loading).

Rows: 1 process with batch B and with batch 2B, and 2 processes with batch B each (global 2B),
with DDP and with FSDP. The scaling ratio compares equal global batches: steps/s of 2 processes
x B against 1 process x 2B (ideal 2.0 when each process has its own cores). Configurations run
in rotated order, `--reps` times each; the median is reported. On a GPU machine the 2-process rows
need 2 GPUs (nccl allows one process per GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import RESULTS, bar_plot, environment, write_results

ROOT = Path(__file__).resolve().parents[1]


def configs(batch: int, gpus: int, device: str) -> list[dict]:
    rows = [dict(name=f"1 proc x {batch}", procs=1, batch=batch, strategy="ddp"),
            dict(name=f"1 proc x {2 * batch}", procs=1, batch=2 * batch, strategy="ddp")]
    if device == "cpu" or gpus >= 2:
        rows += [dict(name=f"2 proc x {batch} ddp", procs=2, batch=batch, strategy="ddp"),
                 dict(name=f"2 proc x {batch} fsdp", procs=2, batch=batch, strategy="fsdp")]
    return rows


def launch(cfg: dict, work: Path, data: Path, steps: int, threads: int, device: str, rep: int) -> dict:
    out = work / f"{cfg['name'].replace(' ', '_')}-{rep}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(cfg["procs"]),
           str(work / "entry.py"), "train", "--model", "minilm", "--data", str(data), "--task", "classification",
           "--steps", str(steps), "--batch-size", str(cfg["batch"]), "--max-length", "128", "--warmup", "0",
           "--threads", str(threads), "--device", device, "--strategy", cfg["strategy"], "--out", str(out), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{cfg['name']} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"train_time_s": m["train_time_s"], "steps": m["steps"], "tokens_per_s_rank0": m["tokens_per_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--batch", type=int, default=8, help="B: per-process batch of the 2-process rows")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="10 steps, 1 repetition")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.reps = 10, 1
    from lorakit.train.datasets import bbc_news

    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    rows = configs(args.batch, gpus, args.device)
    times: dict[str, list[float]] = {r["name"]: [] for r in rows}
    with tempfile.TemporaryDirectory(prefix="lorakit-scaling-") as tmp:
        work = Path(tmp)
        (work / "entry.py").write_text("import sys\nfrom lorakit.cli import main\nsys.exit(main())\n")
        data = work / "bbc.jsonl"
        examples = bbc_news()[:: 4]  # every topic, ~560 articles
        data.write_text("".join(json.dumps(e) + "\n" for e in examples))
        for rep in range(args.reps):
            order = rows[rep % len(rows):] + rows[:rep % len(rows)]
            for cfg in order:
                r = launch(cfg, work, data, args.steps, args.threads, args.device, rep)
                times[cfg["name"]].append(r["train_time_s"])
                print(f"{cfg['name']:>18}: {args.steps / r['train_time_s']:.2f} steps/s", flush=True)
    table = []
    for cfg in rows:
        t = statistics.median(times[cfg["name"]])
        sps = args.steps / t
        table.append({"config": cfg["name"], "processes": cfg["procs"], "strategy": cfg["strategy"] if cfg["procs"] > 1 else "-",
                      "batch_per_process": cfg["batch"], "global_batch": cfg["batch"] * cfg["procs"],
                      "steps_per_s": sps, "examples_per_s": sps * cfg["batch"] * cfg["procs"]})
    by = {r["config"]: r for r in table}
    same_global = by[f"1 proc x {2 * args.batch}"]["steps_per_s"]
    for r in table:
        r["speedup_vs_1proc_same_global_batch"] = r["steps_per_s"] / same_global if r["global_batch"] == 2 * args.batch else None
    payload = {"environment": environment(args.device, args.threads), "load_average_1min": os.getloadavg()[0],
               "cpus": os.cpu_count(), "model": "minilm (22.7M, LoRA r=8 + head)",
               "data": "BBC News, 128 tokens", "steps": args.steps, "reps": args.reps, "times_s": times,
               "rows": table, "note": "2-process rows need 2 GPUs on cuda" if len(rows) == 2 else None}
    write_results("scaling", payload, table)
    bar_plot(RESULTS / "scaling.png", [r["config"] for r in table],
             {"steps/s": [r["steps_per_s"] for r in table], "examples/s / 10": [r["examples_per_s"] / 10 for r in table]},
             f"lorakit train under torchrun ({args.device}, {args.threads} thread(s) per process)", "per second")
    print((RESULTS / "scaling.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
