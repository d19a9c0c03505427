"""Soak: `lorakit serve` under many clients, dropped streams, hot load / unload / replace, and a
hostile request every few requests, for a fixed time. It reports four counts that must all be 0:

- 5xx: responses with a 5xx status (a client mistake must be a 4xx; nothing here should fail);
- hangs: /health answering in over 2 s (polled all along), or a request not answered in 60 s;
- wrong answers: temperature-0 float32 texts that differ from the same request sent alone (for
  the adapter being replaced: from either version's; an unloaded one may answer 404);
- memory growth: the server's resident memory grew between the end of the first third of the
  soak and the end (after the same kinds of traffic), by more than --memory-slack-mb.

A Llama-like float32 base (2 layers, hidden 64, a byte-level tokenizer: built here, nothing is
downloaded) and 5 adapters (ranks 2-64) served with --max-resident 2, so adapters are evicted and
reloaded (and their files re-verified) all the time. The server is a real `lorakit serve` process;
clients are httpx and the openai client in threads.

    python -m benchmarks.bench_soak [--seconds 120] [--clients 6] [--threads 1]
Writes benchmarks/results/soak.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks.common import RESULTS, byte_tokenizer, start_server

ADAPTERS = {"a2": (2, ["q_proj", "v_proj"]), "a8": (8, "all-linear"), "a16": (16, ["o_proj", "up_proj"]),
            "a32": (32, ["k_proj", "down_proj"]), "a64": (64, "all-linear")}
PROMPTS = ["hello world", "lorakit serves many adapters", "a", "the quick brown fox", "0123456789"]
EVIL_REGEX = r"(\w|\w\w|\w\w\w|\w\w\w\w|\.)*[A-Z]"  # exponential backtracking on module paths


def _base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, bos_token_id=None,
                      eos_token_id=256, pad_token_id=257, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _adapter(folder: Path, name: str, r: int, targets, seed: int) -> None:
    import lorakit as lk

    m = _base()
    lk.inject(m, lk.LoraConfig(r=r, alpha=2 * r, targets=targets, init=False), name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lk.adapter_parameters(m, name):
            p.normal_(0, 0.3)
    lk.save_adapter(m, folder, name)


def build_site(root: Path) -> dict:
    """The base, the served adapters, and (under extra/, not served at start) the versions of the
    adapter that gets replaced, the hot-loaded one, and the hostile folders."""
    model_dir, adapters = root / "base", root / "adapters"
    _base().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        _adapter(adapters / name, name, r, targets, i)
    extra = adapters / "extra"
    _adapter(extra / "swap_v1", "swap", 4, ["q_proj", "v_proj"], 100)
    _adapter(extra / "swap_v2", "swap", 4, ["q_proj", "v_proj"], 101)
    _adapter(extra / "hot", "hot", 8, "all-linear", 102)
    _adapter(extra / "evil", "evil", 2, ["q_proj"], 103)
    cfg = json.loads((extra / "evil" / "adapter_config.json").read_text())
    cfg["target_modules"] = EVIL_REGEX + "|.*q_proj"
    (extra / "evil" / "adapter_config.json").write_text(json.dumps(cfg))
    _adapter(extra / "garbage", "garbage", 2, ["q_proj"], 104)
    (extra / "garbage" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    _adapter(root / "outside", "outside", 2, ["q_proj"], 105)
    (extra / "linked").mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(root / "outside" / f, extra / "linked" / f)
    return {"model_dir": model_dir, "adapters": adapters}


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _hostile(url: str) -> list:
    """Requests a client or attacker may send; each must get a 4xx (or, for the odd but valid
    ones, a 200), never a 5xx, a hang or another user's failure."""
    import httpx

    deep = b'{"model": "a2", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    post, json_h = httpx.post, {"content-type": "application/json"}
    return [
        ("evil regex adapter", lambda: post(url + "/v1/adapters", json={"name": "evil", "path": "extra/evil"}, timeout=60)),
        ("garbage weights", lambda: post(url + "/v1/adapters", json={"name": "g", "path": "extra/garbage"}, timeout=60)),
        ("symlinked files", lambda: post(url + "/v1/adapters", json={"name": "l", "path": "extra/linked"}, timeout=60)),
        ("traversal", lambda: post(url + "/v1/adapters", json={"name": "t", "path": "../../etc"}, timeout=60)),
        ("nul in path", lambda: post(url + "/v1/adapters", json={"name": "t", "path": "a\x00b"}, timeout=60)),
        ("long path", lambda: post(url + "/v1/adapters", json={"name": "t", "path": "a/" * 100_000}, timeout=60)),
        ("huge name", lambda: post(url + "/v1/adapters", json={"name": "n" * 100_000, "path": "a2"}, timeout=60)),
        ("newline name", lambda: post(url + "/v1/adapters", json={"name": "x\n", "path": "a2"}, timeout=60)),
        ("replace as string", lambda: post(url + "/v1/adapters", json={"name": "a2", "path": "a2", "replace": "yes"},
                                           timeout=60)),
        ("delete base", lambda: httpx.delete(url + "/v1/adapters/base", timeout=60)),
        ("deep json", lambda: post(url + "/v1/completions", content=deep, headers=json_h, timeout=60)),
        ("malformed json", lambda: post(url + "/v1/completions", content=b'{"model": ', headers=json_h, timeout=60)),
        ("body too large", lambda: post(url + "/v1/completions", content=b" " * (5 << 20), headers=json_h, timeout=60)),
        ("wrong types", lambda: post(url + "/v1/completions", json={"model": "a2", "prompt": "x", "n": "2"}, timeout=60)),
        ("unknown model", lambda: post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=60)),
        ("too many tokens", lambda: post(url + "/v1/completions", json={"model": "a2", "prompt": "x" * 200,
                                                                        "max_tokens": 200}, timeout=60)),
        ("unsupported field", lambda: post(url + "/v1/completions", json={"model": "a2", "prompt": "x", "best_of": 3},
                                           timeout=60)),
        ("bad logit_bias", lambda: post(url + "/v1/completions", json={"model": "a2", "prompt": "x",
                                                                       "logit_bias": {"x": 1}}, timeout=60)),
        ("foreign Host", lambda: httpx.get(url + "/v1/models", headers={"Host": "evil.example"}, timeout=60)),
        ("tiny temperature", lambda: post(url + "/v1/completions", json={"model": "a8", "prompt": PROMPTS[0],
                                                                         "max_tokens": 6, "temperature": 1e-300},
                                          timeout=60)),
    ]


