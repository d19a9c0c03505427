"""LoRA on quantized bases (bitsandbytes NF4 / LLM.int8, torchao int8 weight-only).

Oracles: the dense formula on the dequantized weight (dequantized by the library itself, not by
our kind), PEFT's own bnb LoRA layers on the same 4-bit base, and the library's own quantizer for
the merge error.
"""

import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

import bitsandbytes.functional as bnbF  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit import quant  # noqa: E402
from lorakit.kinds import LINEAR, kind_of  # noqa: E402
from tiny import tiny_bert, tiny_llama  # noqa: E402

# bitsandbytes/torchao want dims that are multiples of 64 (4-bit blocks, CPU kernels)
SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
TARGETS = ["q_proj", "v_proj", "down_proj"]
KIND = {"nf4": "bnb_4bit", "int8": "bnb_8bit", "int8-wo": "torchao_int8"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_llama(**SIZES).save_pretrained(path)
    return path


def _load(base_dir, how):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quant.load_quantized(base_dir, how)


def _library_dequant(module):
    """The base weight as (out x in), dequantized by the library's own API."""
    w = module.weight
    if type(w).__name__ == "Params4bit":
        return bnbF.dequantize_4bit(w.data, w.quant_state)
    if type(w).__name__ == "Int8Params":
        scb = w.SCB if w.SCB is not None else module.state.SCB
        return w.data.float() * scb.view(-1, 1) / 127
    return w.dequantize()


def _stored(module):
    """The raw quantized storage, to check the base never changes."""
    w = module.weight
    parts = [getattr(w, n) for n in ("qdata", "scale") if hasattr(w, n)] or [w.data]
    if getattr(w, "quant_state", None) is not None:
        parts.append(w.quant_state.absmax)
    return [p.detach().clone() for p in parts]


@pytest.mark.parametrize("how", ["nf4", "int8", "int8-wo"])
def test_output_equals_dense_reference_on_dequantized_weight(base_dir, how):
    model = _load(base_dir, how)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=TARGETS, init=False))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.kind.name == KIND[how]
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        W = _library_dequant(layer.base_layer).float()
        dW = layer.scaling["default"] * layer.lora_B["default"].float() @ layer.lora_A["default"].float()
        ref = x @ (W + dW).T
        if layer.base_layer.bias is not None:
            ref = ref + layer.base_layer.bias
        assert dW.abs().max() > 1e-3
    # LLM.int8 quantizes activations too in inference (a row-wise int8 x): looser there
    tol = 2e-2 if how == "int8" else 1e-5
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, atol=tol * ref.abs().max().item(), rtol=0)
    model.train()  # the backward-enabled path dequantizes in every library: exact
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["nf4", "int8", "int8-wo"])
def test_lora_trains_and_base_stays_quantized_and_unchanged(base_dir, how, tokens):
    model = _load(base_dir, how)
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, targets=TARGETS))
    bases = [layer.base_layer for _, layer in lk.layer.lora_layers(model)]
    before = [_stored(b) for b in bases]
    weight_types = [type(b.weight) for b in bases]
    params = lk.adapter_parameters(model)
    assert {p.dtype for p in params} == {torch.float32}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    model.eval()
    with torch.no_grad():
        model(tokens)  # an eval forward in between must not break training (bnb's CPU repacking)
    model.train()
    model(tokens, labels=tokens).loss.backward()
    for b, old, t in zip(bases, before, weight_types):
        assert type(b.weight) is t and b.weight.grad is None
        for x, y in zip(_stored(b), old):
            assert torch.equal(x, y)


def test_peft_qlora_adapter_loads_here_with_same_logits(base_dir, tmp_path, tokens):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    pm = get_peft_model(_load(base_dir, "nf4"), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                 task_type="CAUSAL_LM"))
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # PEFT's bnb layer
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    pm.train()
    for _ in range(4):  # trained by PEFT on the 4-bit base
        loss = pm(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    with torch.no_grad():
        expected = pm(tokens).logits
    pm.save_pretrained(tmp_path)

    model = _load(base_dir, "nf4")
    with torch.no_grad():
        plain = model(tokens).logits
        lk.load_adapter(model, tmp_path)
        got = model(tokens).logits
    assert model.model.layers[0].self_attn.q_proj.kind.name == "bnb_4bit"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (expected - plain).abs().max() > 1e-3


@pytest.mark.parametrize("how", ["nf4", "int8"])
def test_our_adapter_on_quantized_base_loads_in_peft(base_dir, how, tmp_path, tokens):
    from peft import PeftModel

    model = _load(base_dir, how)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=TARGETS, init=False))
    model.eval()
    with torch.no_grad():
        ours = model(tokens).logits
    lk.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(_load(base_dir, how), tmp_path).eval()
    with torch.no_grad():
        theirs = pm(tokens).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["nf4", "int8-wo"])
