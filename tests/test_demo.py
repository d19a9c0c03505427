"""The demo's pieces on a tiny BERT (the real demo, on MiniLM, is `make demo`: minutes, not a test)."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_support import bert_folder, topic_records

from lorakit.cli.demo import DemoTask, run_demo
from lorakit.train.precision import bf16_hardware

KEYS = ("head_only_accuracy", "lora_accuracy", "full_accuracy", "trainable_fraction", "adapter_bytes",
        "base_bytes", "peak_memory_lora_mb", "peak_memory_full_mb")


def _two(records):
    return [dict(r, label="tech" if r["label"] == "tech" else "other") for r in records]


BF16 = pytest.mark.skipif(not bf16_hardware(torch.device("cpu"))[0], reason="this CPU has no fast bf16")


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=BF16)])
def test_demo_summary_swap_and_merge_on_a_tiny_model(tmp_path, precision):
    model = bert_folder(tmp_path / "bert")
    tasks = [
        DemoTask("topic", "3 word lists", lambda: (topic_records(40), topic_records(12, 1)), max_length=16,
                 epochs=1, batch_size=10),
        DemoTask("sentiment", "2 classes", lambda: (_two(topic_records(40, 2)), _two(topic_records(12, 3))),
                 max_length=16, epochs=1, batch_size=10),
    ]
    out = tmp_path / "demo"
    # jobs=0: the runs in this process (the subprocess runner is exercised by `make demo`)
    summary = run_demo(out, tasks, model=str(model), jobs=0, threads=1, precision=precision)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["precision"] == precision
    for name in ("topic", "sentiment"):  # every run trained in the precision asked for
        for mode in ("head", "lora", "full"):
            assert json.loads((out / name / mode / "metrics.json").read_text())["precision"] == precision
    assert saved["tasks"].keys() == {"topic", "sentiment"}
    for name, task in saved["tasks"].items():
        for key in KEYS:
            assert isinstance(task[key], (int, float)), (name, key)
        # the training run's own files back the summary
        lora = json.loads((out / name / "lora" / "metrics.json").read_text())
        assert task["lora_accuracy"] == lora["final_eval"]["accuracy"]
        assert task["adapter_bytes"] == (out / name / "lora" / "adapter_model.safetensors").stat().st_size
        full = json.loads((out / name / "full" / "metrics.json").read_text())
        assert task["peak_memory_full_mb"] == full["peak_memory_mb"] and full["trainable_fraction"] == 1.0
    swap = saved["swap"]
    assert swap["shared_base_object"] and swap["base_unchanged"]
    assert swap["base_checksum_before"] == swap["base_checksum_after_unmerge"]
    assert swap["merge"]["identical_predictions"]
    # accuracy through the shared base equals what each separate training run measured
    for name in ("topic", "sentiment"):
        assert abs(swap["accuracy_via_shared_base"][name] - saved["tasks"][name]["lora_accuracy"]) < 1e-9
    for png in ("accuracy.png", "loss_curves.png"):
        assert (out / png).stat().st_size > 1000
    assert summary == saved