class Soak:
    """One soak run against a live server; counters are filled in by the worker threads."""

    def __init__(self, url: str, pid: int, seconds: float, clients: int, hostile_every: int, seed: int,
                 on_step=None):
        self.url, self.pid, self.seconds, self.clients = url, pid, seconds, clients
        self.hostile_every, self.rng = hostile_every, random.Random(seed)
        self.lock = threading.Lock()
        self.c: Counter = Counter()
        self.wrong: list = []
        self.errors: list = []
        self.health: list[tuple[float, float]] = []  # (t, seconds)
        self.rss: list[tuple[float, float]] = []  # (t, MB)
        self.refs: dict = {}
        self.on_step = on_step

    # ---- references: every request sent alone -------------------------------------------------
    def reference(self, model: str, prompt: str, n: int) -> str:
        import httpx

        r = httpx.post(self.url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n,
                                                           "temperature": 0}, timeout=60)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    def prepare(self) -> None:
        import httpx

        for name in ADAPTERS:
            for p in PROMPTS:
                self.refs[(name, p)] = {self.reference(name, p, 8)}
        self.refs[("a8", PROMPTS[0], 6)] = {self.reference("a8", PROMPTS[0], 6)}
        admin = lambda path, name: httpx.post(self.url + "/v1/adapters", json={"name": name, "path": path,  # noqa: E731
                                                                               "replace": True}, timeout=60)
        for version in ("swap_v2", "swap_v1"):  # ends on v1
            admin(f"extra/{version}", "swap").raise_for_status()
            for p in PROMPTS:
                self.refs.setdefault(("swap", p), set()).add(self.reference("swap", p, 8))
        admin("extra/hot", "hot").raise_for_status()
        for p in PROMPTS:
            self.refs[("hot", p)] = {self.reference("hot", p, 8)}

    # ---- the threads ----------------------------------------------------------------------------
    def _record(self, what: str, status: int | None, detail: str = "") -> None:
        with self.lock:
            self.c[what] += 1
            if status is not None:
                self.c[f"status_{status // 100}xx"] += 1
                if status >= 500:
                    self.errors.append((what, status, detail[:300]))

    def client(self, k: int, deadline: float) -> None:
        import httpx
        import openai

        rng = random.Random(self.rng.random())
        oai = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)
        i = 0
        while time.time() < deadline:
            i += 1
            if i % self.hostile_every == 0:
                what, send = rng.choice(_hostile(self.url))
                try:
                    r = send()
                    self._record("hostile", r.status_code, f"{what}: {r.text}")
                    if r.status_code < 400 and what != "tiny temperature":  # should have been refused
                        self._record("hostile_accepted", None)
                        self.errors.append((f"hostile {what} accepted", r.status_code, r.text[:300]))
                    if what == "tiny temperature" and r.status_code == 200 and \
                            r.json()["choices"][0]["text"] not in self.refs[("a8", PROMPTS[0], 6)]:
                        self.wrong.append(("a8 tiny temperature", r.json()["choices"][0]["text"]))
                except httpx.TimeoutException:
                    self._record("hang", None, what)
                continue
            model = rng.choice([*ADAPTERS, "swap", "hot"])
            prompt = rng.choice(PROMPTS)
            body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
            mode = rng.choice(["plain", "plain", "stream", "openai", "drop", "give_up"])
            try:
                if mode == "drop":  # a stream abandoned after its first chunk
                    with httpx.stream("POST", self.url + "/v1/completions", json={**body, "max_tokens": 64,
                                      "stream": True, "temperature": 0.8, "logit_bias": {"256": -100}},
                                      timeout=60) as r:
                        for _ in r.iter_lines():
                            break
                    self._record("dropped", r.status_code)
                    continue
                if mode == "give_up":  # a client that stops waiting
                    try:
                        httpx.post(self.url + "/v1/completions", json={**body, "max_tokens": 64, "temperature": 0.8,
                                                                      "logit_bias": {"256": -100}}, timeout=0.05)
                    except httpx.TimeoutException:
                        pass
                    self._record("gave_up", None)
                    continue
                if mode == "openai":
                    try:
                        out = oai.completions.create(**body)
                        text, status = out.choices[0].text, 200
                    except openai.APIStatusError as e:
                        text, status = None, e.status_code
                elif mode == "stream":
                    parts, status = [], None
                    with httpx.stream("POST", self.url + "/v1/completions", json={**body, "stream": True},
                                      timeout=60) as r:
                        status = r.status_code
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                d = json.loads(line[6:])
                                if "error" in d:
                                    status = 500
                                    break
                                parts.append(d["choices"][0]["text"])
                    text = "".join(parts) if status == 200 else None
                else:
                    r = httpx.post(self.url + "/v1/completions", json=body, timeout=60)
                    status = r.status_code
                    text = r.json()["choices"][0]["text"] if status == 200 else None
                self._record("normal", status, f"{model} {mode}")
                if status == 200 and text not in self.refs[(model, prompt)]:
                    self.wrong.append((model, prompt, mode, text))
                elif status != 200 and not (status == 404 and model == "hot"):
                    self.errors.append((f"{model} {mode}", status, ""))
            except httpx.TimeoutException:
                self._record("hang", None, f"{model} {mode}")

    def admin(self, deadline: float) -> None:
        import httpx

        k = 0
        while time.time() < deadline:
            k += 1
            steps = [("POST", {"name": "swap", "path": f"extra/swap_v{1 + k % 2}", "replace": True}),
                     ("DELETE", "hot"), ("POST", {"name": "hot", "path": "extra/hot"})]
            for method, arg in steps:
                try:
                    if method == "POST":
                        r = httpx.post(self.url + "/v1/adapters", json=arg, timeout=60)
                    else:
                        r = httpx.delete(self.url + f"/v1/adapters/{arg}", timeout=60)
                    self._record("admin", r.status_code, r.text)
                    if r.status_code != 200:
                        self.errors.append((f"admin {method}", r.status_code, r.text[:300]))
                except httpx.TimeoutException:
                    self._record("hang", None, "admin")
                time.sleep(0.2)

    def watch(self, deadline: float, t0: float) -> None:
        import httpx

        while time.time() < deadline:
            t = time.perf_counter()
            try:
                httpx.get(self.url + "/health", timeout=10)
                took = time.perf_counter() - t
            except httpx.TimeoutException:
                took = 10.0
            with self.lock:
                self.health.append((time.time() - t0, took))
                self.rss.append((time.time() - t0, _rss_mb(self.pid)))
            if self.on_step:
                self.on_step()
            time.sleep(0.25)

    def run(self) -> dict:
        t0 = time.time()
        deadline = t0 + self.seconds
        threads = [threading.Thread(target=self.client, args=(k, deadline)) for k in range(self.clients)]
        threads += [threading.Thread(target=self.admin, args=(deadline,)),
                    threading.Thread(target=self.watch, args=(deadline, t0))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(1.0)  # let the last cancelled rows leave
        third = [m for t, m in self.rss if t <= self.seconds / 3] or [self.rss[0][1]]
        end_rss = _rss_mb(self.pid)
        hangs = self.c["hang"] + sum(1 for _, s in self.health if s > 2.0)
        return {"seconds": self.seconds, "clients": self.clients, "hostile_every": self.hostile_every,
                "requests": dict(self.c),
                "5xx": self.c["status_5xx"], "hangs": hangs, "wrong": len(self.wrong),
                "rss_after_first_third_mb": round(third[-1], 1), "rss_end_mb": round(end_rss, 1),
                "memory_growth_mb": round(end_rss - third[-1], 1),
                "health_max_s": round(max((s for _, s in self.health), default=0.0), 3),
                "examples": {"errors": self.errors[:10], "wrong": self.wrong[:10]},
                "series": {"health": self.health, "rss": self.rss}}


def soak(site: dict, seconds: float = 60, clients: int = 6, hostile_every: int = 4, threads: int = 1,
         seed: int = 0, memory_slack_mb: float = 24.0, log: Path | None = None) -> dict:
    """Start `lorakit serve` on the site, soak it, stop it; the report (see the module docstring)."""
    import httpx

    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        proc, url = start_server("--model", str(site["model_dir"]), "--adapters", str(site["adapters"]),
                                 "--max-resident", "2", "--served-model-name", "base", "--wait-ms", "5",
                                 "--max-prompt-chars", "4096", threads=threads, stdout=out)
    except BaseException:
        if log:
            out.close()
        raise
    try:
        s = Soak(url, proc.pid, seconds, clients, hostile_every, seed)
        s.prepare()
        report = s.run()
        metrics = httpx.get(url + "/metrics", timeout=10).text
        report["server_metrics"] = {l.split()[0]: float(l.split()[1]) for l in metrics.splitlines()
                                    if l.startswith("lorakit_") and "{" not in l}
        report["memory_slack_mb"] = memory_slack_mb
        report["memory_grew"] = int(report["memory_growth_mb"] > memory_slack_mb)
        report["alive"] = proc.poll() is None
        return report
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log:
            out.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--hostile-every", type=int, default=4, help="every Nth request of a client is hostile")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server (default 1)")
    ap.add_argument("--memory-slack-mb", type=float, default=24.0)
    ap.add_argument("--device", default="cpu", help="(accepted for benchmarks.run; the soak runs on the CPU)")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="lorakit-soak-"))
    try:
        report = soak(build_site(root), args.seconds, args.clients, args.hostile_every, args.threads,
                      memory_slack_mb=args.memory_slack_mb, log=root / "server.log")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write(report)
    counts = {k: report[k] for k in ("5xx", "hangs", "wrong", "memory_grew")}
    print(json.dumps({**counts, "requests": report["requests"], "memory_growth_mb": report["memory_growth_mb"]}))
    return 0 if not any(counts.values()) else 1


