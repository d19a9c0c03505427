"""Batched vs alone: how often a temperature-0 answer served in a busy batch differs from the same
request served alone, in float32 and in bfloat16, on the embedded SmolLM2-135M-Instruct with 4
random adapters (r=8 on q_proj/v_proj) behind a real `lorakit serve`.

A request alone runs its prompt unpadded in a batch of one; in a busy server its row shares
matmuls with others and is left-padded to their length, so the same math is summed in another
order. In float32 the rounding differences stay far below the gap between the top two tokens; in
bfloat16 (8 bits of mantissa) they sometimes flip a near-tie, and greedy decoding then follows
another, equally plausible continuation. This measures how often, and how far into the answer.

    python -m benchmarks.bench_drift [--requests 100] [--tokens 24] [--threads 2]
Writes benchmarks/results/drift.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import RESULTS, start_server

SUBJECTS = ["the ocean", "a library", "winter", "the moon", "trains", "bread", "a garden", "music", "rivers", "chess"]
FORMS = ["Write one sentence about {}.", "Describe {} in a few words.", "What do you know about {}?",
         "Tell a short story about {}.", "Give three facts about {}.", "Why do people like {}?",
         "Write a haiku about {}.", "Explain {} to a child.", "List things related to {}.", "What is special about {}?"]


def build_adapters(root: Path, n: int = 4) -> Path:
    import lorakit as lk
    from lorakit.models import load_model

    for i in range(n):
        model = load_model("smollm2", task="causal-lm").model
        lk.inject(model, lk.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"], init=False), f"a{i}")
        torch.manual_seed(i)
        with torch.no_grad():
            for p in lk.adapter_parameters(model, f"a{i}"):
                p.normal_(0, 0.02)
        lk.save_adapter(model, root / f"a{i}", f"a{i}")
    return root


def _serve(adapters: Path, dtype: str, threads: int):
    return start_server("--model", "smollm2", "--adapters", str(adapters), "--dtype", dtype, "--max-resident", "4",
                        "--max-queue", "1000", threads=threads, tries=1200)


def measure(adapters: Path, dtype: str, n: int, tokens: int, threads: int) -> dict:
    import httpx

    jobs = [(f"a{i % 4}", FORMS[i % len(FORMS)].format(SUBJECTS[(i // len(FORMS)) % len(SUBJECTS)])) for i in range(n)]
    proc, url = _serve(adapters, dtype, threads)

    def ask(job):
        r = httpx.post(url + "/v1/chat/completions", json={
            "model": job[0], "messages": [{"role": "user", "content": job[1]}], "max_tokens": tokens,
            "temperature": 0, "logit_bias": {"2": -100}}, timeout=600)  # EOS banned: every answer is `tokens` long
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

    try:
        t = time.time()
        alone = [ask(j) for j in jobs]
        t_alone = time.time() - t
        t = time.time()
        with ThreadPoolExecutor(n) as ex:
            busy = list(ex.map(ask, jobs))
        t_busy = time.time() - t
    finally:
        proc.terminate()
        proc.wait(30)
    diverged = [(a, b) for a, b in zip(alone, busy) if a != b]
    first = [next(i for i, (x, y) in enumerate(zip(a + "\0", b + "\0")) if x != y) for a, b in diverged]
    return {"dtype": dtype, "requests": n, "tokens": tokens, "differ": len(diverged),
            "first_difference_at_char": sorted(first), "mean_answer_chars": sum(map(len, alone)) / n,
            "alone_s": round(t_alone, 1), "busy_s": round(t_busy, 1),
            "examples": [{"alone": a, "busy": b} for a, b in diverged[:3]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the server (default 2)")
    ap.add_argument("--device", default="cpu", help="(accepted for benchmarks.run; runs on the CPU)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = build_adapters(Path(tmp))
        rows = [measure(adapters, d, args.requests, args.tokens, args.threads) for d in ("float32", "bfloat16")]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "drift.json").write_text(json.dumps({"rows": rows, "torch": torch.__version__,
                                                    "threads": args.threads}, indent=2))
    lines = ["# Batched vs alone: temperature-0 answers of SmolLM2-135M-Instruct with 4 adapters", "",
             f"{args.requests} chat requests, {args.tokens} new tokens each (end of sequence banned), sent one at a "
             "time, then all at once; a real `lorakit serve`.", "",
             "| dtype | answers that differ | first difference at character (median) | mean answer length |",
             "|---|---|---|---|"]
    for r in rows:
        f = r["first_difference_at_char"]
        lines.append(f"| {r['dtype']} | {r['differ']} of {r['requests']} | "
                     f"{f[len(f) // 2] if f else '-'} | {r['mean_answer_chars']:.0f} chars |")
    (RESULTS / "drift.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
