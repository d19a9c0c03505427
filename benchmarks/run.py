"""`make bench`: every benchmark in turn, each in its own process; figures in benchmarks/results/.

    python -m benchmarks.run [--device cpu|cuda] [--threads N] [--quick] [--only train,infer,...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BF16 = ["--dtype", "bfloat16"]
SUITE = {  # name: (module, takes --quick, extra arguments)
    "train": ("benchmarks.bench_train", True, []),
    "train_bf16": ("benchmarks.bench_train", True, BF16),
    "infer": ("benchmarks.bench_infer", True, []),
    "infer_bf16": ("benchmarks.bench_infer", True, BF16),
    "train_smollm2_bf16": ("benchmarks.bench_train", False, BF16 + ["--models", "smollm2", "--ranks", "16",
                                                                   "--targets", "all-linear", "--dropouts", "0",
                                                                   "--tag", "smollm2"]),
    "train_compile_bf16": ("benchmarks.bench_train", False, BF16 + ["--quick", "--compile", "--no-memory"]),
    "compile": ("benchmarks.bench_compile", False, []),  # torch.compile: recompiles, eager vs compiled
    "compile_bf16": ("benchmarks.bench_compile", False, BF16),
    "adapters": ("benchmarks.bench_adapters", False, []),
    "multi_adapter": ("benchmarks.bench_multi_adapter", False, []),
    "multi_adapter_no_grad": ("benchmarks.bench_multi_adapter", False, ["--grad-mode", "no_grad"]),
    "multi_adapter_bf16": ("benchmarks.bench_multi_adapter", False, BF16),
    "multi_adapter_bf16_no_grad": ("benchmarks.bench_multi_adapter", False, BF16 + ["--grad-mode", "no_grad"]),
    "serve": ("benchmarks.bench_serve", False, []),  # continuous vs static batching in the serving engine
    "quant": ("benchmarks.bench_quant", False, []),
    "scaling": ("benchmarks.bench_scaling", True, []),  # torchrun, 1 vs 2 processes
    "soak": ("benchmarks.bench_soak", False, []),  # a real server under hostile and honest clients
    "drift": ("benchmarks.bench_drift", False, []),  # batched vs alone, float32 and bf16
    "precision": ("benchmarks.bench_precision", False, []),  # the demo's tasks, bf16 vs fp32, 5 seeds
    "profile": ("benchmarks.profile_step", False, []),  # where a bf16 training step's time goes
    "profile_dropout": ("benchmarks.profile_step", False, ["--dropout", "0.05"]),
    "profile_fp32": ("benchmarks.profile_step", False, ["--dtype", "float32"]),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smaller sweeps where a benchmark offers them")
    ap.add_argument("--only", default=",".join(SUITE), help=f"comma list of {list(SUITE)}")
    args = ap.parse_args(argv)
    failed = []
    for name in args.only.split(","):
        module, has_quick, extra = SUITE[name]
        cmd = [sys.executable, "-m", module, "--device", args.device, "--threads", str(args.threads), *extra]
        if args.quick and has_quick:
            cmd.append("--quick")
        if name == "quant" and args.device != "cpu":
            continue  # bitsandbytes/torchao CPU kernels: the CPU figures are the ones this measures
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
        print(f"== {name}: {time.time() - t0:.0f} s", flush=True)
    print("failed: " + ", ".join(failed) if failed else "all benchmarks ran; figures in benchmarks/results/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
