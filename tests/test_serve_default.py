"""`lorakit serve` with no arguments: the embedded base (minilm) with the demo's two adapters.

The real demo training takes minutes, so these tests never run it: `ensure_adapters`' reuse and
atomic publish are checked with a fake trainer, and the real server is started on adapters made
here for MiniLM (random LoRA + heads of 5 and 3 labels, like the demo's topic and sentiment).
"""

import json
import os

import pytest
import torch

import lorakit as lk
from lorakit.cli import demo
from tiny import randomize

NAMES = ["topic", "sentiment"]


def fake_trainer(calls, fail_after=None):
    def train_lora(out, tasks, model=demo.DEMO_MODEL):
        calls.append([t.name for t in tasks])
        for i, t in enumerate(tasks):
            if fail_after is not None and i == fail_after:
                raise KeyboardInterrupt  # killed mid-way
            (out / t.name).mkdir(parents=True)
            for f in demo.ADAPTER_FILES:
                (out / t.name / f).write_text("{}")
    return train_lora


def test_ensure_adapters_trains_once_atomically_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    calls: list = []
    monkeypatch.setattr(demo, "train_lora", fake_trainer(calls, fail_after=1))
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_adapters()
    home = demo.adapters_home()
    assert not home.exists() and os.listdir(home.parent) == []  # no half set, no temp folder left
    monkeypatch.setattr(demo, "train_lora", fake_trainer(calls))
    model, folder = demo.ensure_adapters()
    assert (model, folder) == ("minilm", home) and sorted(p.name for p in folder.iterdir()) == sorted(NAMES)
    assert demo.ensure_adapters() == ("minilm", home)  # reused: no training
    assert calls == [NAMES, NAMES] and os.listdir(home.parent) == [home.name]
    # an explicit folder; an incomplete set there is replaced whole
    other = tmp_path / "other"
    (other / "topic").mkdir(parents=True)
    assert demo.ensure_adapters(other) == ("minilm", other) and len(calls) == 3
    assert all((other / n / f).is_file() for n in NAMES for f in demo.ADAPTER_FILES)


def test_a_demo_run_leaves_its_adapters_for_serve(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    for n in NAMES:
        (out / n / "lora").mkdir(parents=True)
        for f in demo.ADAPTER_FILES:
            (out / n / "lora" / f).write_text(n)
    tasks = demo.default_tasks()
    assert demo.publish_adapters(out, tasks, model="some/folder") is None  # not the default demo
    home = demo.publish_adapters(out, tasks, model="minilm")
    assert home == demo.adapters_home() and (home / "sentiment" / "metrics.json").read_text() == "sentiment"
    monkeypatch.setattr(demo, "train_lora", fake_trainer(calls := []))
    assert demo.ensure_adapters() == ("minilm", home) and calls == []
    assert demo.publish_adapters(out, tasks, model="minilm") is None  # a set is there: left alone


def random_minilm_adapter(folder, labels, seed):
    """A MiniLM classification adapter as `lorakit train` writes it, with random (untrained) weights."""
    from lorakit.models import load_model

    loaded = load_model("minilm", "classification", labels)
    m = loaded.model.eval()
    cfg = lk.LoraConfig(r=8, alpha=16, targets=["query", "value"], modules_to_save=["classifier"], init=False,
                        task_type="SEQ_CLS")
    lk.inject(m, cfg, "default")
    torch.manual_seed(seed)
    randomize(m, "default", 0.3)
    lk.save_adapter(m, folder, "default", base_model_name_or_path="minilm")
    (folder / "metrics.json").write_text(json.dumps({"labels": labels}))
    return m, loaded.tokenizer


def test_serve_with_no_arguments(tmp_path):
    httpx = pytest.importorskip("httpx")
    from test_serve import start_cli, stop

    try:
        from lorakit.models import model_path

        model_path("minilm")
    except lk.LoraError as e:
        pytest.skip(str(e))
    cache = tmp_path / "cache"
    labels = {"topic": ["business", "entertainment", "politics", "sport", "tech"],
              "sentiment": ["negative", "neutral", "positive"]}
    oracles = {n: random_minilm_adapter(cache / "demo-adapters" / n, labels[n], i) for i, n in enumerate(NAMES)}
    proc, url = start_cli(env={"LORAKIT_CACHE": str(cache)})
    try:
        texts = ["Shares fell as the bank cut its forecast", "what a lovely day", "The match ended in a draw"]
        jobs = [(n, t) for t in texts for n in NAMES]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(6) as ex:
            got = list(ex.map(lambda j: httpx.post(url + "/v1/classify", json={"model": j[0], "input": j[1]},
                                                   timeout=60), jobs))
        for (n, t), r in zip(jobs, got):
            assert r.status_code == 200, r.text
            m, tok = oracles[n]
            with torch.no_grad():
                want = m(**tok(t, return_tensors="pt")).logits.softmax(-1)[0]
            d = r.json()["data"][0]
            torch.testing.assert_close(torch.tensor(d["probs"]), want, atol=1e-5, rtol=1e-4)
            assert d["label"] == labels[n][int(want.argmax())]
        models = {m["id"]: m.get("labels") for m in httpx.get(url + "/v1/models").json()["data"]}
        assert models == {"minilm": None, **labels}
        # the base's head is freshly initialised: it does not answer, with a clear 400
        r = httpx.post(url + "/v1/classify", json={"model": "minilm", "input": "x"})
        assert r.status_code == 400 and "no trained classification head" in r.json()["error"]["message"]
    finally:
        stop(proc)
