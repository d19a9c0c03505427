"""Serving: continuous batching vs one generation batch at a time, in lorakit's serving engine.

A Llama-like base (4 layers, hidden 512, the embedded SmolLM2 tokenizer's vocabulary, random
weights) with 8 adapters (r=16, all-linear) in a bank of 8 slots. One fixed arrival schedule:
32 requests, one every --gap-ms, alternating long (96 new tokens) and short (8 new tokens), the
adapters in turn; end-of-sequence is ignored so every request produces exactly its max_tokens.
Both modes run in this process on the same schedule, in alternating rounds; latency is from
submission to the last token. The engine is driven directly (no HTTP: the same worker thread).

    python -m benchmarks.bench_serve [--threads 1] [--rounds 3] [--gap-ms 25]
Writes benchmarks/results/serve.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS

LONG, SHORT, N_REQ, N_ADAPTERS = 96, 8, 32, 8


def build(root: Path) -> tuple[Path, Path]:
    """A random Llama-like base with the SmolLM2 tokenizer, and 8 random adapters, saved."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import lorakit as lk
    from lorakit.models import model_path

    tok = AutoTokenizer.from_pretrained(model_path("smollm2"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                      tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i in range(N_ADAPTERS):
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        lk.inject(m, lk.LoraConfig(r=16, alpha=32, targets="all-linear", init=False), f"a{i}")
        lk.save_adapter(m, root / "adapters" / f"a{i}", f"a{i}")
    return root / "base", root / "adapters"


def run_schedule(engine, prompts: list[list[int]], gap: float) -> dict:
    """Submit the schedule; wait for every request; latencies by kind and the whole span."""
    from lorakit.serve.engine import GenRequest

    done = threading.Event()
    lock, left, errors = threading.Lock(), [N_REQ], []
    finish: dict[int, float] = {}
    tokens = [0]

    def emit_for(i: int):
        def emit(event, payload):
            if event == "error":
                errors.append(payload)
                done.set()
            if event == "finish":
                with lock:
                    finish[i] = time.perf_counter()
                    tokens[0] += payload[2]
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
        return emit

    start, sent = time.perf_counter(), {}
    for i in range(N_REQ):
        time.sleep(max(0.0, start + i * gap - time.perf_counter()))
        key = engine.pin(f"a{i % N_ADAPTERS}")
        sent[i] = time.perf_counter()
        engine.submit(GenRequest(key, prompts[i], LONG if i % 2 == 0 else SHORT, 0.0, emit=emit_for(i)))
    if not done.wait(600) or errors:
        raise RuntimeError(f"the schedule failed: {errors[:1] or 'not finished in 600 s'}")
    lat = {i: finish[i] - sent[i] for i in range(N_REQ)}
    span = max(finish.values()) - start
    return {"short": [lat[i] for i in range(1, N_REQ, 2)], "long": [lat[i] for i in range(0, N_REQ, 2)],
            "span_s": span, "tokens": tokens[0], "tokens_per_s": tokens[0] / span}


def p95(v: list[float]) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, round(0.95 * (len(v) - 1)))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gap-ms", type=float, default=25.0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    from lorakit.serve.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapters = build(Path(tmp))
        engines = {mode: Engine(str(model_dir), adapters, max_resident=N_ADAPTERS, max_batch=32, wait_ms=5.0,
                                device=args.device, continuous=mode == "continuous") for mode in ("continuous", "static")}
        try:
            tok = engines["continuous"].tokenizer
            words = "the quick brown fox jumps over a lazy dog while many adapters share one base".split()
            prompts = [tok(" ".join(words[(i * 3) % len(words):] + words[:(i * 3) % len(words)]))["input_ids"][: 8 + i % 9]
                       for i in range(N_REQ)]
            for e in engines.values():
                e.eos = set()  # every request runs to its max_tokens
                run_schedule(e, prompts, 0.0)  # warm-up: adapters into the bank, first-call costs
            runs: dict[str, list[dict]] = {m: [] for m in engines}
            for _ in tqdm(range(args.rounds), desc="rounds"):
                for mode, e in engines.items():
                    runs[mode].append(run_schedule(e, prompts, args.gap_ms / 1000))
        finally:
            for e in engines.values():
                e.close()

    summary = {}
    for mode, rs in runs.items():
        short = [x for r in rs for x in r["short"]]
        long = [x for r in rs for x in r["long"]]
        summary[mode] = {"short_mean_s": statistics.mean(short), "short_p95_s": p95(short),
                         "long_mean_s": statistics.mean(long), "long_p95_s": p95(long),
                         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                         "span_s": statistics.median(r["span_s"] for r in rs)}
    # per-round ratios (static / continuous latency; continuous / static throughput), median over rounds
    ratio = {
        "short_latency_static_over_continuous": statistics.median(
            statistics.mean(s["short"]) / statistics.mean(c["short"]) for s, c in zip(runs["static"], runs["continuous"])),
        "long_latency_static_over_continuous": statistics.median(
            statistics.mean(s["long"]) / statistics.mean(c["long"]) for s, c in zip(runs["static"], runs["continuous"])),
        "throughput_continuous_over_static": statistics.median(
            c["tokens_per_s"] / s["tokens_per_s"] for s, c in zip(runs["static"], runs["continuous"])),
    }
    result = {
        "config": {"layers": 4, "hidden": 512, "vocab": len(tok), "adapters": N_ADAPTERS, "r": 16, "targets": "all-linear",
                   "requests": N_REQ, "long_tokens": LONG, "short_tokens": SHORT, "gap_ms": args.gap_ms,
                   "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "device": args.device, "dtype": "float32"},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "summary": summary, "ratios": ratio, "raw": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "serve" if args.device == "cpu" else "serve_gpu"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = [f"# Serving: continuous batching vs one batch at a time ({args.device}, float32, {torch.get_num_threads()} thread(s), "
          f"{args.rounds} alternating rounds)", "",
          f"Llama-like 4 layers, hidden 512, {N_ADAPTERS} adapters r=16 all-linear; {N_REQ} requests one every "
          f"{args.gap_ms:g} ms, alternating {LONG} and {SHORT} new tokens, the adapters in turn.", "",
          "| mode | short requests: mean / p95 latency | long requests: mean / p95 latency | tokens/s |", "|---|---|---|---|"]
    for mode, s in summary.items():
        md.append(f"| {mode} | {s['short_mean_s']*1e3:.0f} / {s['short_p95_s']*1e3:.0f} ms | "
                  f"{s['long_mean_s']*1e3:.0f} / {s['long_p95_s']*1e3:.0f} ms | {s['tokens_per_s']:.0f} |")
    md += ["", f"Short-request latency, static / continuous: {ratio['short_latency_static_over_continuous']:.2f}x; "
               f"long: {ratio['long_latency_static_over_continuous']:.2f}x; throughput continuous / static: "
               f"{ratio['throughput_continuous_over_static']:.2f}x (medians of per-round ratios)."]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, color in (("continuous", "tab:blue"), ("static", "tab:orange")):
            for kind, marker in (("short", "o"), ("long", "s")):
                v = sorted(x * 1e3 for r in runs[mode] for x in r[kind])
                ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], marker=marker, ms=3, color=color,
                        ls="-" if kind == "short" else "--", label=f"{mode}, {kind} requests")
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, submission to last token)")
        ax.set_ylabel("fraction of requests")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=120)
    except ImportError:
        pass
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
