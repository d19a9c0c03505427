"""`lorakit train` end to end on tiny real architectures (folders saved with save_pretrained)."""

from __future__ import annotations

import json

import pytest
import torch

from test_train_support import bert_folder, llama_folder, prompt_records, topic_records, write_jsonl

import lorakit as lk
from lorakit import LoraError, TargetError
from lorakit.cli import main as cli_main
from lorakit.train import TrainConfig, train


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "bert": bert_folder(root / "bert"),
        "llama": llama_folder(root / "llama"),
        "train": write_jsonl(root / "train.jsonl", topic_records(60)),
        "eval": write_jsonl(root / "eval.jsonl", topic_records(30, seed=1)),
        "ptrain": write_jsonl(root / "ptrain.jsonl", prompt_records(60)),
        "peval": write_jsonl(root / "peval.jsonl", prompt_records(12, seed=1)),
    }


def test_classification_lora_learns_and_peft_reads_the_adapter(folders, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    res = train(model=str(folders["bert"]), data=str(folders["train"]), eval_data=str(folders["eval"]),
                out=str(tmp_path / "o"), epochs=6, batch_size=6, lr=2e-2, threads=1, progress=False,
                precision="fp32")  # (the PEFT reference below runs a float32 base)
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    for key in ("trainable_params", "trainable_fraction", "adapter_bytes", "base_bytes", "peak_memory_mb",
                "wall_time_s", "epochs", "loss_history", "labels"):
        assert key in m, key
    assert len(m["epochs"]) == 6 and all("accuracy" in e["eval"] and "macro_f1" in e["eval"] for e in m["epochs"])
    assert m["labels"] == ["money", "sport", "tech"]
    assert m["epochs"][-1]["eval"]["accuracy"] >= 0.8  # three word-lists: learnable; chance is 1/3
    assert m["adapter_bytes"] == (tmp_path / "o" / "adapter_model.safetensors").stat().st_size
    assert (tmp_path / "o" / "loss.png").stat().st_size > 1000
    assert not (tmp_path / "o" / "checkpoints").exists()
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["query", "value"] and cfg["modules_to_save"] == ["classifier"]

    # independent reference: PEFT loads our file onto a fresh base and predicts the same
    base = AutoModelForSequenceClassification.from_pretrained(folders["bert"], num_labels=3)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "o").eval()
    x = torch.randint(3, 300, (4, 9))
    res.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, res.model(input_ids=x).logits)


