"""PEFT's newer LoRA fields against PEFT 0.21 (same files, same logits, both directions) and dense
references: lora_bias (a bias on B), trainable_token_indices (new rows of an embedding, tied and
untied heads), and init methods that only chose where A and B start (loaded as plain LoRA) or
changed the base (refused with PEFT's conversion route)."""

import json
import warnings

import pytest
import torch

import lorakit as lk
from lorakit.errors import AdapterFileError, LoraError, TargetError
from lorakit.layer import lora_layers
from lorakit.tokens import TokenLayer, token_layers
from tiny import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*|.*1-D lora.*")


def _llama(tie=False, bias=True, seed=0):
    return tiny_llama(seed, tie_word_embeddings=tie, attention_bias=bias, num_hidden_layers=1)


def _logits(m, x):
    with torch.no_grad():
        return m(x).logits


def _shake_peft(pm, what=("lora_", "trainable_tokens_delta"), std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if any(w in n for w in what):
                p.add_(torch.randn(p.shape, generator=g) * std)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---- lora_bias --------------------------------------------------------------------------------
@pytest.mark.parametrize("build,targets", [(_llama, ["q_proj", "v_proj", "gate_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_lora_bias_peft_both_directions(build, targets, tokens, tmp_path):
    pm = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_bias=True,
                                                      init_lora_weights=False)).eval()
    _shake_peft(pm)
    ref = _logits(pm, tokens)
    pm.save_pretrained(tmp_path / "peft")
    ours = build()
    lk.load_adapter(ours, tmp_path / "peft")
    assert lk.get_config(ours, "default").lora_bias
    assert torch.allclose(_logits(ours, tokens), ref, atol=1e-5)
    lk.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["lora_bias"] is True
    theirs, mine = lk.read_adapter(tmp_path / "peft")[1], lk.read_adapter(tmp_path / "ours")[1]
    assert set(mine) == set(theirs) and any(k.endswith(".lora_B.bias") for k in mine)
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    assert torch.allclose(_logits(back, tokens), ref, atol=1e-5)


def test_lora_bias_forward_is_scaled_and_merges_into_the_base_bias(tokens):
    m = _llama()
    lk.inject(m, lk.LoraConfig(r=4, alpha=12, targets=["q_proj", "o_proj"], lora_bias=True))
    q = m.model.layers[0].self_attn.q_proj
    assert lk.get_config(m, "default").lora_bias and torch.equal(q.lora_B_bias["default"], torch.zeros(32))
    base = _logits(m, tokens)
    torch.manual_seed(3)
    for p in lk.adapter_parameters(m):
        with torch.no_grad():
            p.normal_(0, 0.2)
    assert len(lk.adapter_parameters(m)) == 2 * 3  # A, B, bias on each of the two layers
    h = torch.randn(5, 32)
    s = q.scaling["default"]
    W, b = q.base_layer.weight, q.base_layer.bias
    dense = h @ (W + s * q.lora_B["default"] @ q.lora_A["default"]).T + b + s * q.lora_B_bias["default"]
    with torch.no_grad():
        assert torch.allclose(q(h), dense, atol=1e-5)
    ref = _logits(m, tokens)
    assert not torch.allclose(ref, base, atol=1e-3)
    before = _state(m)
    lk.merge(m, keep_original=True)
    assert torch.allclose(q.base_layer.bias, b.detach().new_tensor(before["model.layers.0.self_attn.q_proj.base_layer.bias"])
                          + s * q.lora_B_bias["default"].detach(), atol=1e-6)
    assert torch.allclose(_logits(m, tokens), ref, atol=1e-5)
    lk.unmerge(m)
    assert _same(_state(m), before)  # bit-exact, biases included
    lk.merge(m)
    lk.unmerge(m)
    assert all(torch.allclose(before[k], v, atol=1e-6) for k, v in m.state_dict().items())
    plain = _llama()
    plain.load_state_dict(lk.merged_state_dict(m))
    assert torch.allclose(_logits(plain, tokens), ref, atol=1e-5)


def test_lora_bias_merge_refused_without_a_base_bias(tokens):
    m = _llama()
    lk.inject(m, lk.LoraConfig(r=4, targets=["q_proj", "gate_proj"], lora_bias=True))  # gate_proj has no bias
    before = _state(m)
    with pytest.raises(LoraError, match="gate_proj.*has none"):
        lk.merge(m)
    assert _same(_state(m), before) and not any(layer.merged for _, layer in lora_layers(m))
    with pytest.raises(LoraError, match="no bias"):
        lk.merged_state_dict(m)


def test_lora_bias_refusals_and_mixed_batches(tokens, tmp_path):
    with pytest.raises(LoraError, match="init"):
        lk.LoraConfig(lora_bias=True, init="gaussian")
    with pytest.raises(LoraError, match="use_dora"):
        lk.LoraConfig(lora_bias=True, use_dora=True)
    with pytest.raises(LoraError, match="embedding"):
        lk.inject(_llama(), lk.LoraConfig(targets=["embed_tokens"], lora_bias=True))
    m = _llama()
    lk.inject(m, lk.LoraConfig(r=4, targets=["q_proj", "v_proj"], lora_bias=True), adapter="b")
    lk.inject(m, lk.LoraConfig(r=4, targets=["q_proj", "v_proj"]), adapter="p")
    for n in ("b", "p"):
        for p in lk.adapter_parameters(m, n):
            with torch.no_grad():
                p.normal_(0, 0.2)
    with lk.per_row(m, ["b", "p", None]):  # the reference loop runs the bias too
        mixed = _logits(m, tokens)
    for i, n in enumerate(["b", "p", None]):
        lk.set_adapter(m, n)
        assert torch.allclose(mixed[i], _logits(m, tokens)[i], atol=1e-5)
    lk.save_adapter(m, tmp_path / "b", adapter="b")
    with pytest.raises(LoraError, match="lora_bias adapters cannot share stacked slots"):
        lk.AdapterBank(_llama()).add("b", tmp_path / "b")


# ---- trainable_token_indices -------------------------------------------------------------------
TTI = [[3, 5, 17], {"embed_tokens": [3, 5, 17]}, {"embed_tokens": [3, 5, 17], "lm_head": [3, 5, 17]},
       {"lm_head": [2, 9]}]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("tti", TTI, ids=["list", "dict", "dict+head", "head"])
def test_trainable_tokens_peft_both_directions(tie, tti, tmp_path):
    x = torch.tensor([[3, 4, 5, 17, 9, 2], [1, 2, 3, 5, 17, 0]])
    if tie and "embed_tokens" not in tti and isinstance(tti, dict):
        with pytest.raises(TargetError, match="tied"):  # the head's rows are the embedding's
            lk.inject(_llama(tie), lk.LoraConfig(targets=["q_proj"], trainable_token_indices=tti))
        return
    pm = peft.get_peft_model(_llama(tie), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                                          trainable_token_indices=tti)).eval()
    _shake_peft(pm, std=1.0)
    ref = _logits(pm, x)
    pm.save_pretrained(tmp_path / "peft")
    ours = _llama(tie)
    lk.load_adapter(ours, tmp_path / "peft")
    assert torch.allclose(_logits(ours, x), ref, atol=1e-5)
    lk.save_adapter(ours, tmp_path / "ours")
    theirs, mine = lk.read_adapter(tmp_path / "peft")[1], lk.read_adapter(tmp_path / "ours")[1]
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    keys = [k for k in mine if k.endswith("token_adapter.trainable_tokens_delta")]
    assert len(keys) == (2 if (not tie and isinstance(tti, dict) and "lm_head" in tti and "embed_tokens" in tti) else 1)
    back = peft.PeftModel.from_pretrained(_llama(tie), tmp_path / "ours").eval()
    assert torch.allclose(_logits(back, x), ref, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_trainable_tokens_semantics_train_merge_unmerge(tie):
    x = torch.tensor([[3, 4, 5, 17, 9, 2]])
    m = _llama(tie)
    base = _logits(m, x)
    E0 = m.model.embed_tokens.weight.detach().clone()
    lk.inject(m, lk.LoraConfig(targets=["q_proj"], trainable_token_indices=[3, 5]))
    emb = m.model.embed_tokens
    assert isinstance(emb, TokenLayer) and isinstance(m.lm_head, TokenLayer) == tie
    rows = emb.trainable_tokens_delta["default"]
    assert torch.equal(rows, E0[[3, 5]])  # absolute rows, copied from the original ones
    assert torch.equal(_logits(m, x), base)
    m.train()
    opt = torch.optim.SGD(lk.adapter_parameters(m), lr=1.0)
    m(x, labels=x).loss.backward()
    assert emb.base_layer.weight.grad is None and rows.grad is not None
    opt.step()
    assert not torch.equal(rows, E0[[3, 5]]) and torch.equal(emb.base_layer.weight, E0)
    m.eval()
    ref = _logits(m, x)
    # dense reference: the rows written into a fresh model (its tied head sees them too)
    dense = _llama(tie)
    with torch.no_grad():
        dense.model.embed_tokens.weight[[3, 5]] = rows.detach()
        for path, layer in lora_layers(m):
            dense.get_submodule(path).weight.add_(layer.delta("default"))
    assert torch.allclose(_logits(dense, x), ref, atol=1e-5)
    before = _state(m)
    lk.merge(m, keep_original=True)
    assert torch.equal(emb.base_layer.weight[[3, 5]], rows.detach())
    assert torch.allclose(_logits(m, x), ref, atol=1e-5)
    lk.unmerge(m)
    assert _same(_state(m), before)
    sd = lk.merged_state_dict(m)
    plain = _llama(tie)
    plain.load_state_dict(sd)
    assert torch.allclose(_logits(plain, x), ref, atol=1e-5)
    lk.delete_adapter(m, "default")
    assert not token_layers(m) and torch.equal(_logits(m, x), base)


def test_trainable_tokens_refusals(tmp_path):
    x = torch.tensor([[3, 4, 5]])
    with pytest.raises(LoraError, match="modules_to_save"):
        lk.LoraConfig(trainable_token_indices={"embed_tokens": [1]}, modules_to_save=["embed_tokens"])
    with pytest.raises(LoraError, match="twice"):
        lk.LoraConfig(trainable_token_indices=[1, 1])
    m = _llama()
    before = _state(m)
    with pytest.raises(LoraError, match="out of range"):
        lk.inject(m, lk.LoraConfig(targets=["q_proj"], trainable_token_indices=[1000]))
    assert _same(_state(m), before) and not lora_layers(m)  # refused before the model changed
    with pytest.raises(TargetError, match="matches no module"):
        lk.inject(_llama(), lk.LoraConfig(targets=["q_proj"], trainable_token_indices={"embeddings": [1]}))
    with pytest.raises(TargetError, match="both"):
        lk.inject(_llama(), lk.LoraConfig(targets=["embed_tokens"], trainable_token_indices=[1]))
    m = _llama()
    lk.inject(m, lk.LoraConfig(targets=["q_proj"], trainable_token_indices=[3, 5]), adapter="a")
    lk.inject(m, lk.LoraConfig(targets=["q_proj"], trainable_token_indices=[5, 7]), adapter="b")
    lk.set_adapter(m, ["a", "b"])
    with pytest.raises(LoraError, match="both replace token row 5"):
        m(x)
    lk.set_adapter(m, "a")
    with pytest.raises(LoraError, match="mixed-adapter batch"):
        with lk.per_row(m, ["a"]):
            m(x)
    lk.save_adapter(m, tmp_path / "a", adapter="a")
    with pytest.raises(LoraError, match="trainable_token_indices adapters cannot share stacked slots"):
        lk.AdapterBank(_llama()).add("a", tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["trainable_token_indices"] = [3, 5, 6]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="3 token ids"):
        lk.load_adapter(_llama(), tmp_path / "a")


# ---- init methods -----------------------------------------------------------------------------
def _eva(model, tmp_path):
    """A real EVA adapter: PEFT's initialize_lora_eva_weights on random batches (fast at this size)."""
    pm = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=2.0, tau=0.9)), low_cpu_mem_usage=True)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (4, 12), generator=g),
                "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(4)]
    peft.initialize_lora_eva_weights(pm, batches, show_progress_bar=False)
    return pm.eval()


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "mica", "eva"])
def test_init_only_methods_load_as_plain_lora(init, tokens, tmp_path):
    build = lambda: tiny_llama(num_hidden_layers=2)
    if init == "eva":
        pm = _eva(build(), tmp_path)
    else:
        pm = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=init)).eval()
    _shake_peft(pm, what=("lora_A", "lora_B"))  # the starting point gives B @ A = 0: move away from it
    ref = _logits(pm, tokens)
    pm.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == init
    if init == "eva":  # EVA redistributed ranks and alphas under full module names
        assert saved["rank_pattern"] and saved["alpha_pattern"]
        assert all(k.startswith("model.layers.") for k in saved["rank_pattern"])
    ours = build()
    lk.load_adapter(ours, tmp_path / "peft", trainable=True)
    assert torch.allclose(_logits(ours, tokens), ref, atol=1e-5)
    if init == "eva":
        ranks = {path: layer.rank("default") for path, layer in lora_layers(ours)}
        assert {ranks[k] for k in saved["rank_pattern"]} and all(ranks[k] == v for k, v in saved["rank_pattern"].items())
    if init == "mica":  # MiCA trains A only (B, an SVD of W, stays frozen), as in PEFT
        frozen = {id(layer.lora_B["default"]) for _, layer in lora_layers(ours)}
        assert not frozen & {id(p) for p in lk.adapter_parameters(ours)}
        assert all(not layer.lora_B["default"].requires_grad for _, layer in lora_layers(ours))
    lk.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    assert torch.allclose(_logits(back, tokens), ref, atol=1e-5)


