"""Training step (forward + backward + AdamW): lorakit vs PEFT vs full fine-tuning, and the floor.

The floor ("frozen"): the same model without any adapter, frozen, with the backward still run
through every layer. No LoRA library can step faster than it at equal settings, so lorakit/PEFT is
bounded below by floor/PEFT: this is where a goal like "0.9x PEFT's time" meets physics.

"lorakit+loss" is lorakit with its fused LM-head + cross-entropy (`lorakit.train.causal_lm_loss`,
what `lorakit train` runs on one process); "lorakit" and "peft" both call model(labels=...).loss.

--dtype bfloat16: the base (and full fine-tuning) in bf16, the adapters' master weights in float32
(both libraries' default); results in train_step_bf16.*. --compile adds "lorakit compiled" and
"frozen compiled" (torch.compile of the model, inductor; the optimizer step stays eager): how much
of the floor is the base's own non-matmul work that a compiler fuses away.

Time per step (interleaved in one process; ratios are medians of per-round ratios) and peak
memory above the loaded model (each variant in a fresh process: RSS high-water mark on the CPU,
allocator peak on a GPU). Also the bytes autograd saves for backward, counted exactly with
saved-tensor hooks (noise-free).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import warnings

import torch

from benchmarks.common import (PeakMemory, bar_plot, build_model, environment, interleaved, median, round_ratio,
                               run_probe, targets_for, write_results)
from benchmarks.common import train_step as step

BATCH, SEQ = 4, 128


def make_variant(lib: str, base, model_name: str, r: int, targets: str, dropout: float):
    """('lorakit'|'peft'|'full') -> (model, optimizer) on a copy of `base`."""
    model = copy.deepcopy(base)
    tgt = targets_for(model_name, targets)
    if lib in ("lorakit", "lorakit+loss"):
        import lorakit as lk

        lk.inject(model, lk.LoraConfig(r=r, alpha=2 * r, dropout=dropout, targets=tgt))
        params = lk.adapter_parameters(model)
    elif lib == "peft":
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=tgt))
        params = [p for p in model.parameters() if p.requires_grad]
    elif lib == "frozen":  # the floor any LoRA library stands on: no adapter, frozen base, and the
        # backward still runs through every layer (as it must to reach the first adapter)
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        model.train()
        return model, _NoOptimizer()
    else:
        params = list(model.parameters())
    model.train()
    return model, torch.optim.AdamW(params, lr=1e-4)


class _NoOptimizer:
    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def fused_step(model, opt, batch) -> float:
    """train_step with lorakit's fused LM-head + cross-entropy loss (what `lorakit train` runs)."""
    from lorakit.train import causal_lm_loss

    return step(model, opt, batch, loss_fn=causal_lm_loss)


def step_for(lib: str):
    return fused_step if lib == "lorakit+loss" else step



def saved_bytes(model, batch) -> int:
    """Bytes of distinct storages autograd keeps for backward in one forward pass."""
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            try:
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            except RuntimeError:
                pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def peak_in_process(lib: str, base, model_name: str, r: int, targets: str, dropout: float, batch, device: str) -> int:
    """GPU: a fresh variant, peak allocated memory of 2 steps (optimizer state included) above it."""
    variant = make_variant(lib, base, model_name, r, targets, dropout)
    with PeakMemory(device) as mem:
        for _ in range(2):
            step_for(lib)(*variant, batch)
    del variant
    torch.cuda.empty_cache()
    return mem.peak


