"""`lorakit serve` off the happy path, as users and attackers would use it: a real server process
on loopback, real clients (httpx, openai), real disconnects. Oracles: the same base with the
adapter loaded alone (transformers' generate / forward), and the server's own /health and
/metrics seen from outside.
"""

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lorakit as lk
from test_serve import byte_tokenizer, start_cli, stop
from tiny import randomize, tiny_llama

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

ADAPTERS = {"alpha": (2, ["q_proj", "v_proj"]), "beta": (4, "all-linear"), "gamma": (8, ["o_proj", "up_proj"])}
# exponential backtracking on module paths such as model.layers.1.post_attention_layernorm (without a
# time bound: seconds to hours, holding the interpreter lock); both engines, re and regex
EVIL = r"(\w|\w\w|\w\w\w|\w\w\w\w|\.)*[A-Z]"


def base_model():
    return tiny_llama(vocab_size=258, max_position_embeddings=512, initializer_range=0.3, bos_token_id=None,
                      eos_token_id=256, pad_token_id=257, tie_word_embeddings=False)


def make_adapter(folder, name, r, targets, seed, alpha=None):
    m = base_model()
    lk.inject(m, lk.LoraConfig(r=r, alpha=alpha or 2 * r, targets=targets, init=False), name)
    torch.manual_seed(seed)
    randomize(m, name, 0.4)
    lk.save_adapter(m, folder, name)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    model_dir, adapters = root / "base", root / "adapters"
    base_model().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        make_adapter(adapters / name, name, r, targets, i)
    return {"model_dir": model_dir, "adapters": adapters, "root": root, "tok": byte_tokenizer()}


