"""Mixed-adapter batches: lorakit's per_row vs one adapter, and vs PEFT's `adapter_names` path.

Llama-like model (4 layers, hidden 768, r=16 on all linear layers), same base weights and same
adapters in both libraries (copied from lorakit into PEFT, and checked to give the same logits).
  (a) prefill: a 16 x 128 batch with 1, 4 and 16 distinct adapters; time relative to the same
      library's single-adapter forward (goal <= 1.03x);
  (b) decode: one new token for each of 64 rows with a KV cache, 1, 16 and 64 distinct adapters;
      throughput relative to the single-adapter step (goal >= 0.9x at 64).
Repetitions are interleaved (every configuration once per round); times are medians, ratios are
medians of each round's ratio.

    python -m benchmarks.bench_multi_adapter [--device cpu] [--threads 1] [--reps 9]
Writes benchmarks/results/multi_adapter.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, round_ratio, sync
CACHE = "past_key_values"  # the KV-cache keyword of this transformers version


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to(args.device, getattr(torch, args.dtype)).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--n-adapters", type=int, default=64)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--grad-mode", default="inference_mode", choices=["inference_mode", "no_grad"],
                   help="what the timed forwards run under (transformers' generate uses no_grad)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import copy

    import peft
    from tqdm import tqdm

    import lorakit as lk

    model = build(args)
    global CACHE
    import inspect

    CACHE = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    pmodel = copy.deepcopy(model)
    names = [f"a{i}" for i in range(args.n_adapters)]
    cfg = lk.LoraConfig(r=16, alpha=32, targets="all-linear", init=False)
    for n in tqdm(names, desc="adapters", leave=False):
        lk.inject(model, cfg, n)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    pcfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    pmodel = peft.get_peft_model(pmodel, pcfg, adapter_name=names[0])
    for n in names[1:]:
        pmodel.add_adapter(n, pcfg)
    from peft import set_peft_model_state_dict

    for n in names:
        sd = {k: v.to(args.device) for k, v in lk.adapter_state_dict(model, n).items()}
        set_peft_model_state_dict(pmodel, sd, adapter_name=n)
    pmodel.eval()
    # as the server does: a frozen head given a strided slice (logits_to_keep) takes torch's slow
    # broadcast matmul (seconds per bf16 prefill), for both libraries alike
    from lorakit.models import contiguous_head_input

    contiguous_head_input(model)
    contiguous_head_input(pmodel.get_base_model())

    g = torch.Generator().manual_seed(0)
    prefill_x = torch.randint(0, args.vocab, (16, 128), generator=g).to(args.device)
    prompt = torch.randint(0, args.vocab, (64, 32), generator=g).to(args.device)
    step_tok = torch.randint(0, args.vocab, (64, 1), generator=g).to(args.device)

    grad_mode = torch.inference_mode if args.grad_mode == "inference_mode" else torch.no_grad
    with grad_mode():  # the two libraries agree on a mixed batch
        check_names = [names[i % 4] for i in range(4)]
        with lk.per_row(model, check_names):
            a = model(prefill_x[:4, :16]).logits
        b = pmodel(input_ids=prefill_x[:4, :16], adapter_names=check_names).logits
        agree = (a - b).abs().max().item()

        lk_cache = model(prompt, use_cache=True).past_key_values
        lk.set_adapter(model, names[0])
        pmodel.set_adapter(names[0])
        pk_cache = pmodel(input_ids=prompt, use_cache=True).past_key_values
        L = prompt.shape[1]

        def lk_single(x, cache=None):
            lk.set_adapter(model, names[0])
            return model(x, **{CACHE: cache}, use_cache=cache is not None, logits_to_keep=1)

        def lk_unmerged(x, cache=None):  # the single adapter without merging dW on the fly (PEFT's way)
            from benchmarks.common import unmerged

            with unmerged(model):
                return lk_single(x, cache)

        def lk_mixed(k):
            rows_names = lambda rows: [names[i % k] for i in range(rows)]  # noqa: E731

            def f(x, cache=None):
                with lk.per_row(model, rows_names(x.shape[0])):
                    return model(x, **{CACHE: cache}, use_cache=cache is not None, logits_to_keep=1)
            return f

        def pk_single(x, cache=None):
            return pmodel(input_ids=x, **{CACHE: cache}, use_cache=cache is not None, logits_to_keep=1)

        def pk_mixed(k):
            def f(x, cache=None):
                return pmodel(input_ids=x, **{CACHE: cache}, use_cache=cache is not None, logits_to_keep=1,
                              adapter_names=[names[i % k] for i in range(x.shape[0])])
            return f

        cases = []
        for lib, single, mixed, cache in (("lorakit", lk_single, lk_mixed, lk_cache), ("peft", pk_single, pk_mixed, pk_cache)):
            cases.append(("prefill", lib, "single", single, None))
            if lib == "lorakit":
                cases.append(("prefill", lib, "unmerged", lk_unmerged, None))
            for k in (1, 4, 16):
                cases.append(("prefill", lib, k, mixed(k), None))
            cases.append(("decode", lib, "single", single, cache))
            for k in (1, 16, 64):
                if k <= args.n_adapters:
                    cases.append(("decode", lib, k, mixed(k), cache))
        times: dict[tuple, list[float]] = {c[:3]: [] for c in cases}
        for rnd in tqdm(range(args.reps + 1), desc="rounds"):  # round 0 warms up (fills the bank)
            for phase, lib, k, fn, cache in cases:
                x = prefill_x if phase == "prefill" else step_tok
                best = float("inf")
                for _ in range(1 if phase == "prefill" else 3):  # decode: best of 3 back to back
                    sync(args.device)
                    t = time.perf_counter()
                    fn(x, cache)
                    sync(args.device)
                    best = min(best, time.perf_counter() - t)
                    if cache is not None and cache.get_seq_length() > L:
                        cache.crop(L - cache.get_seq_length())  # drop the new token: same context every time
                if rnd:
                    times[(phase, lib, k)].append(best)

    med = {key: statistics.median(v) for key, v in times.items()}
    # the bytes a decode step with every adapter distinct must read, and how fast this machine reads
    # them: the ratio no kernel can beat here (single step time / (single + bytes / bandwidth))
    bank = model.__dict__["_lorakit_bank"]
    stacks = [t for st in bank._stacks.values() for t in (st.A, st.Bt)]
    k_max = max(k for k in (1, 16, 64) if k <= args.n_adapters)
    nbytes = sum(t.numel() * t.element_size() for t in stacks) * k_max // max(bank._n_slots, 1)
    big = torch.empty(nbytes // 4 + 1, dtype=torch.float32, device=args.device).normal_()
    reads = []
    for _ in range(5):
        sync(args.device)
        t0 = time.perf_counter()
        big.sum()
        sync(args.device)
        reads.append(time.perf_counter() - t0)
    bandwidth = big.numel() * 4 / min(reads)
    single_decode = med[("decode", "lorakit", "single")]
    ceiling = single_decode / (single_decode + nbytes / bandwidth)
    del big
    rows = []
    for (phase, lib, k), m in med.items():
        if k in ("single", "unmerged"):
            continue
        single = med[(phase, lib, "single")]
        # per-round ratios: slow drifts of a shared machine cancel, which a ratio of medians would not do
        key, one = (phase, lib, k), (phase, lib, "single")
        ratio = round_ratio(times, key, one) if phase == "prefill" else round_ratio(times, one, key)
        row = {"phase": phase, "library": lib, "distinct_adapters": k, "median_s": m, "single_median_s": single,
               "ratio": ratio, "ratio_kind": "time vs single" if phase == "prefill" else "throughput vs single"}
        if (phase, lib, "unmerged") in times:  # lorakit's single adapter without merge-on-the-fly
            row["ratio_vs_unmerged"] = round_ratio(times, key, (phase, lib, "unmerged"))
        rows.append(row)
    result = {
        "config": {"layers": 4, "hidden": 768, "intermediate": 2048, "heads": 12, "vocab": args.vocab, "r": 16,
                   "targets": "all-linear", "adapters_loaded": args.n_adapters, "prefill_batch": [16, 128],
                   "decode_rows": 64, "decode_context": L, "logits_to_keep": 1, "dtype": args.dtype,
                   "grad_mode": args.grad_mode,
                   "device": args.device, "torch_threads": torch.get_num_threads(), "reps": args.reps,
                   "rows_to_adapters": "row i -> adapter i % k (interleaved)"},
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "python": platform.python_version()},
        "machine": platform.processor() or platform.machine(),
        "lorakit_vs_peft_max_abs_logit_diff": agree,
        "decode_adapter_bytes_per_step": nbytes, "read_bandwidth_GBps": bandwidth / 1e9,
        "decode_bandwidth_ceiling": ceiling,
        "goals": {"prefill_16_time_ratio_max": 1.03, "decode_64_throughput_ratio_min": 0.9},
        "results": rows,
        "raw_seconds": {f"{a}/{b}/{c}": v for (a, b, c), v in times.items()},
    }
    out = Path(args.out)
    stem = ("multi_adapter" if args.device == "cpu" else "multi_adapter_gpu") + (
        "" if args.dtype == "float32" else f"_{args.dtype}") + ("" if args.grad_mode == "inference_mode" else "_no_grad")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = [f"# Mixed-adapter batches ({args.device}, {args.dtype}, {args.grad_mode}, {torch.get_num_threads()} thread(s), medians of {args.reps} interleaved rounds; ratios: median of the per-round ratios)", "",
          "Llama-like: 4 layers, hidden 768, intermediate 2048, vocab %d, r=16 all-linear, %d adapters loaded; row i uses adapter i %% k."
          % (args.vocab, args.n_adapters), f"lorakit and PEFT agree on a mixed batch to {agree:.1e} (max abs logit).", "",
          "lorakit's single adapter merges dW into W on the fly for prefill (2048 tokens); in brackets its mixed "
          "batch against its single adapter unmerged, as PEFT runs one.", "",
          "| phase | distinct adapters | lorakit | PEFT adapter_names | goal |", "|---|---|---|---|---|"]
    for phase, ks, goal in (("prefill", (1, 4, 16), "<= 1.03x time at 16"), ("decode", (1, 16, 64), ">= 0.9x throughput at 64")):
        for k in ks:
            r = {x["library"]: x for x in rows if x["phase"] == phase and x["distinct_adapters"] == k}
            if not r:
                continue
            kind = "time" if phase == "prefill" else "throughput"
            unm = r["lorakit"].get("ratio_vs_unmerged")
            unm = f" [{unm:.3f}x unmerged]" if unm is not None else ""
            md.append(f"| {phase} | {k} | {r['lorakit']['ratio']:.3f}x {kind}{unm} ({r['lorakit']['median_s']*1e3:.1f} ms) "
                      f"| {r['peft']['ratio']:.3f}x ({r['peft']['median_s']*1e3:.1f} ms) | {goal} |")
    md.append("")
    md.append(f"A decode step with {k_max} distinct adapters reads {nbytes / 1e6:.0f} MB of adapter weights; this machine "
              f"reads {bandwidth / 1e9:.1f} GB/s (one thread), so no kernel can exceed {ceiling:.3f}x the single "
              "adapter's throughput here.")
    md.append("")
    md.append("Single-adapter medians: " + ", ".join(f"{ph}/{lib} {med[(ph, lib, 'single')]*1e3:.1f} ms"
                                                   for ph in ("prefill", "decode") for lib in ("lorakit", "peft"))
              + f", prefill/lorakit unmerged {med[('prefill', 'lorakit', 'unmerged')]*1e3:.1f} ms")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, phase, goal, label in ((axes[0], "prefill", 1.03, "time / single-adapter time (lower is better)"),
                                       (axes[1], "decode", 0.9, "throughput / single-adapter (higher is better)")):
            for lib, color in (("lorakit", "tab:blue"), ("peft", "tab:orange")):
                pts = sorted((x["distinct_adapters"], x["ratio"]) for x in rows if x["phase"] == phase and x["library"] == lib)
                ax.plot([a for a, _ in pts], [b for _, b in pts], "o-", color=color, label=lib)
            ax.axhline(goal, ls="--", color="gray", label=f"goal {goal}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("distinct adapters in the batch")
            ax.set_title(f"{phase}: {label}", fontsize=9)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=120)
    except ImportError:
        pass
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