def test_causal_lm_learns_completions(folders, tmp_path):
    res = train(model=str(folders["llama"]), data=str(folders["ptrain"]), eval_data=str(folders["peval"]),
                task="causal-lm", out=str(tmp_path / "o"), epochs=8, batch_size=6, lr=1e-2,
                targets="all-linear", max_new_tokens=4, threads=1, progress=False)
    e = res.metrics["epochs"]
    assert {"loss", "perplexity", "exact_match"} <= set(e[-1]["eval"])
    assert e[-1]["eval"]["loss"] < e[0]["eval"]["loss"]
    assert e[-1]["eval"]["exact_match"] >= 0.5
    assert abs(e[-1]["eval"]["perplexity"] - torch.tensor(e[-1]["eval"]["loss"]).exp().item()) < 1e-3
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) >= {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"}
    assert cfg["task_type"] == "CAUSAL_LM"


def test_full_and_head_only_through_the_same_loop(folders, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    common = dict(model=str(folders["bert"]), data=str(folders["train"]), eval_data=str(folders["eval"]),
                  epochs=1, batch_size=10, threads=1, progress=False)
    full = train(full=True, out=str(tmp_path / "full"), **common)
    assert full.metrics["mode"] == "full" and full.metrics["trainable_fraction"] == 1.0
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full" / "model").eval()
    x = torch.randint(3, 300, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, full.model.eval()(input_ids=x).logits)

    head = train(head_only=True, out=str(tmp_path / "head"), **common)
    assert head.metrics["trainable_params"] == 32 * 3 + 3
    before = load_file(str(folders["bert"] / "model.safetensors"))
    after = load_file(str(tmp_path / "head" / "model" / "model.safetensors"))
    names = {k: "bert." + k if "bert." + k in after else k for k in before}
    changed = {k for k, k2 in names.items() if not torch.equal(before[k].to(after[k2].dtype), after[k2])}
    assert changed == set()  # the frozen base really stayed frozen (saved in the run's precision)


def test_targets_option(folders, tmp_path):
    common = dict(model=str(folders["llama"]), data=str(folders["ptrain"]), task="causal-lm", steps=1,
                  threads=1, progress=False)
    res = train(targets="q_proj,v_proj", out=str(tmp_path / "a"), **common)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    assert len(lk.find_targets(res.model, lk.get_config(res.model, "default"))) == 4
    with pytest.raises(TargetError, match="match no module.*q_proj"):
        train(targets="nope", out=str(tmp_path / "b"), **common)


def test_cli_toml_config_and_errors(folders, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f'[train]\nmodel = "{folders["bert"]}"\ndata = "{folders["train"]}"\n'
                    f'out = "{tmp_path / "o"}"\nsteps = 2\nbatch-size = 4\nthreads = 1\n')
    assert cli_main(["train", "--config", str(toml), "--r", "4", "--quiet"]) == 0
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg["r"] == 4  # the command line wins over the file
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["steps"] == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"txt": "c", "label": "x"}\n')
    code = cli_main(["train", "--model", str(folders["bert"]), "--data", str(bad), "--out", str(tmp_path / "p")])
    assert code == 2
    assert "bad.jsonl:3: missing column 'text'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()  # validated before anything was loaded or written

    with pytest.raises(LoraError, match="unknown train options.*'epoch'"):
        TrainConfig.from_dict({"model": "m", "data": "d", "out": "o", "epoch": 2})
    with pytest.raises(LoraError, match="epochs or steps, not both"):
        TrainConfig(model="m", data="d", out="o", epochs=1, steps=3)


def test_model_argument_resolution(tmp_path, monkeypatch):
    from lorakit import models

    with pytest.raises(LoraError, match="not a folder and not an embedded name"):
        models.model_path(str(tmp_path / "missing"))
    with pytest.raises(LoraError, match="config.json is missing"):
        models.model_path(str(tmp_path))
    assert (models.model_path("minilm") / "config.json").is_file()

    # the cache conversion is atomic: a crash mid-build leaves nothing that looks finished
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    calls = []

    def crash(dest):
        (dest / "config.json").write_text("{}")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        models.cached_conversion("m", crash)
    assert not (tmp_path / "cache" / "m").exists()

    def build(dest):
        calls.append(dest)
        (dest / "config.json").write_text("{}")

    first = models.cached_conversion("m", build)
    assert models.cached_conversion("m", build) == first and len(calls) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["m"]  # no temp folders left


def _head_inputs(model) -> tuple[list[bool], object]:
    seen: list[bool] = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    return seen, handle


def test_generate_hands_a_frozen_head_a_contiguous_input():
    """transformers' generate gives the head a strided slice (the last position only); with a frozen
    head weight torch's CPU matmul then broadcasts the vocab x hidden weight over the batch (seconds
    and a GB for SmolLM2 in bf16). lorakit's generate copies the slice; the answers are unchanged."""
    from tiny import tiny_llama

    from lorakit.train import generate

    class Tok:
        pad_token_id, eos_token_id = 0, 127

        def decode(self, row, skip_special_tokens=True):
            return " ".join(map(str, row))

    model = tiny_llama(pad_token_id=0).requires_grad_(False)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    seen, handle = _head_inputs(model)
    ids = torch.tensor([[0, 5, 6, 7, 8], [0, 0, 0, 9, 10], [0, 0, 11, 12, 13]])
    plain = model.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=3, do_sample=False,
                           pad_token_id=0, eos_token_id=127)
    assert not all(seen), "transformers no longer slices the head's input: this fix may go"
    seen.clear()
    texts = generate(model, Tok(), prompts, 3, batch_size=3)
    handle.remove()
    assert seen and all(seen)
    width = ids.shape[1]
    assert texts == [" ".join(map(str, row)) for row in plain[:, width:].tolist()]
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook left with the call
