"""`lorakit serve` as a real server process on loopback, driven by real clients (httpx, openai).

Oracle: the same saved base with one adapter loaded by lorakit.load_adapter, greedy-decoded by
transformers' generate() one prompt at a time. The server must give exactly that text for every
request while it batches requests for different adapters together, evicts adapters (capacity 2
for 4 adapters), and loads and unloads adapters at run time.
"""

import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lorakit as lk
from benchmarks.common import CHAT_TEMPLATE, byte_tokenizer, free_port, start_server  # noqa: F401 (other test modules import these from here)
from tiny import randomize, tiny_bert, tiny_llama

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

ADAPTERS = {"alpha": (2, ["q_proj", "v_proj"]), "beta": (4, "all-linear"), "gamma": (8, ["o_proj", "up_proj", "embed_tokens"])}
PROMPTS = ["hello world", "lorakit serves", "a", "many adapters on one base", "xyz xyz"]


def llama():
    return tiny_llama(vocab_size=258, max_position_embeddings=48, initializer_range=0.3, bos_token_id=None,
                      eos_token_id=256, pad_token_id=257, tie_word_embeddings=False)


def start(model_dir, adapters_dir, max_resident):
    return start_cli("--model", str(model_dir), "--adapters", str(adapters_dir), "--max-resident", str(max_resident))


def start_cli(*args, env=None):
    """`lorakit serve ARGS` as a real process on a free loopback port; returns (process, url)."""
    return start_server(*args, "--wait-ms", "20", env=env, stdout=subprocess.PIPE)


def stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir, adapters = root / "base", root / "adapters"
    base = llama()
    base.save_pretrained(model_dir)
    tok = byte_tokenizer()
    tok.save_pretrained(model_dir)
    for i, (name, (r, targets)) in enumerate({**ADAPTERS, "delta": (3, ["k_proj", "gate_proj"])}.items()):
        m = llama()
        lk.inject(m, lk.LoraConfig(r=r, alpha=2 * r, targets=targets, init=False), name)
        torch.manual_seed(i)
        randomize(m, name, 0.4)
        lk.save_adapter(m, (adapters / "later" / name) if name == "delta" else (adapters / name), name)
    outside = root / "outside" / "evil"
    lk.save_adapter(m, outside, "delta")
    proc, url = start(model_dir, adapters, max_resident=2)
    yield {"url": url, "model_dir": model_dir, "adapters": adapters, "tok": tok, "outside": outside}
    stop(proc)


_expected: dict = {}


def expected(lm, adapter, prompt, n, chat=False):
    """Greedy text from transformers' generate() with that adapter alone (no batching, no padding)."""
    key = (str(lm["model_dir"]), adapter, prompt, n, chat)
    if key not in _expected:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(lm["model_dir"]).eval()
        if adapter is not None:
            path = lm["adapters"] / ("later/delta" if adapter == "delta" else adapter)
            lk.load_adapter(model, path, adapter)
        tok = lm["tok"]
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True) if chat else prompt
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 eos_token_id=256, pad_token_id=257)
        _expected[key] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return _expected[key]


def complete(url, model, prompt, n=6):
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0},
                   timeout=60)
    return r


def test_models_health_metrics(lm):
    url = lm["url"]
    ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    assert ids == [str(lm["model_dir"]), "alpha", "beta", "gamma"]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    assert [m.id for m in client.models.list()] == ids


def test_concurrent_mixed_adapters_match_single_adapter_model(lm):
    url, base = lm["url"], str(lm["model_dir"])
    jobs = [(m, p) for p in PROMPTS for m in ["alpha", "beta", "gamma", base]]
    want = {(m, p): expected(lm, None if m == base else m, p, 6) for m, p in jobs}
    assert len(set(want.values())) > len(PROMPTS)  # the adapters do change the answers
    with ThreadPoolExecutor(12) as ex:
        got = list(ex.map(lambda j: complete(url, *j), jobs * 2))
    for (m, p), r in zip(jobs * 2, got):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == m and body["object"] == "text_completion"
        assert body["choices"][0]["text"] == want[(m, p)], (m, p)
    metrics = httpx.get(url + "/metrics").text
    assert 'lorakit_requests_total{route="/v1/completions",code="200"}' in metrics
    batches = float(next(l.split()[-1] for l in metrics.splitlines() if l.startswith("lorakit_batches_total")))
    assert batches < len(jobs) * 2  # requests were batched together
    assert float(next(l.split()[-1] for l in metrics.splitlines() if l.startswith("lorakit_adapter_evictions_total"))) > 0