def write(report: dict) -> None:
    import platform

    RESULTS.mkdir(exist_ok=True)
    series = report.pop("series")
    (RESULTS / "soak.json").write_text(json.dumps({**report, "machine": platform.machine(),
                                                   "torch": torch.__version__}, indent=2, default=str))
    req = report["requests"]
    lines = ["# Soak: lorakit serve under load, disconnects, hot swaps and hostile requests", "",
             f"{report['seconds']:.0f} s, {report['clients']} client threads, a hostile request every "
             f"{report.get('hostile_every', 4)} requests of a client; server with --max-resident 2, 1 torch thread.", "",
             "| 5xx | hangs | wrong answers | memory growth (MB, slack) | requests | hostile | dropped streams | "
             "clients that gave up | admin ops |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| {report['5xx']} | {report['hangs']} | {report['wrong']} | {report['memory_growth_mb']} "
             f"({report['memory_slack_mb']}) | {req.get('normal', 0)} | {req.get('hostile', 0)} | "
             f"{req.get('dropped', 0)} | {req.get('gave_up', 0)} | {req.get('admin', 0)} |", "",
             f"/health slowest answer: {report['health_max_s']} s; RSS {report['rss_after_first_third_mb']} MB after "
             f"the first third, {report['rss_end_mb']} MB at the end."]
    (RESULTS / "soak.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
        a.plot([t for t, _ in series["rss"]], [m for _, m in series["rss"]])
        a.set_ylabel("server RSS (MB)")
        b.plot([t for t, _ in series["health"]], [s * 1000 for _, s in series["health"]])
        b.axhline(2000, color="r", ls="--", lw=0.8)
        b.set_yscale("log")
        b.set_ylabel("/health latency (ms)")
        b.set_xlabel("seconds into the soak")
        fig.suptitle(f"soak: {report['5xx']} 5xx, {report['hangs']} hangs, {report['wrong']} wrong, "
                     f"memory {report['memory_growth_mb']:+.1f} MB")
        fig.tight_layout()
        fig.savefig(RESULTS / "soak.png", dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