def test_orthogonal_inject_starts_at_the_base(tokens):
    m = tiny_llama()
    base = _logits(m, tokens)
    lk.inject(m, lk.LoraConfig(r=4, targets=["q_proj", "v_proj"], init="orthogonal"))
    layer = lora_layers(m)[0][1]
    assert layer.lora_A["default"].abs().sum() > 0 and layer.lora_B["default"].abs().sum() > 0
    assert torch.allclose(_logits(m, tokens), base, atol=1e-6)
    with pytest.raises(LoraError, match="even"):
        lk.inject(tiny_llama(), lk.LoraConfig(r=3, targets=["q_proj"], init="orthogonal"))


@pytest.mark.parametrize("init", ["eva", "mica"])
def test_load_only_inits_refused_by_inject(init):
    with pytest.raises(LoraError, match=f"init='{init}'.*load_adapter"):
        lk.inject(tiny_llama(), lk.LoraConfig(targets=["q_proj"], init=init))


@pytest.mark.parametrize("init,extra", [("corda", {"corda_config": {"cache_file": None}}),
                                        ("loftq", {"loftq_config": {"loftq_bits": 4}}),
                                        ("lora_ga", {"lora_ga_config": {"direction": "ArB2r"}})])
def test_base_changing_inits_refused_with_the_conversion_route(init, extra, tmp_path):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(init_lora_weights=init, **extra)
    path.write_text(json.dumps(cfg))
    with pytest.raises(LoraError, match=f"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"):
        lk.load_adapter(tiny_llama(), tmp_path / "a")
    with pytest.raises(LoraError, match=f"init_lora_weights='{init}'"):
        lk.LoraConfig(init=init)