def test_openai_client_completions_chat_and_streaming(lm):
    client = openai.OpenAI(base_url=lm["url"] + "/v1", api_key="none")
    out = client.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert out.choices[0].text == expected(lm, "beta", PROMPTS[0], 6)
    chunks = list(client.completions.create(model="gamma", prompt=PROMPTS[1], max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected(lm, "gamma", PROMPTS[1], 6)
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0)
    assert chat.choices[0].message.content == expected(lm, "alpha", "hi", 5, chat=True)
    stream = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected(lm, "alpha", "hi", 5, chat=True)
    sampled = client.completions.create(model="beta", prompt="abc", max_tokens=4, temperature=0.8, seed=1)
    assert sampled.usage.completion_tokens <= 4


def test_bad_requests_get_4xx_json_and_server_keeps_serving(lm):
    url = lm["url"]
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    cases = [
        httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
        httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "x" * 60, "max_tokens": 2}),
        httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 100}),
        httpx.post(url + "/v1/completions", json={"model": "alpha"}),
        httpx.post(url + "/v1/adapters", json={"name": "evil", "path": str(lm["outside"])}),
        httpx.post(url + "/v1/adapters", json={"name": "evil", "path": "../outside/evil"}),
        httpx.post(url + "/v1/classify", json={"model": "alpha", "input": "x"}),
        httpx.delete(url + "/v1/adapters/nope"),
    ]
    for r in cases:
        assert 400 <= r.status_code < 500, r.text
        assert "message" in r.json()["error"]
    assert "too many tokens" in cases[1].json()["error"]["message"]
    assert "outside" in cases[4].json()["error"]["message"]
    # a failed load never replaces a working adapter of the same name
    broken = lm["adapters"] / "later" / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "adapter_config.json").write_text((lm["adapters"] / "alpha" / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    r = httpx.post(url + "/v1/adapters", json={"name": "alpha", "path": "later/broken", "replace": True})
    assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]
    assert httpx.post(url + "/v1/adapters", json={"name": "alpha", "path": "beta"}).status_code == 409
    r = complete(url, "alpha", PROMPTS[0])
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected(lm, "alpha", PROMPTS[0], 6)


def test_load_and_unload_while_requests_run(lm):
    url = lm["url"]
    stop_flag, results = threading.Event(), []

    def hammer(model, prompt):
        while not stop_flag.is_set():
            r = complete(url, model, prompt, 4)
            results.append((model, prompt, r.status_code, r.json()))

    threads = [threading.Thread(target=hammer, args=a) for a in [("alpha", PROMPTS[2]), ("beta", PROMPTS[3]), ("gamma", PROMPTS[4])]]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        r = httpx.post(url + "/v1/adapters", json={"name": "delta", "path": "later/delta"}, timeout=60)
        assert r.status_code == 200, r.text
        r = complete(url, "delta", PROMPTS[0], 4)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected(lm, "delta", PROMPTS[0], 4)
        assert httpx.delete(url + "/v1/adapters/delta").status_code == 200
        assert complete(url, "delta", PROMPTS[0], 4).status_code == 404
        time.sleep(0.2)
        assert httpx.delete(url + "/v1/adapters/gamma").status_code == 200  # while gamma requests run
        time.sleep(0.3)
    finally:
        stop_flag.set()
        for t in threads:
            t.join()
    assert len(results) > 6
    gamma_after = False
    for model, prompt, code, body in results:
        if model == "gamma" and code == 404:
            gamma_after = True
            continue
        assert code == 200, body
        assert not (model == "gamma" and gamma_after), "gamma answered after its unload was seen"
        assert body["choices"][0]["text"] == expected(lm, model, prompt, 4), (model, prompt)
    assert gamma_after
    ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    assert "gamma" not in ids and "delta" not in ids
    # bring gamma back for anyone after us
    assert httpx.post(url + "/v1/adapters", json={"name": "gamma", "path": "gamma"}).status_code == 200


def test_classify_server(tmp_path):
    """Mixed requests for adapters with 3- and 5-label heads: each its own probabilities and labels."""
    model_dir, adapters = tmp_path / "bert", tmp_path / "adapters"
    base = tiny_bert(num_labels=3, vocab_size=258)
    base.save_pretrained(model_dir)
    tok = byte_tokenizer()
    tok.save_pretrained(model_dir)
    heads = {"pos": 3, "neg": 3, "five": 5}

    def bert_with(n):
        m = tiny_bert(num_labels=n, vocab_size=258).eval()
        m.bert.load_state_dict(base.bert.state_dict())
        return m

    for i, (name, n) in enumerate(heads.items()):
        m = bert_with(n)
        lk.inject(m, lk.LoraConfig(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"], init=False,
                                   task_type="SEQ_CLS" if n != 3 else None), name)
        torch.manual_seed(i)
        randomize(m, name, 0.4)
        lk.save_adapter(m, adapters / name, name)
    # `lorakit train` writes the class names beside the adapter; "pos"/"neg" carry none (LABEL_i)
    five = ["sport", "tech", "politics", "business", "film"]
    (adapters / "five" / "metrics.json").write_text(json.dumps({"labels": five}))
    proc, url = start(model_dir, adapters, max_resident=2)
    try:
        texts = ["good", "bad movie", "ok"]
        jobs = [(n, t) for t in texts for n in ["pos", "five", "neg", str(model_dir)]]
        with ThreadPoolExecutor(8) as ex:
            got = list(ex.map(lambda j: httpx.post(url + "/v1/classify", json={"model": j[0], "input": j[1]}, timeout=60), jobs))
        from transformers import AutoModelForSequenceClassification

        for (n, t), r in zip(jobs, got):
            assert r.status_code == 200, r.text
            if n == str(model_dir):
                m = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
            else:  # the oracle: the base built with this adapter's label count, the adapter loaded alone
                m = bert_with(heads[n])
                lk.load_adapter(m, adapters / n, n)
            with torch.no_grad():
                want = m(**tok(t, return_tensors="pt")).logits.softmax(-1)[0]
            d = r.json()["data"][0]
            torch.testing.assert_close(torch.tensor(d["probs"]), want, atol=1e-5, rtol=1e-4)
            names = five if n == "five" else [f"LABEL_{i}" for i in range(3)]
            assert d["label_id"] == int(want.argmax()) and d["label"] == names[d["label_id"]]
        assert len({r.json()["data"][0]["label"] for (n, _), r in zip(jobs, got) if n == "five"} - set(five)) == 0
        listed = {m["id"]: m["labels"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert listed["five"] == five and listed["pos"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
        r = httpx.post(url + "/v1/completions", json={"model": "pos", "prompt": "x"})
        assert r.status_code == 400
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def long_lm(tmp_path_factory):
    """A base with a 512-token context (long generations) and two adapters."""
    root = tmp_path_factory.mktemp("serve_long")
    model_dir, adapters = root / "base", root / "adapters"
    base = tiny_llama(vocab_size=258, max_position_embeddings=512, initializer_range=0.3, bos_token_id=None,
                      eos_token_id=256, pad_token_id=257, tie_word_embeddings=False)
    base.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        m = type(base)(base.config)
        m.load_state_dict(base.state_dict())
        lk.inject(m, lk.LoraConfig(r=r, alpha=2 * r, targets=targets, init=False), name)
        torch.manual_seed(10 + i)
        randomize(m, name, 0.4)
        lk.save_adapter(m, adapters / name, name)
    return {"model_dir": model_dir, "adapters": adapters, "tok": byte_tokenizer()}


def _metric(url, name):
    return float(next(l.split()[-1] for l in httpx.get(url + "/metrics").text.splitlines() if l.startswith(name)))


def test_requests_join_a_running_generation_and_leave_before_it(long_lm):
    """Continuous batching: requests sent while a long generation decodes join its batch (other
    adapters, prompts longer and shorter than its cache) and finish first; every text is exact."""
    proc, url = start(long_lm["model_dir"], long_lm["adapters"], max_resident=3)
    try:
        n_long = 300
        want_long = expected(long_lm, "alpha", "b", n_long)
        assert len(want_long) > 150  # the oracle does run long (no early end of sequence)
        got, first, finished = [], threading.Event(), threading.Event()

        def long_job():
            body = {"model": "alpha", "prompt": "b", "max_tokens": n_long, "temperature": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        got.append(json.loads(line[6:])["choices"][0]["text"])
                        first.set()
            finished.set()

        t = threading.Thread(target=long_job)
        t.start()
        assert first.wait(60)
        shorts = [("beta", PROMPTS[3] * 3), ("gamma", PROMPTS[4])]  # 75 tokens (> the running cache), then 7
        for model, prompt in shorts:
            r = complete(url, model, prompt, 3)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected(long_lm, model, prompt, 3), model
            assert not finished.is_set(), "the short request waited for the long one"
        t.join(120)
        assert "".join(got) == want_long
        assert _metric(url, "lorakit_rows_joined_total") >= 2
    finally:
        stop(proc)


@pytest.mark.parametrize("why", ["cache", "option"])
def test_engine_runs_one_batch_at_a_time_without_an_editable_cache_or_when_asked(long_lm, monkeypatch, why):
    """A KV cache the engine cannot edit (not a DynamicCache of full-attention layers), or
    continuous=False (`--static-batching`): requests wait for the running batch to end instead of
    joining it, and still get exact answers."""
    from lorakit.serve import engine as eng

    if why == "cache":
        monkeypatch.setattr(eng._Running, "kv", lambda self, new=None: None)
    e = eng.Engine(str(long_lm["model_dir"]), long_lm["adapters"], max_resident=3, wait_ms=1,
                   continuous=why == "cache")
    try:
        jobs = [("alpha", PROMPTS[0], 12), ("beta", PROMPTS[3], 3), (None, PROMPTS[1], 5), ("gamma", PROMPTS[2], 9)]
        outs = []
        for model, prompt, n in jobs:
            done, text = threading.Event(), []

            def emit(ev, payload, text=text, done=done):
                if ev == "delta":
                    text.append(payload[1])
                elif ev in ("finish", "error"):
                    done.set()
            key = e.pin(model if model else e.base_name)
            e.submit(eng.GenRequest(key, long_lm["tok"](prompt)["input_ids"], n, 0.0, emit=emit))
            outs.append((model, prompt, n, text, done))
            time.sleep(0.005)  # the later ones arrive while the first decodes
        for model, prompt, n, text, done in outs:
            assert done.wait(60)
            assert "".join(text) == expected(long_lm, model, prompt, n), model
        assert e.metrics["rows_joined"] == 0 and e.metrics["batches"] >= 2
    finally:
        e.close()


class _Job:
    """One generation request submitted to an in-process Engine, with what came back."""

    def __init__(self, e, model, prompt, n_tok, tok, n=1, seed=None, temperature=0.0, fail_on=None):
        from lorakit.serve import engine as eng

        self.text, self.reasons, self.err, self.done, self.fail_on = {}, {}, None, threading.Event(), fail_on
        self.req = eng.GenRequest(e.pin(model), tok(prompt)["input_ids"], n_tok, temperature, n=n, seed=seed,
                                  emit=self.emit)
        e.submit(self.req)

    def emit(self, ev, p):
        if ev == self.fail_on:
            raise RuntimeError("Event loop is closed")  # a client that went away
        if ev == "delta":
            self.text[p[0]] = self.text.get(p[0], "") + p[1]
        elif ev == "finish":
            self.reasons[p[0]] = p[1:]
            if len(self.reasons) == self.req.n:
                self.done.set()
        elif ev == "error":
            self.err = p
            self.done.set()


def test_engine_survives_odd_requests_and_clients_and_fails_what_is_left_on_close(long_lm):
    """A seed beyond 64 bits, max_tokens=0, a client whose event delivery raises: each request gets
    its answer or its error, the others are untouched, every adapter pin is released; close()
    answers the running and waiting requests with an error instead of leaving them hanging."""
    from lorakit.serve import engine as eng

    tok = long_lm["tok"]
    e = eng.Engine(str(long_lm["model_dir"]), long_lm["adapters"], max_resident=3, wait_ms=1)
    try:
        big = _Job(e, "alpha", "hello", 4, tok, n=2, seed=2**64 - 1, temperature=0.9)
        zero = _Job(e, "beta", "hello", 0, tok)
        gone = _Job(e, "gamma", "hello", 3, tok, fail_on="finish")
        ok = _Job(e, "beta", PROMPTS[0], 5, tok)
        for j in (big, zero, ok):
            assert j.done.wait(60) and j.err is None
        assert len(big.reasons) == 2 and all(r == ("length", 4) for r in big.reasons.values())
        assert zero.text == {} and zero.reasons == {0: ("length", 0)}
        assert ok.text[0] == expected(long_lm, "beta", PROMPTS[0], 5)
        deadline = time.time() + 30
        while e._pending and time.time() < deadline:  # gone's pin comes back although its client raised
            time.sleep(0.01)
        assert not e._pending and e._worker.is_alive()
        running = _Job(e, "alpha", "b", 300, tok)
        time.sleep(0.05)
        e.close()
        assert running.done.wait(10) and "shutting down" in str(running.err)
        assert not e._pending
    finally:
        e.close()


def test_a_row_ending_on_eos_flushes_a_held_back_partial_character(long_lm):
    """Streaming holds back text ending in a partial UTF-8 character; when the row then ends on
    end-of-sequence, the client still gets what generate() would decode (the replacement char)."""
    from collections import Counter
    from types import SimpleNamespace

    from lorakit.serve import engine as eng

    tok, got = long_lm["tok"], []
    req = eng.GenRequest(None, [1], 10, emit=lambda ev, p: got.append((ev, p)))
    req.rows_left = 1
    fake = SimpleNamespace(tokenizer=tok, eos={256}, metrics=Counter(), _close=lambda r: None)
    row = eng._Row(req, 0, None)
    for t in (ord("h"), 0xC3, 256):  # 'h', the first byte of 'é', end of sequence
        eng.Engine._emit_token(fake, row, t)
    text = "".join(p[1] for ev, p in got if ev == "delta")
    assert text == tok.decode([ord("h"), 0xC3], skip_special_tokens=True) == "h\ufffd"
    assert got[-1] == ("finish", (0, "stop", 2))


def emit_of(text, done):
    def emit(ev, payload):
        if ev == "delta":
            text.append(payload[1])
        elif ev in ("finish", "error"):
            done.set()
    return emit


def test_engine_hands_the_frozen_head_a_contiguous_input(long_lm):
    """The engine keeps only the last position's logits (logits_to_keep=1): a strided slice that,
    with the served model's frozen head, takes torch's slow broadcast matmul unless copied."""
    from lorakit.serve import engine as eng

    e = eng.Engine(str(long_lm["model_dir"]), long_lm["adapters"], max_resident=3, wait_ms=300)
    try:
        seen = []
        e.model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
        jobs = [("alpha", PROMPTS[3]), ("beta", PROMPTS[0]), (None, PROMPTS[1])]  # one prefill of 3 rows
        outs = []
        for model, prompt in jobs:
            outs.append((model, prompt, [], threading.Event()))
        for model, prompt, text, done in outs:  # submitted together: one batch
            e.submit(eng.GenRequest(e.pin(model or e.base_name), long_lm["tok"](prompt)["input_ids"], 4, 0.0,
                                    emit=emit_of(text, done)))
        for model, prompt, text, done in outs:
            assert done.wait(60)
            assert "".join(text) == expected(long_lm, model, prompt, 4), model
        assert e.metrics["batches"] == 1 and seen and all(seen)
    finally:
        e.close()
