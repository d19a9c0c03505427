"""`lorakit train --precision`: what auto picks, what is refused before anything loads, and that a
bf16 run learns what a float32 run learns (same seeds, same budget)."""

import json

import pytest
import torch

from lorakit.cli import main as cli_main
from lorakit.errors import LoraError
from lorakit.train import precision, train
from test_train_support import bert_folder, topic_records, write_jsonl

CPU = torch.device("cpu")


def test_auto_picks_bf16_only_where_the_hardware_runs_it_fast(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16", lambda: "AMX-BF16")
    p = precision.resolve("auto", CPU)
    assert p.name == "bf16" and p.dtype == "bfloat16" and "AMX-BF16" in p.why
    monkeypatch.setattr(precision, "cpu_bf16", lambda: None)
    p = precision.resolve("auto", CPU)
    assert p.name == "fp32" and "no fast bf16" in p.why
    with pytest.raises(LoraError, match="no fast bf16.*--precision fp32"):
        precision.resolve("bf16", CPU)
    with pytest.raises(LoraError, match="CPUs have no fast float16"):
        precision.resolve("fp16", CPU)
    with pytest.raises(LoraError, match="with --full"):
        precision.resolve("fp16", torch.device("cuda"), full=True)


def test_this_machines_cpu_flags_are_read():
    """cpu_bf16 reads /proc/cpuinfo (the oracle: the flags themselves)."""
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    want = "amx_bf16" in flags or "avx512_bf16" in flags or "bf16" in flags
    assert (precision.cpu_bf16() is not None) == want


def test_unsupported_precision_fails_before_the_model_loads(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(precision, "cpu_bf16", lambda: None)
    code = cli_main(["train", "--model", str(tmp_path / "no-such-model"), "--data", str(tmp_path / "no.jsonl"),
                     "--out", str(tmp_path / "o"), "--precision", "bf16", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--precision bf16" in err and "no-such-model" not in err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prec")
    return {"bert": bert_folder(root / "bert"), "train": write_jsonl(root / "train.jsonl", topic_records(60)),
            "eval": write_jsonl(root / "eval.jsonl", topic_records(30, seed=1))}


def test_bf16_learns_what_fp32_learns(data, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16", lambda: "AMX-BF16")  # (where it is not: emulated, same numbers)
    runs = {}
    for p in ("fp32", "bf16"):
        res = train(model=str(data["bert"]), data=str(data["train"]), eval_data=str(data["eval"]),
                    out=str(tmp_path / p), epochs=6, batch_size=6, lr=2e-2, threads=1, progress=False, precision=p)
        runs[p] = res
        m = json.loads((tmp_path / p / "metrics.json").read_text())
        assert m["precision"] == p
    bf16 = runs["bf16"]
    assert bf16.model.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16  # the base in bf16
    layer = bf16.model.bert.encoder.layer[0].attention.self.query
    assert layer.lora_A["default"].dtype == torch.float32  # master weights in float32
    head = bf16.model.classifier.modules_to_save["default"]
    assert head.weight.dtype == torch.float32  # the trained head too
    acc = {p: r.metrics["final_eval"]["accuracy"] for p, r in runs.items()}
    assert acc["fp32"] >= 0.8 and abs(acc["bf16"] - acc["fp32"]) <= 0.1, acc