def test_merge_into_quantized_base_reports_requantization_error(base_dir, how, tokens):
    model = _load(base_dir, how)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=TARGETS, init=False))
    model.eval()
    layers = lk.layer.lora_layers(model)
    with torch.no_grad():
        exact = {p: _library_dequant(l.base_layer).float()
                 + l.scaling["default"] * l.lora_B["default"].float() @ l.lora_A["default"].float() for p, l in layers}
        unmerged = model(tokens).logits
        originals = {p: _stored(l.base_layer) for p, l in layers}
        report = lk.merge(model, keep_original=True)
        # the independent error: what the library's dequantizer reads back vs the exact float32 sum
        errors = [(_library_dequant(l.base_layer).float() - exact[p]).abs().max().item() for p, l in layers]
        merged = model(tokens).logits
    assert report.layers == len(layers)
    assert report.max_abs_error == pytest.approx(max(errors), rel=1e-6)
    assert report.max_abs_error > 0  # 4/8-bit grids cannot hold W + dW exactly
    assert all(type(l.base_layer.weight).__name__ in ("Params4bit", "Int8Tensor") for _, l in layers)
    assert (merged - unmerged).abs().max() < 0.5
    lk.unmerge(model)  # keep_original: the quantized weight comes back bit for bit
    for p, l in layers:
        for x, y in zip(_stored(l.base_layer), originals[p]):
            assert torch.equal(x, y)
    with pytest.raises(lk.LoraError, match="dequantize"):
        lk.merged_state_dict(model)


def test_dense_bf16_export_matches_adapted_model(base_dir, tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    model = _load(base_dir, "nf4")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=TARGETS, init=False))
    model.eval()
    with torch.no_grad():
        adapted = model(tokens).logits
    quant.dequantize(model)
    assert not any(quant.is_quantized(m) for m in model.modules())
    lk.unload(model, merge=True)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(plain.config, "quantization_config", None) is None
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, adapted, atol=1e-4, rtol=1e-4)


def test_kinds_and_errors(base_dir):
    assert kind_of(torch.nn.Linear(4, 4)) is LINEAR  # the weight-class lookup leaves plain layers alone
    with pytest.raises(lk.LoraError, match="quantize='int3'"):
        quant.load_quantized(base_dir, "int3")
    nf4 = _load(base_dir, "nf4")
    assert quant.model_bytes(nf4) < 0.5 * quant.model_bytes(tiny_llama(**SIZES))


def test_classifier_head_stays_dense_and_round_trips(tmp_path, tokens):
    from transformers import AutoModelForSequenceClassification

    tiny_bert(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    load = lambda: quant.load_quantized(tmp_path / "base", "nf4", model_class=AutoModelForSequenceClassification)  # noqa: E731
    model = load()
    assert type(model.classifier) is torch.nn.Linear and quant.is_quantized(model.bert.encoder.layer[0].attention.self.query)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"],
                                   task_type="SEQ_CLS"))
    opt = torch.optim.AdamW(lk.adapter_parameters(model), lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(tokens, labels=torch.tensor([0, 1, 2])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ours = model(tokens).logits
    lk.save_adapter(model, tmp_path / "a")
    again = lk.load_adapter(load(), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, ours, atol=1e-5, rtol=1e-5)


def test_cli_train_quantize(tmp_path, capsys):
    from test_train_support import prompt_records, tiny_tokenizer, write_jsonl
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.cli import main

    tok = tiny_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, max_position_embeddings=64,
                                 num_hidden_layers=2, **SIZES)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", prompt_records(16))
    args = ["train", "--model", str(tmp_path / "base"), "--data", str(data), "--task", "causal-lm", "--steps", "3",
            "--batch-size", "8", "--threads", "1", "--quiet", "--quantize", "nf4"]
    assert main(args + ["--out", str(tmp_path / "run")]) == 0
    model = quant.load_quantized(tmp_path / "base", "nf4")
    lk.load_adapter(model, tmp_path / "run")
    assert model.model.layers[0].self_attn.q_proj.kind.name == "bnb_4bit"
    assert main(args + ["--out", str(tmp_path / "full"), "--full"]) == 2
    assert "full fine-tuning cannot train a quantized base" in capsys.readouterr().err
