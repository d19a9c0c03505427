"""Benchmark plumbing: models from configs, interleaved timing, memory probes, result files.

Rules kept here: competitors run in the same process, interleaved (A B A B ...) with the order
rotated each round, same inputs and seeds; we report medians and ratios, the thread count and the
device. Absolute times only mean something on a GPU; on the shared CPU machines read the ratios.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"


# ---- models ------------------------------------------------------------------------------------
def build_model(name: str, size: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Causal LMs built from configs (no download). size "small": 4 layers, hidden 768 (CPU);
    "full": ~100M Llama-like / GPT-2 small (12 layers)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    layers = 4 if size == "small" else 12
    if name == "llama":
        cfg = LlamaConfig(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                          num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    elif name == "gpt2":
        cfg = GPT2Config(vocab_size=16000 if size == "small" else 50257, n_embd=768, n_layer=layers, n_head=12,
                         n_positions=512)
        model = GPT2LMHeadModel(cfg)
    elif name == "smollm2":
        from lorakit.models import load_model  # the cached offline SmolLM2-135M copy

        model = load_model("smollm2", task="causal-lm").model
    else:
        raise ValueError(f"unknown benchmark model {name!r}")
    return model.to(dtype=dtype, device=device)


TARGETS = {
    ("llama", "attention"): ["q_proj", "k_proj", "v_proj", "o_proj"],
    ("gpt2", "attention"): ["c_attn", "attn.c_proj"],
    ("smollm2", "attention"): ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def targets_for(model_name: str, which: str):
    return "all-linear" if which == "all-linear" else TARGETS[(model_name, which)]


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, threads: int = 1, env: dict | None = None, stdout=subprocess.DEVNULL,
                 tries: int = 600):
    """`lorakit serve ARGS` as a real process on a free loopback port, once /health answers;
    returns (process, url). A server that exits first raises with its output (if piped)."""
    import httpx

    port = free_port()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads), **(env or {}))
    cmd = [sys.executable, "-m", "lorakit", "serve", *args, "--port", str(port), "--threads", str(threads),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(tries):
        if proc.poll() is not None:
            out = proc.stdout.read() if stdout == subprocess.PIPE else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {out}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def byte_tokenizer():
    """A byte-level tokenizer built offline: ids 0-255 are bytes, 256 </s>, 257 <pad> (serving
    tests and the soak benchmark: every text round-trips, nothing to download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    assert fast.eos_token_id == 256 and fast.pad_token_id == 257
    return fast


def train_step(model, opt, batch, loss_fn=None) -> float:
    """One causal-LM training step (forward, backward, optimizer); returns the loss.
    loss_fn(model, input_ids, labels): the loss (default: the model's own, model(labels=...).loss)."""
    loss = loss_fn(model, batch, batch) if loss_fn else model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


# ---- timing ------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1, device: str = "cpu") -> dict[str, list[float]]:
    """Run each function `reps` times, interleaved and rotating the order; seconds per call."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            sync(device)
            t0 = time.perf_counter()
            fns[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return median(times[a]) / median(times[b])


def round_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a's time / b's time in the same round (cancels slow drifts)."""
    return median([x / y for x, y in zip(times[a], times[b])])


@contextmanager
def unmerged(model):
    """The adapter path as such: no merging dW into W on the fly (which a no-grad forward over many
    tokens would otherwise do), as PEFT runs an adapter."""
    from lorakit.layer import state_of

    st = state_of(model)
    st.merge_on_the_fly = False
    try:
        yield
    finally:
        st.merge_on_the_fly = True


# ---- memory ------------------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def hwm_bytes() -> int:
    """Peak resident memory since the process start or the last reset_peak_rss()."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak-RSS mark (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats on a GPU, peak RSS on the CPU."""

    def __init__(self, device: str):
        self.device = str(device)
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            self.base = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = hwm_bytes() - self.base


def run_probe(module: str, spec: dict, threads: int) -> dict:
    """Run `python -m module --probe JSON` in a fresh process (clean memory high-water mark)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-m", module, "--probe", json.dumps(spec)], capture_output=True,
                         text=True, env=env, cwd=Path(__file__).parent.parent, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"probe {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- results -----------------------------------------------------------------------------------
def environment(device: str, threads: int) -> dict:
    info = {"torch": torch.__version__, "device": str(device), "threads": threads, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


def write_results(name: str, payload: dict, table: list[dict], suffix: str = "") -> Path:
    """benchmarks/results/<name><suffix>.json + .md (a markdown table of `table`)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{name}{suffix}"
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, stem.with_suffix(".json"))
    if table:
        cols = list(table[0])
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in table:
            lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
        env = payload.get("environment", {})
        head = f"# {name}\n\n{env}\n\n"
        stem.with_suffix(".md").write_text(head + "\n".join(lines) + "\n")
    return stem


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def bar_plot(path: Path, labels: list[str], series: dict[str, list[float]], title: str, ylabel: str,
             hline: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.9), 4))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(labels))], values, width, label=name)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    if hline is not None:
        ax.axhline(hline, color="k", lw=0.8, ls="--")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