def probe(spec: dict) -> dict:
    """In a fresh process: peak memory of 3 training steps above the loaded, injected model."""
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    base = build_model(spec["model"], spec["size"], device=device, dtype=getattr(torch, spec.get("dtype", "float32")))
    model, opt = make_variant(spec["lib"], base, spec["model"], spec["r"], spec["targets"], spec["dropout"])
    del base
    batch = torch.randint(0, 16000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)).to(device)
    with PeakMemory(device) as mem:
        for _ in range(3):
            step_for(spec["lib"])(model, opt, batch)
    return {"peak_bytes": mem.peak}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", default=None, help="small (4 layers, CPU default) or full (~100M, GPU default)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="llama only, r=8: a fast look")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true", help="add compiled lorakit and frozen-floor rows (inductor)")
    ap.add_argument("--models", default=None,
                    help="comma list of llama,gpt2,smollm2 (default: llama,gpt2 on the CPU, all three on a GPU)")
    ap.add_argument("--ranks", default=None, help="comma list (default 8,16; 8 with --quick)")
    ap.add_argument("--targets", default="attention,all-linear")
    ap.add_argument("--dropouts", default="0,0.05")
    ap.add_argument("--tag", default="", help="appended to the results' file name")
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return
    torch.set_num_threads(args.threads)
    size = args.size or ("full" if args.device.startswith("cuda") else "small")
    default = "llama,gpt2" if args.device == "cpu" else "llama,gpt2,smollm2"
    models = ["llama"] if args.quick else (args.models or default).split(",")
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else [8] if args.quick else [8, 16]
    rows, raw = [], []
    dtype = getattr(torch, args.dtype)
    for model_name in models:
        base = build_model(model_name, size, device=args.device, dtype=dtype)
        batch = torch.randint(0, 16000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)).to(args.device)
        full = make_variant("full", base, model_name, 8, "attention", 0.0)
        frozen = make_variant("frozen", base, model_name, 8, "attention", 0.0)
        for r, targets, dropout in itertools.product(ranks, args.targets.split(","),
                                                        [float(d) for d in args.dropouts.split(",")]):
            ours = make_variant("lorakit", base, model_name, r, targets, dropout)
            theirs = make_variant("peft", base, model_name, r, targets, dropout)
            fns = {"lorakit": lambda: step(*ours, batch), "peft": lambda: step(*theirs, batch),
                   "frozen": lambda: step(*frozen, batch), "lorakit+loss": lambda: fused_step(*ours, batch)}
            if args.compile:
                ours_c = (torch.compile(ours[0]), ours[1])
                frozen_c = (torch.compile(frozen[0]), frozen[1])
                fns["lorakit compiled"] = lambda: step(*ours_c, batch)
                fns["frozen compiled"] = lambda: step(*frozen_c, batch)
            if not raw or raw[-1]["model"] != model_name:
                fns["full"] = lambda: step(*full, batch)
            t = interleaved(fns, args.reps, warmup=1, device=args.device)
            if "full" in t:
                full_time = median(t["full"])
            row = {"model": model_name, "r": r, "targets": targets, "dropout": dropout,
                   "lorakit_s": median(t["lorakit"]), "peft_s": median(t["peft"]), "full_s": full_time}
            row["frozen_s"] = median(t["frozen"])
            if args.compile:
                row["lorakit_compiled_s"] = median(t["lorakit compiled"])
                row["frozen_compiled_s"] = median(t["frozen compiled"])
                row["compiled_vs_full"] = row["lorakit_compiled_s"] / full_time
                row["compiled_frozen_vs_full"] = row["frozen_compiled_s"] / full_time
                row["compiled_vs_eager"] = round_ratio(t, "lorakit compiled", "lorakit")
            row["lorakit_loss_s"] = median(t["lorakit+loss"])
            row["time_vs_peft"] = round_ratio(t, "lorakit", "peft")
            row["loss_time_vs_peft"] = round_ratio(t, "lorakit+loss", "peft")
            row["lorakit_vs_frozen"] = round_ratio(t, "lorakit", "frozen")
            row["peft_vs_frozen"] = round_ratio(t, "peft", "frozen")
            row["peft_vs_full"] = row["peft_s"] / full_time
            row["lorakit_vs_full"] = row["lorakit_s"] / full_time
            row["saved_MB_lorakit"] = saved_bytes(ours[0], batch) / 2**20
            row["saved_MB_peft"] = saved_bytes(theirs[0], batch) / 2**20
            if not args.no_memory:
                spec = dict(model=model_name, size=size, r=r, targets=targets, dropout=dropout,
                            threads=args.threads, device=args.device, dtype=args.dtype)
                if args.device.startswith("cuda"):  # allocator stats are exact in-process
                    mem = {lib: peak_in_process(lib, base, model_name, r, targets, dropout, batch, args.device)
                           for lib in ("lorakit", "peft", "lorakit+loss")}
                else:  # RSS high-water marks need a fresh process each
                    mem = {lib: run_probe("benchmarks.bench_train", dict(spec, lib=lib), args.threads)["peak_bytes"]
                           for lib in ("lorakit", "peft", "lorakit+loss")}
                row["peak_MB_lorakit"] = mem["lorakit"] / 2**20
                row["peak_MB_peft"] = mem["peft"] / 2**20
                row["mem_vs_peft"] = mem["lorakit"] / max(mem["peft"], 1)
                row["peak_MB_lorakit_loss"] = mem["lorakit+loss"] / 2**20
                row["loss_mem_vs_peft"] = mem["lorakit+loss"] / max(mem["peft"], 1)
            raw.append({**row, "times": t})
            rows.append(row)
            print(json.dumps(row), flush=True)
            del ours, theirs
        if not args.no_memory and args.device.startswith("cuda"):
            del full
            fm = peak_in_process("full", base, model_name, 8, "attention", 0.0, batch, args.device)
            full = None
            for row in rows + raw:
                if row["model"] == model_name:
                    row["peak_MB_full"] = fm / 2**20
        elif not args.no_memory:
            fm = run_probe("benchmarks.bench_train", dict(model=model_name, size=size, r=8, targets="attention",
                                                          dropout=0.0, threads=args.threads, device=args.device,
                                                          lib="full", dtype=args.dtype), args.threads)["peak_bytes"]
            for row in rows + raw:
                if row["model"] == model_name:
                    row["peak_MB_full"] = fm / 2**20
        if not args.no_memory:
            spec = dict(model=model_name, size=size, r=8, targets="attention", dropout=0.0, threads=args.threads,
                        device=args.device, lib="frozen", dtype=args.dtype)
            if args.device.startswith("cuda"):
                fz = peak_in_process("frozen", base, model_name, 8, "attention", 0.0, batch, args.device)
            else:
                fz = run_probe("benchmarks.bench_train", spec, args.threads)["peak_bytes"]
            for row in rows + raw:
                if row["model"] == model_name:
                    row["peak_MB_frozen"] = fz / 2**20
        del full, frozen, base
    goals = {
        "time_vs_peft<=0.9 (dropout 0)": all(r["time_vs_peft"] <= 0.9 for r in rows if r["dropout"] == 0),
        "time_vs_peft<=0.85 (dropout>0)": all(r["time_vs_peft"] <= 0.85 for r in rows if r["dropout"] > 0),
    }
    goals["with fused loss: time_vs_peft<=0.9 (dropout 0)"] = all(r["loss_time_vs_peft"] <= 0.9 for r in rows if r["dropout"] == 0)
    goals["with fused loss: time_vs_peft<=0.85 (dropout>0)"] = all(r["loss_time_vs_peft"] <= 0.85 for r in rows if r["dropout"] > 0)
    if not args.no_memory:
        goals["mem<=peft (dropout 0)"] = all(r["mem_vs_peft"] <= 1.0 for r in rows if r["dropout"] == 0)
        goals["mem<=0.8x peft (dropout>0)"] = all(r["mem_vs_peft"] <= 0.8 for r in rows if r["dropout"] > 0)
        goals["with fused loss: mem<=0.8x peft (dropout>0)"] = all(r["loss_mem_vs_peft"] <= 0.8 for r in rows
                                                                 if r["dropout"] > 0)
    if args.dtype == "bfloat16":  # issue 14's goals for the precision people train in
        goals["bf16: lorakit <= 0.70x full fine-tuning"] = all(r["lorakit_vs_full"] <= 0.70 for r in rows)
        goals["bf16: lorakit <= 0.85x PEFT"] = all(r["time_vs_peft"] <= 0.85 for r in rows)
        goals["bf16: lorakit <= 1.10x the frozen floor"] = all(r["lorakit_vs_frozen"] <= 1.10 for r in rows)
    suffix = (("" if args.device == "cpu" else "_gpu") + ("_bf16" if args.dtype == "bfloat16" else "")
              + ("_compile" if args.compile else "") + (f"_{args.tag}" if args.tag else ""))
    payload = {"environment": environment(args.device, args.threads), "size": size, "batch": [BATCH, SEQ],
               "rows": raw, "goals": goals}
    stem = write_results("train_step", payload, rows, suffix)
    labels = [f"{r['model']} r{r['r']} {r['targets'][:4]} p{r['dropout']}" for r in rows]
    bar_plot(stem.with_suffix(".png"), labels, {"lorakit / PEFT time": [r["time_vs_peft"] for r in rows],
                                               "floor / PEFT time": [1 / r["peft_vs_frozen"] for r in rows],
                                               "lorakit / full FT time": [r["lorakit_vs_full"] for r in rows]},
             f"training step time ratios ({args.device}, {args.threads} threads)", "ratio", hline=1.0)
    print(json.dumps(goals))


if __name__ == "__main__":
    main()
