"""Saving and loading: bad input fails cleanly (named file/key/shape, model untouched), writes are atomic."""

import json
import os
import pickle
import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit import io as lkio
from tiny import tiny_llama


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snap):
    now = model.state_dict()
    assert list(now) == list(snap)
    for k, v in snap.items():
        assert torch.equal(now[k], v), k


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, targets=["q_proj", "v_proj"], init=False))
    folder = tmp_path / "adapter"
    lk.save_adapter(model, folder)
    return folder


def _fresh_with_other_adapter():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2, targets=["o_proj"], init=False), "other")
    return model


def _expect_refusal(model, folder, match):
    snap = _snapshot(model)
    adapters = lk.list_adapters(model)
    with pytest.raises(lk.LoraError, match=match):
        lk.load_adapter(model, folder, "new")
    _assert_unchanged(model, snap)
    assert lk.list_adapters(model) == adapters


def test_truncated_safetensors(saved):
    f = saved / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _expect_refusal(_fresh_with_other_adapter(), saved, "adapter_model.safetensors")


def test_corrupt_header(saved):
    f = saved / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    _expect_refusal(_fresh_with_other_adapter(), saved, "adapter_model.safetensors")


def test_adapter_for_another_model_names_key_and_shapes(saved):
    model = tiny_llama(hidden_size=64, intermediate_size=64)
    snap = _snapshot(model)
    with pytest.raises(lk.LoraError) as err:
        lk.load_adapter(model, saved)
    msg = str(err.value)
    assert "lora_A.weight" in msg and "(4, 32)" in msg and "(4, 64)" in msg
    _assert_unchanged(model, snap)
    assert lk.list_adapters(model) == []


def test_missing_key(saved):
    f = saved / "adapter_model.safetensors"
    tensors = load_file(f)
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[gone]
    save_file(tensors, f)
    _expect_refusal(_fresh_with_other_adapter(), saved, "lora_B partner is missing")


def test_key_naming_a_module_that_is_not_there(saved):
    f = saved / "adapter_model.safetensors"
    tensors = load_file(f)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
    save_file(tensors, f)
    _expect_refusal(_fresh_with_other_adapter(), saved, "layers.7")


def test_config_naming_a_module_that_is_not_there(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["target_modules"] = ["query_key_value"]
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    _expect_refusal(_fresh_with_other_adapter(), saved, "query_key_value")


def test_broken_config_json_names_file(saved):
    (saved / "adapter_config.json").write_text('{"r": 4,')
    _expect_refusal(_fresh_with_other_adapter(), saved, "adapter_config.json")
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": -1}))
    _expect_refusal(_fresh_with_other_adapter(), saved, "r=-1")


def test_rank_disagreeing_with_config(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["r"] = 8
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    _expect_refusal(_fresh_with_other_adapter(), saved, "rank 4")


def test_pickle_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "old_adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    model = tiny_llama()
    with pytest.raises(lk.AdapterFileError) as err:
        lk.load_adapter(model, folder)
    assert "adapter_model.bin" in str(err.value) and "safetensors" in str(err.value)
    assert "weights_only=True" in str(err.value)  # says how to convert
    assert not marker.exists()


def test_missing_folder_and_files(tmp_path):
    model = tiny_llama()
    with pytest.raises(lk.AdapterFileError, match="no such adapter folder"):
        lk.load_adapter(model, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(lk.AdapterFileError, match="adapter_model.safetensors is missing"):
        lk.load_adapter(model, tmp_path / "empty")


def test_save_is_atomic(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = tiny_llama(seed=5)
    lk.inject(model, lk.LoraConfig(r=4, targets=["q_proj", "v_proj"], init=False))

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(lkio, "write_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        lk.save_adapter(model, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # old adapter intact, no temp files
    assert [p.name for p in saved.parent.iterdir()] == ["adapter"]  # no temp leftovers
    monkeypatch.undo()
    lk.save_adapter(model, saved)  # and a good save replaces it
    assert {p.name: p.read_bytes() for p in saved.iterdir()} != before


def test_replace_is_all_or_nothing(saved, tmp_path, tokens):
    model = tiny_llama()
    lk.load_adapter(model, saved, "a")
    good = model(tokens).logits
    with pytest.raises(lk.LoraError, match="already loaded"):
        lk.load_adapter(model, saved, "a")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(lk.LoraError):
        lk.load_adapter(model, bad, "a", replace=True)
    torch.testing.assert_close(model(tokens).logits, good)  # the working adapter survived
    lk.load_adapter(model, saved, "a", replace=True)
    torch.testing.assert_close(model(tokens).logits, good)


def test_embedding_adapter_round_trip_with_peft(tmp_path, tokens):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(tiny_llama(), PeftLoraConfig(r=3, lora_alpha=6, target_modules=["embed_tokens", "q_proj"],
                                                          init_lora_weights=False))
    expected = pm.eval()(tokens).logits
    pm.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    model = tiny_llama()
    lk.load_adapter(model, tmp_path)
    torch.testing.assert_close(model(tokens).logits, expected, atol=1e-5, rtol=1e-5)
    lk.save_adapter(model, tmp_path / "ours")
    lora_keys = {k for k in keys if "base_layer" not in k}  # PEFT also copies the whole embedding
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == lora_keys
    back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(back(tokens).logits, expected, atol=1e-5, rtol=1e-5)


def test_trainable_load_resumes_training(saved, tokens):
    model = tiny_llama()
    lk.load_adapter(model, saved, trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen = tiny_llama()
    lk.load_adapter(frozen, saved)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert os.path.exists(saved / "adapter_config.json")


def test_save_into_a_folder_keeps_everything_else(saved, tmp_path):
    (saved / "notes").mkdir()
    (saved / "notes" / "run.txt").write_text("keep me")
    (saved / "README.md").write_text("mine")
    model = tiny_llama(seed=3)
    lk.inject(model, lk.LoraConfig(r=4, targets=["q_proj", "v_proj"], init=False))
    lk.save_adapter(model, saved)
    assert (saved / "notes" / "run.txt").read_text() == "keep me"
    assert (saved / "README.md").read_text() == "mine"
    fresh = tiny_llama(seed=3)
    lk.load_adapter(fresh, saved)
    torch.testing.assert_close(fresh.model.layers[0].self_attn.q_proj.lora_A["default"],
                               model.model.layers[0].self_attn.q_proj.lora_A["default"])
    # a crash on a fresh folder leaves nothing behind
    new = tmp_path / "fresh_dest"

    def crash(tensors, path, metadata=None):
        raise KeyboardInterrupt("killed")

    import lorakit.io as lkio_mod
    orig = lkio_mod.write_weights
    lkio_mod.write_weights = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            lk.save_adapter(model, new)
    finally:
        lkio_mod.write_weights = orig
    assert not new.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".fresh_dest")]


def test_adapter_with_dropout_loaded_into_eval_model_is_deterministic(tmp_path, tokens):
    """A new adapter follows the model's train/eval mode: dropout stays off at inference."""
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, targets=["q_proj", "v_proj"], dropout=0.5, init=False))
    model.eval()
    expected = model(tokens).logits
    lk.save_adapter(model, tmp_path)
    fresh = tiny_llama().eval()
    lk.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(tokens).logits, expected)
    torch.testing.assert_close(fresh(tokens).logits, expected)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(peft_model(tokens).logits, expected, atol=1e-5, rtol=1e-5)
    fresh.train()
    torch.manual_seed(0)
    assert not torch.equal(fresh(tokens).logits, expected)  # and in training mode it does drop