def oracle(site, folder, prompt, n):
    """Greedy text and per-step log-softmax rows from the base with `folder`'s adapter alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(site["model_dir"]).eval()
    if folder is not None:
        lk.load_adapter(model, folder, "x")
    tok = site["tok"]
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=256, pad_token_id=257, output_scores=True, return_dict_in_generate=True,
                             output_logits=True)
        prompt_lp = model(ids).logits[0].float().log_softmax(-1)
    gen = out.sequences[0, ids.shape[1]:]
    steps = [l[0].float().log_softmax(-1) for l in out.logits]
    return tok.decode(gen, skip_special_tokens=True), gen.tolist(), steps, ids[0].tolist(), prompt_lp


def metric(url, name, headers=None):
    text = httpx.get(url + "/metrics", headers=headers).text
    return float(next(l.split()[-1] for l in text.splitlines() if l.startswith(name + " ") or l.startswith(name + "{")))


def complete(url, model, prompt, n=6, **kw):
    return httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n,
                                                     "temperature": 0, **kw}, timeout=60)


@pytest.fixture(scope="module")
def server(site):
    proc, url = start_cli("--model", str(site["model_dir"]), "--adapters", str(site["adapters"]),
                          "--max-resident", "2", "--served-model-name", "base")
    yield url
    stop(proc)


# ---- hostile input never hangs the server ----------------------------------------------------
def write_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def test_hostile_patterns_fail_fast_while_the_server_keeps_answering(site, server):
    evil = site["adapters"] / "later" / "evil"
    make_adapter(evil, "evil", 2, ["q_proj", "v_proj"], 7)
    done = {}
    for field, value in [("target_modules", EVIL + "|.*q_proj"), ("exclude_modules", r"(\w|\w\w|\.|\.\w)*[A-Z]"),
                         ("rank_pattern", {EVIL: 2}), ("layers_pattern", "(")]:
        write_config(evil, **{field: value})
        stop_flag, health = threading.Event(), []

        def ping():
            while not stop_flag.is_set():
                t = time.time()
                httpx.get(server + "/health", timeout=10)
                health.append(time.time() - t)
                time.sleep(0.02)

        pinger = threading.Thread(target=ping)
        pinger.start()
        t = time.time()
        r = httpx.post(server + "/v1/adapters", json={"name": "evil", "path": "later/evil"}, timeout=30)
        done[field] = time.time() - t
        stop_flag.set()
        pinger.join()
        assert r.status_code == 400, (field, r.text)
        assert r.json()["error"]["message"]
        assert max(health) < 2.0, (field, max(health))
    assert max(done.values()) < 3.0, done  # (a LoraError in under a second; the rest is HTTP and file work)
    assert complete(server, "alpha", "ab").status_code == 200


def test_hostile_adapter_at_start_is_skipped_and_the_server_comes_up(site, tmp_path):
    adapters = tmp_path / "adapters"
    make_adapter(adapters / "good", "good", 2, ["q_proj"], 1)
    make_adapter(adapters / "evil", "evil", 2, ["q_proj"], 2)
    write_config(adapters / "evil", target_modules=EVIL)
    t = time.time()
    proc, url = start_cli("--model", str(site["model_dir"]), "--adapters", str(adapters))
    try:
        assert time.time() - t < 60
        ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert "good" in ids and "evil" not in ids
    finally:
        stop(proc)


def test_client_mistakes_are_4xx_json_never_500(site, server):
    deep = b'{"model": "alpha", "prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    cases = {
        "nul in path": httpx.post(server + "/v1/adapters", json={"name": "x1", "path": "a\x00b"}),
        "long path": httpx.post(server + "/v1/adapters", json={"name": "x2", "path": "a/" * 200_000}),
        "deep json": httpx.post(server + "/v1/completions", content=deep, headers={"content-type": "application/json"}),
        "bool as string": httpx.post(server + "/v1/adapters", json={"name": "alpha", "path": "beta", "replace": "yes"}),
        "stream as string": httpx.post(server + "/v1/completions", json={"model": "alpha", "prompt": "a", "stream": "yes"}),
        "unknown field": httpx.post(server + "/v1/completions", json={"model": "alpha", "prompt": "a", "frobnicate": 1}),
        "best_of": httpx.post(server + "/v1/completions", json={"model": "alpha", "prompt": "a", "best_of": 3}),
        "suffix": httpx.post(server + "/v1/completions", json={"model": "alpha", "prompt": "a", "suffix": "z"}),
        "tools": httpx.post(server + "/v1/chat/completions", json={
            "model": "alpha", "messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}),
        "image part": httpx.post(server + "/v1/chat/completions", json={
            "model": "alpha", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}),
        "bad logit_bias": httpx.post(server + "/v1/completions", json={"model": "alpha", "prompt": "a",
                                                                       "logit_bias": {"99999": 1}}),
        "trailing newline name": httpx.post(server + "/v1/adapters", json={"name": "alpha2\n", "path": "alpha"}),
        "huge name": httpx.post(server + "/v1/adapters", json={"name": "n" * 1_000_000, "path": "alpha"}),
        "base name": httpx.post(server + "/v1/adapters", json={"name": "base", "path": "alpha"}),
        "delete base": httpx.delete(server + "/v1/adapters/base"),
        "body too large": httpx.post(server + "/v1/completions", content=b"x" * (5 << 20),
                                     headers={"content-type": "application/json"}),
        "too many tokens": complete(server, "alpha", "ab", 511),
        "no such route": httpx.get(server + "/v2/nothing"),
        "wrong method": httpx.get(server + "/v1/completions"),
    }
    for what, r in cases.items():
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["message"] and "Traceback" not in err["message"], what
    assert "512" in cases["too many tokens"].json()["error"]["message"]  # names the numbers
    assert cases["body too large"].status_code == 413
    assert "not a field" in cases["unknown field"].json()["error"]["message"]
    assert "base model" in cases["delete base"].json()["error"]["message"]
    # the base listed once, the refused names nowhere, and it still answers
    ids = [m["id"] for m in httpx.get(server + "/v1/models").json()["data"]]
    assert ids.count("base") == 1 and not any(i.startswith("n" * 100) or i.startswith("alpha2") for i in ids)
    assert complete(server, "base", "ab").status_code == 200 and complete(server, "alpha", "ab").status_code == 200


def test_sampling_is_safe_at_extreme_temperature_and_top_p(site, server):
    want = oracle(site, site["adapters"] / "beta", "hello", 6)[0]
    for kw in ({"temperature": 1e-300}, {"temperature": 5e-324}, {"top_p": 1e-300, "temperature": 1.0},
               {"temperature": 2.0, "top_p": 5e-324, "seed": 3}):
        r = complete(server, "beta", "hello", **kw)
        assert r.status_code == 200, (kw, r.text)
        assert r.json()["choices"][0]["text"] == want, kw  # all collapse to the most likely token


# ---- cancellation -----------------------------------------------------------------------------
def test_dropped_clients_leave_the_batch_and_free_their_adapter(site, tmp_path):
    proc, url = start_cli("--model", str(site["model_dir"]), "--adapters", str(site["adapters"]),
                          "--max-resident", "2")
    try:
        before = metric(url, "lorakit_requests_cancelled_total")
        tokens = metric(url, "lorakit_completion_tokens_total")
        # 4 choices x 500 tokens each (end of sequence banned): seconds of decoding if left running
        long = {"prompt": "b", "max_tokens": 500, "n": 4, "temperature": 0.9, "seed": 1, "logit_bias": {"256": -100}}
        for model in ("alpha", "beta"):  # two streams that pin both slots, dropped after a few tokens
            with httpx.Client(timeout=60) as client:
                resp = client.send(client.build_request("POST", url + "/v1/completions",
                                                        json={"model": model, "stream": True, **long}), stream=True)
                lines = resp.iter_lines()
                assert next(lines).startswith("data: {")
                resp.close()
        with pytest.raises(httpx.TimeoutException):  # a non-streaming client that gives up
            httpx.post(url + "/v1/completions", json={"model": "gamma", **long}, timeout=0.3)
        t = time.time()
        while time.time() - t < 10 and (metric(url, "lorakit_rows_running") > 0
                                        or metric(url, "lorakit_requests_cancelled_total") < before + 3):
            time.sleep(0.05)
        assert metric(url, "lorakit_rows_running") == 0
        assert metric(url, "lorakit_requests_cancelled_total") == before + 3
        assert metric(url, "lorakit_completion_tokens_total") == tokens  # none ran to its end
        t = time.time()
        r = complete(url, "gamma", "hello", 4)  # the adapter pins came back: gamma gets a slot at once
        assert r.status_code == 200 and time.time() - t < 5
    finally:
        stop(proc)


# ---- admission --------------------------------------------------------------------------------
def test_a_full_queue_answers_429_with_retry_after(site):
    proc, url = start_cli("--model", str(site["model_dir"]), "--adapters", str(site["adapters"]),
                          "--max-queue", "2", "--max-batch", "1", "--max-request-tokens", "4000")
    try:
        body = {"model": "alpha", "prompt": "b", "max_tokens": 60, "temperature": 0}
        with ThreadPoolExecutor(12) as ex:
            got = list(ex.map(lambda _: httpx.post(url + "/v1/completions", json=body, timeout=60), range(12)))
        codes = [r.status_code for r in got]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        busy = next(r for r in got if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "rate_limit_exceeded"
        assert metric(url, "lorakit_requests_rejected_total") == codes.count(429)
        texts = {r.json()["choices"][0]["text"] for r in got if r.status_code == 200}
        assert len(texts) == 1  # the admitted ones all got the same (greedy) answer
        r = httpx.post(url + "/v1/completions", json={**body, "prompt": ["a", "b", "c"], "n": 8, "max_tokens": 500},
                       timeout=60)
        assert r.status_code == 400 and "the limit is 4000" in r.json()["error"]["message"], r.text
    finally:
        stop(proc)


# ---- serve what was checked -------------------------------------------------------------------
def test_changed_bytes_are_refused_alone_until_replaced(site, tmp_path):
    adapters = tmp_path / "adapters"
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        make_adapter(adapters / name, name, r, targets, i)
    proc, url = start_cli("--model", str(site["model_dir"]), "--adapters", str(adapters), "--max-resident", "1")
    try:
        want = {m: oracle(site, adapters / m, "hello", 6)[0] for m in ("alpha", "beta")}
        assert complete(url, "alpha", "hello").status_code == 200  # alpha in the slot
        # rewritten on disk under the registered name: new weights, then another alpha in the config
        make_adapter(adapters / "gamma", "gamma", 8, ADAPTERS["gamma"][1], 99)
        jobs = ["gamma", "beta", "alpha", "beta", "gamma", "alpha"] * 2
        with ThreadPoolExecutor(6) as ex:
            got = list(ex.map(lambda m: complete(url, m, "hello"), jobs))
        for model, r in zip(jobs, got):
            if model == "gamma":
                assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_unavailable", r.text
                assert "changed on disk" in r.json()["error"]["message"]
            else:  # other adapters' requests, batched at the same time, are untouched
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == want[model]
        assert metric(url, "lorakit_adapter_integrity_failures_total") >= 1
        # streamed: the failure comes before the first event, so it is the response's status too
        r = httpx.post(url + "/v1/completions", json={"model": "gamma", "prompt": "hello", "max_tokens": 6,
                                                      "stream": True}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_unavailable", r.text
        r = httpx.post(url + "/v1/adapters", json={"name": "gamma", "path": "gamma", "replace": True})
        assert r.status_code == 200, r.text
        r = complete(url, "gamma", "hello")
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == oracle(site, adapters / "gamma", "hello", 6)[0]
    finally:
        stop(proc)


def test_registration_is_atomic_and_files_stay_inside_the_root(site, server):
    fresh = site["adapters"] / "later" / "fresh"
    make_adapter(fresh, "fresh", 2, ["q_proj"], 11)
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda _: httpx.post(server + "/v1/adapters", json={"name": "fresh", "path": "later/fresh"},
                                               timeout=60), range(4)))
    codes = sorted(r.status_code for r in got)
    assert codes == [200, 409, 409, 409], [r.text for r in got]
    # a folder inside the root whose files are symlinks to an adapter outside it
    outside = site["root"] / "outside"
    make_adapter(outside, "o", 2, ["q_proj"], 12)
    linked = site["adapters"] / "later" / "linked"
    linked.mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(outside / f, linked / f)
    r = httpx.post(server + "/v1/adapters", json={"name": "linked", "path": "later/linked"})
    assert r.status_code == 400 and "outside" in r.json()["error"]["message"], r.text
    assert httpx.delete(server + "/v1/adapters/fresh").status_code == 200


# ---- access control ---------------------------------------------------------------------------
def test_api_key_admin_key_and_host_allowlist(site):
    proc, url = start_cli("--model", str(site["model_dir"]), "--adapters", str(site["adapters"]),
                          env={"LORAKIT_API_KEY": "user-key", "LORAKIT_ADMIN_KEY": "admin-key"})
    try:
        user, admin = {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer admin-key"}
        assert httpx.get(url + "/health").status_code == 200  # liveness stays open
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(url + path, headers=user).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="user-key")
        out = client.completions.create(model="alpha", prompt="hello", max_tokens=4, temperature=0)
        assert out.choices[0].text == oracle(site, site["adapters"] / "alpha", "hello", 4)[0]
        body = {"name": "again", "path": "alpha"}
        assert httpx.post(url + "/v1/adapters", json=body, headers=user).status_code == 401
        assert httpx.post(url + "/v1/adapters", json=body, headers=admin).status_code == 200
        assert httpx.delete(url + "/v1/adapters/again", headers=user).status_code == 401
        assert httpx.delete(url + "/v1/adapters/again", headers=admin).status_code == 200
        # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host header
        r = httpx.get(url + "/v1/models", headers={**user, "Host": "evil.example"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
        assert httpx.get(url.replace("127.0.0.1", "localhost") + "/v1/models", headers=user).status_code == 200
    finally:
        stop(proc)


def test_binding_beyond_loopback_without_a_key_warns(site):
    import subprocess
    import sys

    from test_serve import free_port

    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from lorakit.cli import main; sys.exit(main())", "serve", "--model",
           str(site["model_dir"]), "--host", "0.0.0.0", "--port", str(port), "--threads", "1", "--log-level", "warning"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, TOKENIZERS_PARALLELISM="false", LORAKIT_API_KEY=""))
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any("WARNING" in l for l in lines) and p.poll() is None:
            time.sleep(0.05)
        assert any("WARNING" in l and "--api-key" in l for l in lines), lines
    finally:
        p.kill()
        p.wait()


# ---- OpenAI compatibility ---------------------------------------------------------------------
def test_logprobs_and_echo_match_the_model(site, server):
    tok = site["tok"]
    folder = site["adapters"] / "beta"
    text, gen, steps, prompt_ids, prompt_lp = oracle(site, folder, "hello", 5)
    client = openai.OpenAI(base_url=server + "/v1", api_key="none")
    out = client.completions.create(model="beta", prompt="hello", max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == text and len(lp.tokens) == len(gen)
    for i, t in enumerate(gen):
        assert lp.tokens[i] == tok.decode([t])
        assert abs(lp.token_logprobs[i] - float(steps[i][t])) < 1e-4
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(steps[i].max()), abs=1e-4)
        assert len(lp.top_logprobs[i]) <= 3
    # echo with logprobs and no new tokens: the prompt scored, its first token has no logprob
    out = client.completions.create(model="beta", prompt="hello", max_tokens=0, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == "hello" and lp.token_logprobs[0] is None
    for j in range(1, len(prompt_ids)):
        assert abs(lp.token_logprobs[j] - float(prompt_lp[j - 1][prompt_ids[j]])) < 1e-4
    # echo while generating, streamed: the prompt first, then the same text as without echo
    chunks = list(client.completions.create(model="beta", prompt="hello", max_tokens=5, temperature=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "hello" + text
    # chat: logprobs with top_logprobs
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert all(abs(c.logprob - c.top_logprobs[0].logprob) < 1e-6 for c in content)  # greedy: the best one


def test_logit_bias_and_penalties_change_the_answer(site, server):
    r = complete(server, "alpha", "hello", 5, logit_bias={str(ord("z")): 100})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "zzzzz"
    # penalties, against the same rule applied step by step to the adapter-alone model's logits
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(site["model_dir"]).eval()
    lk.load_adapter(model, site["adapters"] / "alpha", "x")
    ids, out = site["tok"]("hello")["input_ids"], []
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
            out.append(int((logits - 1.5 * counts - 0.5 * (counts > 0).float()).argmax()))
            if out[-1] == 256:
                out.pop()
                break
    r = complete(server, "alpha", "hello", 12, frequency_penalty=1.5, presence_penalty=0.5)
    assert r.json()["choices"][0]["text"] == site["tok"].decode(out, skip_special_tokens=True)
    assert r.json()["choices"][0]["text"] != complete(server, "alpha", "hello", 12).json()["choices"][0]["text"]
    usage = [json.loads(l[6:]) for l in httpx.post(server + "/v1/completions", json={
        "model": "alpha", "prompt": "hello", "max_tokens": 3, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}).text.splitlines() if l.startswith("data: {")][-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS:"))


def test_a_large_adapter_loaded_used_and_deleted_gives_its_memory_back(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=258, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=128, bos_token_id=None, eos_token_id=256,
                      pad_token_id=257, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    for name, r in (("small", 2), ("big", 1024)):
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        lk.inject(m, lk.LoraConfig(r=r, alpha=r, targets="all-linear", init=False), name)
        randomize(m, name, 0.01)
        lk.save_adapter(m, tmp_path / "adapters" / ("later" if name == "big" else "") / name, name)
    big_mb = (tmp_path / "adapters" / "later" / "big" / "adapter_model.safetensors").stat().st_size / 2**20
    proc, url = start_cli("--model", str(tmp_path / "base"), "--adapters", str(tmp_path / "adapters"),
                          "--max-resident", "2")
    try:
        for _ in range(3):
            assert complete(url, "small", "hello", 8).status_code == 200
        before = _rss_mb(proc.pid)
        assert httpx.post(url + "/v1/adapters", json={"name": "big", "path": "later/big"}, timeout=60).status_code == 200
        assert complete(url, "big", "hello", 8).status_code == 200
        loaded = _rss_mb(proc.pid)
        assert httpx.delete(url + "/v1/adapters/big").status_code == 200
        assert complete(url, "small", "hello", 8).status_code == 200  # (the slot is dropped once unpinned)
        time.sleep(0.3)
        after = _rss_mb(proc.pid)
        assert loaded - before > 2 * big_mb  # it did take memory (its file, two slots at rank 1024)
        # back to the earlier footprint (measured: within 0.5 MB; before: slots sized for rank 1024
        # for good, +2 x big_mb, and glibc keeping freed large blocks)
        assert after - before < 0.1 * big_mb, (before, loaded, after, big_mb)
    finally:
        stop(proc)


# ---- the red team's findings, each as a test ----------------------------------------------------
def test_half_sent_requests_are_dropped_and_do_not_block_others(site):
    import socket as so

    proc, url = start_cli("--model", str(site["model_dir"]), "--adapters", str(site["adapters"]),
                          "--header-timeout", "1")
    socks = []
    try:
        port = int(url.rsplit(":", 1)[1])
        for _ in range(200):  # connections that send half a request and stop
            s = so.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            socks.append(s)
        t = time.time()
        assert httpx.get(url + "/health", timeout=5).status_code == 200 and time.time() - t < 2
        time.sleep(2.0)
        closed = 0
        for s in socks:  # the server closed each once its headers were late
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""
            except (so.timeout, ConnectionError):
                closed += 1
        assert closed == len(socks)
        assert complete(url, "alpha", "hello", 3).status_code == 200
    finally:
        for s in socks:
            s.close()
        stop(proc)


def test_web_pages_cannot_drive_the_server(server):
    body = json.dumps({"name": "alpha", "path": "beta", "replace": True})
    # a form-like post a page may send without asking (no preflight): refused for its content type
    r = httpx.post(server + "/v1/adapters", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415
    # JSON from another site's page: refused for its Origin (or the browser's Sec-Fetch-Site)
    for headers in ({"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"}, {"origin": "null"}):
        r = httpx.post(server + "/v1/adapters", content=body, headers={"content-type": "application/json", **headers})
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin", headers
    ok = httpx.post(server + "/v1/completions", json={"model": "alpha", "prompt": "a", "max_tokens": 1},
                    headers={"origin": server})  # the server's own origin is fine
    assert ok.status_code == 200


def test_stop_strings_spanning_tokens_never_leak(site, server):
    text = oracle(site, site["adapters"] / "alpha", "hello", 12)[0]
    cut = next(i for i in range(2, len(text) - 2) if text[i:i + 2] not in text[:i + 1])  # its first occurrence
    stop_s = text[cut:cut + 2]  # two characters: two byte tokens
    for stream in (False, True):
        body = {"model": "alpha", "prompt": "hello", "max_tokens": 12, "temperature": 0, "stop": [stop_s],
                "stream": stream}
        if stream:
            chunks = [json.loads(l[6:])["choices"][0] for l in httpx.post(server + "/v1/completions", json=body).text
                      .splitlines() if l.startswith("data: {")]
            got, reason = "".join(c["text"] for c in chunks), chunks[-1]["finish_reason"]
        else:
            choice = httpx.post(server + "/v1/completions", json=body).json()["choices"][0]
            got, reason = choice["text"], choice["finish_reason"]
        assert (got, reason) == (text[:cut], "stop"), (stream, text, stop_s)


def test_echo_logprobs_with_many_prompts_and_choices(site, server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="none")
    prompts = ["hello", "abc de"]
    out = client.completions.create(model="gamma", prompt=prompts, n=3, max_tokens=0, echo=True, logprobs=1)
    assert len(out.choices) == 6
    for c in out.choices:
        p = prompts[c.index // 3]
        *_, ids, lp = oracle(site, site["adapters"] / "gamma", p, 1)
        assert c.text == p and c.logprobs.token_logprobs[0] is None
        assert c.logprobs.text_offset == list(range(len(p)))  # one byte token per character here
        for j in range(1, len(ids)):
            assert abs(c.logprobs.token_logprobs[j] - float(lp[j - 1][ids[j]])) < 1e-4


def test_chat_logprob_bytes_are_the_tokens_bytes(site, server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="none")
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=0, logprobs=True, top_logprobs=1,
                                          logit_bias={"256": -100})
    content = chat.choices[0].logprobs.content
    ids = [b for c in content for b in c.bytes]
    assert all(len(c.bytes) == 1 for c in content)  # the byte tokenizer: one byte per token, partial UTF-8 too
    assert bytes(ids).decode(errors="replace") == chat.choices[0].message.content


def test_odd_values_are_client_errors(site, server):
    for bias in ({"\u00b2": 1}, {"0" * 5000: 1}, {"\u0663": 1}, {"-1": 1}):
        r = httpx.post(server + "/v1/completions", json={"model": "alpha", "prompt": "a", "logit_bias": bias})
        assert r.status_code == 400, bias
    huge = site["adapters"] / "later" / "huge_alpha"
    make_adapter(huge, "huge_alpha", 2, ["q_proj", "v_proj"], 21)
    write_config(huge, lora_alpha=1e308)
    r = httpx.post(server + "/v1/adapters", json={"name": "huge_alpha", "path": "later/huge_alpha"})
    assert r.status_code == 400 and "overflow" in r.json()["error"]["message"]
    assert "/tmp" not in r.text  # the server's own paths are not shown to clients


def test_a_request_larger_than_the_queue_is_a_400_not_a_429(site):
    proc, url = start_cli("--model", str(site["model_dir"]), "--adapters", str(site["adapters"]), "--max-queue", "4")
    try:
        r = httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": ["a"] * 5, "max_tokens": 1})
        assert r.status_code == 400 and "queues at most 4" in r.json()["error"]["message"]
    finally:
        stop(proc)


def test_hostile_adapter_loads_do_not_stall_generation(site, server):
    evil = site["adapters"] / "later" / "evil2"
    make_adapter(evil, "evil2", 2, ["q_proj", "v_proj"], 8)
    write_config(evil, target_modules=EVIL)
    gaps, stamps = [], []

    def stream():
        body = {"model": "beta", "prompt": "b", "max_tokens": 400, "temperature": 0, "stream": True,
                "logit_bias": {"256": -100}}
        with httpx.stream("POST", server + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.time())

    t = threading.Thread(target=stream)
    t.start()
    while not stamps:
        time.sleep(0.01)
    with ThreadPoolExecutor(3) as ex:
        codes = list(ex.map(lambda _: httpx.post(server + "/v1/adapters", json={"name": "evil2", "path": "later/evil2"},
                                                  timeout=60).status_code, range(6)))
    t.join()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert set(codes) <= {400, 409} and 400 in codes
    assert max(gaps) < 0.5, max(gaps)  # (the checks ran beside the worker, not on it)


def test_a_refused_folder_does_not_decide_what_the_server_serves(site, tmp_path):
    adapters = tmp_path / "adapters"
    make_adapter(adapters / "good", "good", 2, ["q_proj"], 1)
    outside = tmp_path / "outside"
    make_adapter(outside, "o", 2, ["q_proj"], 2)
    write_config(outside, task_type="SEQ_CLS")
    os.symlink(outside, adapters / "linked")
    proc, url = start_cli("--model", str(site["model_dir"]), "--adapters", str(adapters))
    try:
        assert httpx.get(url + "/health").json()["task"] == "generate"
        assert complete(url, "good", "hello", 3).status_code == 200
    finally:
        stop(proc)


def test_stalled_bodies_cannot_pile_up_memory(site):
    import socket as so

    proc, url = start_cli("--model", str(site["model_dir"]), "--adapters", str(site["adapters"]),
                          "--max-pending-bytes", "1000000")
    socks = []
    try:
        port = int(url.rsplit(":", 1)[1])
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 3000000\r\n\r\n")
        answers = []
        for _ in range(3):  # each sends 600 KB of a 3 MB body and stalls
            s = so.create_connection(("127.0.0.1", port))
            s.sendall(head + b" " * 600_000)
            socks.append(s)
            time.sleep(0.3)
        socks[-1].settimeout(5)
        answers.append(socks[-1].recv(200))
        assert b" 503 " in answers[-1].split(b"\r\n")[0], answers
        assert complete(url, "alpha", "hello", 3).status_code == 200
    finally:
        for s in socks:
            s.close()
        stop(proc)
