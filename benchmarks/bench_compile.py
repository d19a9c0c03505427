"""torch.compile: lorakit and PEFT, eager and compiled (inductor), training step and no-grad
inference, interleaved in one process.

A Llama-like model (2 layers, hidden 512, vocab 8000; the CPU default keeps inductor's compile
time short), all-linear r=16 adapters. Training: forward + backward + AdamW, batch 4x128.
Inference: a no-grad forward, batch 4x128, adapters unmerged (lorakit's merge-on-the-fly off, as
PEFT runs an adapter) and, for lorakit, its default (merged on the fly when cheaper). Before timing,
every compiled variant is checked against its eager twin (max abs logit difference), and the
number of graphs compiled per library is counted (each grad mode and each code path a model runs
compiles its own graph: 2 here; a graph break would add more; tests/test_compile.py checks one
graph with fullgraph=True).

    python -m benchmarks.bench_compile [--threads 1] [--dtype float32|bfloat16] [--reps 7]
Writes benchmarks/results/compile{,_bf16}.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

from benchmarks.common import environment, interleaved, median, round_ratio, train_step, unmerged, write_results

BATCH, SEQ, R = 4, 128, 16


def build(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to(dtype)


def variant(lib: str, base):
    model = copy.deepcopy(base)
    if lib == "lorakit":
        import lorakit as lk

        lk.inject(model, lk.LoraConfig(r=R, alpha=2 * R, targets="all-linear", init=False))
        params = lk.adapter_parameters(model)
    else:
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear",
                                                     init_lora_weights=False))
        params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # the same random adapter values in both (B non-zero: the path is exercised)
        g = torch.Generator().manual_seed(1)
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model, torch.optim.AdamW(params, lr=1e-5)


class Graphs:
    """An inductor backend that counts the graphs it compiles."""

    def __init__(self):
        self.n = 0

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.n += 1
        return compile_fx(gm, example_inputs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    base = build(dtype).to(args.device)
    batch = torch.randint(0, 8000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)).to(args.device)
    rows, checks = [], {}
    for phase in ("train", "infer"):
        fns, graphs = {}, {}
        for lib in ("lorakit", "peft"):
            model, opt = variant(lib, base)
            model.train(phase == "train")
            counter = Graphs()
            compiled = torch.compile(model, backend=counter)
            graphs[lib] = counter
            if phase == "train":
                fns[f"{lib} eager"] = lambda m=model, o=opt: train_step(m, o, batch)
                fns[f"{lib} compiled"] = lambda m=compiled, o=opt: train_step(m, o, batch)
                with torch.no_grad():
                    checks[f"train {lib}"] = (compiled(batch).logits.float() - model(batch).logits.float()).abs().max().item()
            else:
                def run(m, merged_on_the_fly=True, lora=model, lib=lib):  # bind lib now: the loop moves on
                    with torch.no_grad():
                        if lib == "lorakit" and not merged_on_the_fly:
                            with unmerged(lora):
                                return m(input_ids=batch).logits
                        return m(input_ids=batch).logits
                fns[f"{lib} eager"] = lambda m=model, run=run: run(m, False)
                fns[f"{lib} compiled"] = lambda m=compiled, run=run: run(m, False)
                if lib == "lorakit":
                    fns["lorakit eager (merge on the fly)"] = lambda m=model, run=run: run(m, True)
                    fns["lorakit compiled (merge on the fly)"] = lambda m=compiled, run=run: run(m, True)
                checks[f"infer {lib}"] = (run(compiled, False).float() - run(model, False).float()).abs().max().item()
        t = interleaved(fns, args.reps, warmup=1, device=args.device)
        for name in fns:
            lib = name.split()[0]
            rows.append({"phase": phase, "variant": name, "ms": round(1000 * median(t[name]), 1),
                         "vs lorakit eager": round(round_ratio(t, name, "lorakit eager"), 3),
                         "vs peft compiled": round(round_ratio(t, name, "peft compiled"), 3),
                         "graphs": graphs[lib].n if "compiled" in name else None})
    payload = {"environment": environment(args.device, args.threads), "dtype": args.dtype,
               "compiled_vs_eager_max_abs_diff": checks, "rows": rows,
               "model": "Llama-like, 2 layers, hidden 512, vocab 8000", "r": R, "batch": [BATCH, SEQ]}
    write_results("compile" + ("" if args.device == "cpu" else "_gpu") + ("" if args.dtype == "float32" else "_bf16"),
                  payload, rows)


if __name__ == "__main__":
    main()
