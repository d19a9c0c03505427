"""Adapter files and swapping: save, load (vs reading the file), set_adapter with 100 resident
adapters, memory and load time for 100 adapters; lorakit vs PEFT."""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.common import (bar_plot, build_model, environment, interleaved, median, rss_bytes, targets_for,
                               write_results)


def per_call(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", default=None)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import lorakit as lk
    from peft import PeftModel

    size = args.size or ("full" if args.device.startswith("cuda") else "small")
    base = build_model("llama", size, device=args.device).eval()
    targets = targets_for("llama", "all-linear")
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    donor = copy.deepcopy(base)
    lk.inject(donor, lk.LoraConfig(r=16, alpha=32, targets=targets, init=False))
    folder = lk.save_adapter(donor, tmp / "a")
    weights = folder / "adapter_model.safetensors"
    file_mb = weights.stat().st_size / 2**20

    # save / read / load, interleaved
    ours, theirs_base = copy.deepcopy(base), copy.deepcopy(base)
    lk.load_adapter(ours, folder, "first")  # both models hold one resident adapter, as PEFT's does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(theirs_base, folder, adapter_name="first")
    counter = {"n": 0}

    def load_ours():
        lk.load_adapter(ours, folder, "x", replace=True)

    def load_peft():
        counter["n"] += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs.load_adapter(folder, adapter_name=f"x{counter['n']}")
        theirs.delete_adapter(f"x{counter['n']}")

    t = interleaved({"read_file": lambda: load_file(weights, device=args.device), "lorakit_load": load_ours,
                     "peft_load": load_peft, "lorakit_save": lambda: lk.save_adapter(donor, tmp / "b")},
                    args.reps, warmup=1, device=args.device)
    row = {"adapter_file_MB": file_mb, "read_file_ms": 1e3 * median(t["read_file"]),
           "lorakit_load_ms": 1e3 * median(t["lorakit_load"]), "peft_load_ms": 1e3 * median(t["peft_load"]),
           "lorakit_save_ms": 1e3 * median(t["lorakit_save"])}
    row["load_vs_read"] = row["lorakit_load_ms"] / row["read_file_ms"]
    row["peft_load_vs_read"] = row["peft_load_ms"] / row["read_file_ms"]

    # 100 resident adapters: load time, memory, set_adapter
    many = copy.deepcopy(base)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    for i in range(args.adapters):
        lk.load_adapter(many, folder, f"a{i}")
    row["load_100_s"] = time.perf_counter() - t0
    row["rss_100_MB"] = (rss_bytes() - rss0) / 2**20
    row["adapter_bytes_100_MB"] = sum(p.numel() * p.element_size() for p in lk.adapter_parameters(many)) / 2**20
    names = [f"a{i}" for i in range(args.adapters)]
    k = iter(range(10**9))
    row["set_adapter_us"] = 1e6 * per_call(lambda: lk.set_adapter(many, names[next(k) % len(names)]), 2000)
    for i in range(1, min(args.adapters, 20)):  # PEFT with 20 resident (its loading is slow)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs.load_adapter(folder, adapter_name=f"p{i}")
    pn = ["first"] + [f"p{i}" for i in range(1, min(args.adapters, 20))]
    j = iter(range(10**9))
    row["peft_set_adapter_us"] = 1e6 * per_call(lambda: theirs.set_adapter(pn[next(j) % len(pn)]), 200)
    goals = {"set_adapter <= 50us": row["set_adapter_us"] <= 50, "load <= 3x read": row["load_vs_read"] <= 3}
    print(json.dumps(row, indent=1))
    suffix = "" if args.device == "cpu" else "_gpu"
    payload = {"environment": environment(args.device, args.threads), "size": size, "row": row, "goals": goals}
    stem = write_results("adapters", payload, [row], suffix)
    bar_plot(stem.with_suffix(".png"), ["load / read file", "set_adapter (ms)"],
             {"lorakit": [row["load_vs_read"], row["set_adapter_us"] / 1e3],
              "PEFT": [row["peft_load_vs_read"], row["peft_set_adapter_us"] / 1e3]},
             f"adapter handling ({args.device})", "ratio / ms")
    print(json.dumps(goals))


if __name__ == "__main__":
    main()
