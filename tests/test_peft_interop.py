"""Adapters move both ways between PEFT and lorakit with the same logits (PEFT is the reference)."""

import json
import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import lorakit as lk
from tiny import tiny_bert, tiny_gpt2, tiny_llama

CASES = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], None),
    "bert": (tiny_bert, ["query", "key", "value", "dense"], ["classifier"]),
}


def _peft_config(targets, extra, **kw):
    task = "SEQ_CLS" if extra else "CAUSAL_LM"
    return PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=extra, task_type=task, **kw)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_here_with_same_logits(case, rslora, tmp_path, tokens):
    build, targets, extra = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(build(), _peft_config(targets, extra, use_rslora=rslora, init_lora_weights=False))
    if extra:  # a trained head differs from the base's
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    peft_model.eval()
    expected = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path)

    model = build()
    plain = model(tokens).logits
    lk.load_adapter(model, tmp_path)
    torch.testing.assert_close(model(tokens).logits, expected, atol=1e-5, rtol=1e-5)
    assert (expected - plain).abs().max() > 1e-3  # the adapter really changes the output
    assert lk.get_config(model, "default").rslora is rslora


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_trained_here_loads_in_peft(case, tmp_path, tokens):
    build, targets, extra = CASES[case]
    model = build()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=targets, modules_to_save=extra,
                                   task_type="SEQ_CLS" if extra else "CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW(lk.adapter_parameters(model), lr=2e-2)
    for _ in range(4):
        loss = model(tokens).logits.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ours = model(tokens).logits
    lk.save_adapter(model, tmp_path / "a")

    # PEFT's file layout and config names
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in keys)
    assert any(k.endswith(".lora_A.weight") for k in keys) and any(k.endswith(".lora_B.weight") for k in keys)
    if extra:
        assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["fan_in_fan_out"] is (case == "gpt2")

    peft_model = PeftModel.from_pretrained(build(), tmp_path / "a").eval()
    torch.testing.assert_close(peft_model(tokens).logits, ours, atol=1e-5, rtol=1e-5)


def test_all_linear_adapter_round_trips_through_peft(tmp_path, tokens):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2, targets="all-linear", init=False))
    ours = model(tokens).logits
    lk.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(peft_model(tokens).logits, ours, atol=1e-5, rtol=1e-5)


def test_load_into_model_with_other_adapters(tmp_path, tokens):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_llama(), _peft_config(["q_proj", "v_proj"], None, init_lora_weights=False))
    expected = peft_model.eval()(tokens).logits
    peft_model.save_pretrained(tmp_path)
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=8, targets=["v_proj", "o_proj"], init=False), "mine")
    mine = model(tokens).logits
    lk.load_adapter(model, tmp_path, "theirs")
    assert lk.active_adapters(model) == ["mine"]  # loading does not switch away from an active adapter
    torch.testing.assert_close(model(tokens).logits, mine)
    lk.set_adapter(model, "theirs")
    torch.testing.assert_close(model(tokens).logits, expected, atol=1e-5, rtol=1e-5)


def test_unknown_config_keys_warn_but_load(tmp_path, tokens):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2, targets=["q_proj"], init=False))
    out = model(tokens).logits
    lk.save_adapter(model, tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["some_future_peft_field"] = {"x": 1}
    cfg_path.write_text(json.dumps(cfg))
    fresh = tiny_llama()
    with pytest.warns(UserWarning, match="some_future_peft_field"):
        lk.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(tokens).logits, out)
