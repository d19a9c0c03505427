"""Core LoRA behaviour against independent references: dense W + s*B@A math and the base model."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from tiny import tiny_bert, tiny_gpt2, tiny_llama


def _dense(module: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """Reference: the layer's own functional form with W replaced by W + s*B@A (shapes per type)."""
    W = module.weight.detach()
    dW = s * (B.detach().double() @ A.detach().double())
    if isinstance(module, nn.Linear):
        return F.linear(x.double(), W.double() + dW, module.bias.double())
    if isinstance(module, nn.Embedding):
        return F.embedding(x, W.double() + dW.T)
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x.double(), W.double() + dW.view(W.shape), module.bias.double(), module.stride, module.padding)
    if isinstance(module, nn.Conv1d):
        return F.conv1d(x.double(), W.double() + dW.view(W.shape), module.bias.double(), module.stride, module.padding)
    # transformers Conv1D: y = x @ W + b, W is (in x out)
    return x.double() @ (W.double() + dW.T) + module.bias.double()


def _layers():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(12, 7), torch.randn(4, 5, 12)),
        "hf_conv1d": (Conv1D(9, 12), torch.randn(4, 5, 12)),
        "embedding": (nn.Embedding(20, 6), torch.randint(0, 20, (4, 5))),
        "conv1d": (nn.Conv1d(3, 5, 3, padding=1), torch.randn(2, 3, 11)),
        "conv2d": (nn.Conv2d(3, 4, (3, 2), stride=2, padding=1), torch.randn(2, 3, 9, 8)),
    }


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("kind", ["linear", "hf_conv1d", "embedding", "conv1d", "conv2d"])
def test_every_kind_matches_dense_reference(kind, rslora):
    layer, x = _layers()[kind]
    model = nn.Sequential()
    model.add_module("target", layer)
    lk.inject(model, lk.LoraConfig(r=3, alpha=5, targets=["target"], rslora=rslora, init=False))
    wrapped = model.target
    assert isinstance(wrapped, lk.LoraLayer)
    A, B = wrapped.lora_A["default"], wrapped.lora_B["default"]
    assert B.abs().sum() > 0  # init=False: a non-zero update, so the test can fail
    s = 5 / math.sqrt(3) if rslora else 5 / 3
    out = model(x)
    ref = _dense(layer, x, A, B, s)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # and merged into the weight it is the same function
    with lk.merged(model):
        torch.testing.assert_close(model(x).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build,targets", [
    (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
    (tiny_bert, ["query", "key", "value", "dense"]),
])
def test_new_adapter_starts_equal_to_base_and_only_lora_trains(build, targets, tokens):
    model = build()
    base_out = model(tokens).logits
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    extra = ["classifier"] if build is tiny_bert else None
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=targets, modules_to_save=extra))
    torch.testing.assert_close(model(tokens).logits, base_out, atol=0, rtol=0)  # B = 0 at start
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = model(tokens).logits
        loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert (model(tokens).logits - base_out).abs().max() > 1e-4  # it did learn something
    lk.unload(model)
    after = model.state_dict()
    assert list(after) == list(base_state)
    for k, v in base_state.items():
        assert torch.equal(after[k], v), k  # every base weight bit-identical


def test_param_summary_format():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2, targets=["q_proj"]))
    s = lk.param_summary(model)
    expected_trainable = 2 * 2 * (32 + 32)
    assert s.trainable == expected_trainable
    assert s.total == sum(p.numel() for p in model.parameters())
    assert str(s) == f"trainable {100 * s.trainable / s.total:.2f}% ({s.trainable:,} of {s.total:,})"


def test_two_adapters_switch_without_touching_base(tokens):
    model = tiny_llama()
    plain = model(tokens).logits
    ref_a, ref_b = copy.deepcopy(model), copy.deepcopy(model)
    lk.inject(model, lk.LoraConfig(r=4, targets=["q_proj", "v_proj"], init=False), "a")
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, targets=["o_proj"], init=False), "b")
    # independent single-adapter models with the same weights
    lk.inject(ref_a, lk.LoraConfig(r=4, targets=["q_proj", "v_proj"]), "a")
    lk.inject(ref_b, lk.LoraConfig(r=2, alpha=4, targets=["o_proj"]), "b")
    for name, ref in (("a", ref_a), ("b", ref_b)):
        for path, layer in ref.named_modules():
            if isinstance(layer, lk.LoraLayer):
                src = model.get_submodule(path)
                layer.lora_A[name].data.copy_(src.lora_A[name])
                layer.lora_B[name].data.copy_(src.lora_B[name])
    ptrs = {n: (p.data_ptr(), p._version) for n, p in model.named_parameters()}
    lk.set_adapter(model, "a")
    out_a = model(tokens).logits
    lk.set_adapter(model, "b")
    out_b = model(tokens).logits
    torch.testing.assert_close(out_a, ref_a(tokens).logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_b, ref_b(tokens).logits, atol=1e-6, rtol=1e-5)
    assert (out_a - out_b).abs().max() > 1e-3
    lk.set_adapter(model, None)
    assert torch.equal(model(tokens).logits, plain)
    with lk.disable_adapters(model):
        lk.set_adapter(model, "a")
        assert torch.equal(model(tokens).logits, plain)
    # switching copied or rewrote nothing
    assert ptrs == {n: (p.data_ptr(), p._version) for n, p in model.named_parameters()}
    assert lk.list_adapters(model) == ["a", "b"]
    lk.delete_adapter(model, "b")
    assert lk.list_adapters(model) == ["a"]
    assert not any(isinstance(m, lk.LoraLayer) for n, m in model.named_modules() if n.endswith("o_proj"))


def test_several_active_adapters_add_up(tokens):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, targets=["q_proj"], init=False), "a")
    lk.inject(model, lk.LoraConfig(r=4, targets=["q_proj", "up_proj"], init=False), "b")
    plain = None
    lk.set_adapter(model, None)
    plain = model(tokens).logits
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 32)
    lk.set_adapter(model, ["a", "b"])
    both = q(x)
    lk.set_adapter(model, None)
    base = q(x)
    lk.set_adapter(model, "a")
    da = q(x) - base
    lk.set_adapter(model, "b")
    db = q(x) - base
    torch.testing.assert_close(both, base + da + db, atol=1e-6, rtol=1e-5)
    assert plain is not None


def test_merge_round_trip_fp32(tokens):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, alpha=16, targets="all-linear", init=False))
    before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    unmerged = model(tokens).logits
    report = lk.merge(model)
    assert report.layers == 14 and report.adapters == ("default",)
    torch.testing.assert_close(model(tokens).logits, unmerged, atol=1e-5, rtol=1e-5)
    q = model.model.layers[0].self_attn.q_proj
    dense = before["model.layers.0.self_attn.q_proj.base_layer.weight"] + q.scaling["default"] * (
        q.lora_B["default"] @ q.lora_A["default"])
    torch.testing.assert_close(q.base_layer.weight, dense, atol=1e-6, rtol=0)
    lk.unmerge(model)
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(tokens).logits, unmerged, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_keep_original_makes_low_precision_round_trip_exact(dtype, tokens):
    model = tiny_llama().to(dtype)
    lk.inject(model, lk.LoraConfig(r=4, alpha=16, targets="all-linear", init=False))
    for layer in (m for m in model.modules() if isinstance(m, lk.LoraLayer)):
        assert layer.lora_A["default"].dtype == torch.float32  # adapters stay accurate on a half base
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = lk.merge(model, keep_original=True)
    assert 0 < report.max_abs_error < 0.05  # rounding into the half weight, reported
    # rounded once from the float32 sum
    q = model.model.layers[0].self_attn.q_proj
    exact = before["model.layers.0.self_attn.q_proj.base_layer.weight"].float() + q.scaling["default"] * (
        q.lora_B["default"] @ q.lora_A["default"])
    assert torch.equal(q.base_layer.weight, exact.to(dtype))
    lk.unmerge(model)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    # without keep_original a half round trip is only approximate (why the option exists)
    lk.merge(model)
    lk.unmerge(model)
    drift = max((model.state_dict()[k].float() - v.float()).abs().max().item() for k, v in before.items())
    assert drift < 0.05


def test_merge_refuses_tied_weights():
    model = tiny_llama(tie_word_embeddings=True)
    lk.inject(model, lk.LoraConfig(r=2, targets=["embed_tokens"], init=False))
    with pytest.raises(lk.LoraError, match="tied"):
        lk.merge(model)


def test_unload_restores_keys_and_merge_exports(tokens):
    model = tiny_bert()
    keys = list(model.state_dict())
    lk.inject(model, lk.LoraConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"], init=False))
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(0.5)
    adapted = model(tokens).logits
    exported = lk.merged_state_dict(model)
    assert list(exported) == keys
    plain = lk.unload(copy.deepcopy(model), merge=True)
    assert list(plain.state_dict()) == keys
    torch.testing.assert_close(plain(tokens).logits, adapted, atol=1e-5, rtol=1e-5)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(exported[k], v)
    base = lk.unload(model)
    assert list(base.state_dict()) == keys
    assert not any(isinstance(m, (lk.LoraLayer, lk.ModulesToSave)) for m in base.modules())


@pytest.mark.parametrize("build,targets,extra", [
    (tiny_llama, "all-linear", None),
    (tiny_gpt2, ["c_attn", "c_fc"], None),
    (tiny_bert, ["query", "value"], ["classifier"]),
])
def test_per_row_equals_single_adapter_runs(build, targets, extra):
    model = build()
    for name, r in (("a", 4), ("b", 2), ("c", 3)):
        lk.inject(model, lk.LoraConfig(r=r, alpha=8, targets=targets, modules_to_save=extra, init=False), name)
        if extra:
            with torch.no_grad():
                model.classifier.modules_to_save[name].weight.normal_()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 128, (6, 9), generator=g)
    names = ["a", None, "b", "a", "c", None]
    with lk.per_row(model, names):
        mixed = model(x).logits
    for i, n in enumerate(names):
        lk.set_adapter(model, n)
        alone = model(x[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(lk.LoraError, match="rows"):
        with lk.per_row(model, ["a", "b"]):
            model(x)
    with pytest.raises(lk.LoraError, match="zzz"):
        with lk.per_row(model, ["zzz"] * 6):
            pass


@pytest.mark.parametrize("field,value", [
    ("r", 0), ("r", -3), ("r", 2.5), ("alpha", float("nan")), ("alpha", float("inf")),
    ("dropout", 1.0), ("dropout", -0.1), ("targets", []), ("bias", "some"), ("targets", "("),
])
def test_config_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        lk.LoraConfig(**{field: value})
    assert isinstance(err.value, lk.LoraError)
    assert field in str(err.value) and repr(value) in str(err.value)


def test_no_match_names_patterns_and_existing_modules():
    model = tiny_llama()
    with pytest.raises(lk.LoraError) as err:
        lk.inject(model, lk.LoraConfig(targets=["query_proj"]))
    msg = str(err.value)
    assert "query_proj" in msg and "q_proj" in msg
    assert not any(isinstance(m, lk.LoraLayer) for m in model.modules())


def test_target_matching_rules():
    model = tiny_llama(num_hidden_layers=3)
    paths = lk.find_targets(model, lk.LoraConfig(targets=["q_proj", "layers.1.mlp.up_proj"]))
    assert sorted(paths) == sorted([f"model.layers.{i}.self_attn.q_proj" for i in range(3)] + ["model.layers.1.mlp.up_proj"])
    paths = lk.find_targets(model, lk.LoraConfig(targets=r".*\.(0|2)\.self_attn\.(k|v)_proj"))
    assert paths == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.2.self_attn.k_proj", "model.layers.2.self_attn.v_proj"]
    all_lin = lk.find_targets(model, lk.LoraConfig(targets="all-linear"))
    assert len(all_lin) == 21 and "lm_head" not in all_lin
    excl = lk.find_targets(model, lk.LoraConfig(targets="all-linear", exclude=["down_proj", "o_proj"]))
    assert len(excl) == 15
    ltt = lk.find_targets(model, lk.LoraConfig(targets=["q_proj"], layers_to_transform=[0, 2]))
    assert ltt == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    assert lk.find_targets(tiny_gpt2(), lk.LoraConfig()) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_adapter_names_checked():
    model = tiny_llama()
    for bad in ("a.b", "", "keys", "with space"):
        with pytest.raises(lk.LoraError):
            lk.inject(model, lk.LoraConfig(targets=["q_proj"]), bad)
    lk.inject(model, lk.LoraConfig(targets=["q_proj"]), "x")
    with pytest.raises(lk.LoraError, match="already exists"):
        lk.inject(model, lk.LoraConfig(targets=["q_proj"]), "x")
    with pytest.raises(lk.LoraError, match="no adapter named"):
        lk.set_adapter(model, "y")


def test_merged_state_guards(tokens):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(targets=["q_proj"], init=False), "a")
    lk.inject(model, lk.LoraConfig(targets=["q_proj"], init=False), "b")
    lk.merge(model)
    with pytest.raises(lk.LoraError, match="unmerge"):
        lk.set_adapter(model, "a")
    with pytest.raises(lk.LoraError, match="unmerge"):
        with lk.disable_adapters(model):
            pass
    with pytest.raises(lk.LoraError, match="unmerge"):
        lk.delete_adapter(model, "b")
    lk.unmerge(model)
    lk.set_adapter(model, "a")


def test_dropout_is_active_in_training_only(tokens):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, targets=["q_proj"], dropout=0.5, init=False))
    model.eval()
    assert torch.equal(model(tokens).logits, model(tokens).logits)
    model.train()
    torch.manual_seed(0)
    a = model(tokens).logits
    torch.manual_seed(1)
    b = model(tokens).logits
    assert not torch.equal(a, b)


def _fused_inputs():
    """x, y, A, B for the fused linear node, float64 leaves that require grad."""
    torch.manual_seed(0)
    shapes = [(3, 4, 6), (3, 4, 5), (2, 6), (5, 2)]
    x, y, A, B = (torch.randn(*s, dtype=torch.double, requires_grad=True) for s in shapes)
    return x, y, A, B


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_dropout_keeps_each_element_with_probability_1_minus_p(p):
    """lorakit's cheaper dropout (four 15-bit uniforms per 63-bit draw) is dropout: each element
    kept independently with probability 1-p and scaled by 1/(1-p), like F.dropout's."""
    from lorakit import core

    torch.manual_seed(0)
    x = torch.randn(1000, 999)
    out, keep = core.dropout(x, p)
    n = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)  # within 5 standard errors
    torch.testing.assert_close(out[keep], x[keep] / (1 - p))
    assert (out[~keep] == 0).all()
    for lane in range(4):  # every lane of a draw is used, each with the same rate
        sub = keep.flatten()[lane::4].double().mean().item()
        assert abs(sub - (1 - p)) < 5 * ((p * (1 - p) / (n / 4)) ** 0.5)
    a, b = core.dropout(x, p)[1], core.dropout(x, p)[1]
    assert (a != b).any()  # fresh masks


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_linear_path_matches_reference_gradients(p):
    from lorakit import core

    x, y, A, B = _fused_inputs()

    def fn(y, x, A, B):  # the same dropout mask on every call
        torch.manual_seed(7)
        return core.lora_linear(y, x, A, B, 0.7, p)

    assert torch.autograd.gradcheck(fn, (y, x, A, B))
    torch.manual_seed(7)
    dropped = core.dropout(x.reshape(-1, 6), p)[0].view(x.shape) if p else x
    ref = y + 0.7 * dropped @ A.T @ B.T  # the plain formula with the same mask
    torch.testing.assert_close(fn(y, x, A, B), ref)
    if p:
        kept = (dropped != 0).double().mean().item()
        assert 0.4 < kept < 0.95


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_linear_in_place_path_has_the_same_gradients(p):
    """inplace=True adds into y's own memory (a layer's fresh output): same values and gradients."""
    from lorakit import core

    x, y0, A, B = _fused_inputs()

    def fn(inplace):
        def f(y0, x, A, B):
            torch.manual_seed(7)
            y = y0 * 1.0  # a non-leaf, as a Linear's output
            out = core.lora_linear(y, x, A, B, 0.7, p, inplace=inplace)
            assert (out.data_ptr() == y.data_ptr()) == inplace
            return out
        return f

    assert torch.autograd.gradcheck(fn(True), (y0, x, A, B))
    torch.testing.assert_close(fn(True)(y0, x, A, B), fn(False)(y0, x, A, B))


@pytest.mark.parametrize("kind", ["embedding", "conv"])
def test_generic_adapter_path_gradients(kind):
    """core.lora_out (embeddings, convolutions, DoRA) against autograd's numerical gradients."""
    from functools import partial

    from lorakit import core, kinds

    torch.manual_seed(0)
    if kind == "embedding":
        base = nn.Embedding(7, 5).double()
        x = torch.randint(0, 7, (2, 3))
        A = torch.randn(3, 7, dtype=torch.double, requires_grad=True)
        B = torch.randn(5, 3, dtype=torch.double, requires_grad=True)
        args, cd = (A, B), -1
    else:
        base = nn.Conv2d(2, 4, 3).double()
        x = torch.randn(2, 2, 5, 5, dtype=torch.double, requires_grad=True)
        A = torch.randn(3, 2, 3, 3, dtype=torch.double, requires_grad=True)
        B = torch.randn(4, 3, 1, 1, dtype=torch.double, requires_grad=True)
        args, cd = (x, A, B), 1
    kind_ = kinds.kind_of(base)
    project = partial(kind_.apply_a, base)

    def fn(*t):
        xx, AA, BB = (x, *t) if kind == "embedding" else t
        return core.lora_out(xx, AA, BB.reshape(BB.shape[0], -1), 0.7, project=project, channel_dim=cd)

    assert torch.autograd.gradcheck(fn, args)


def test_a_hook_on_the_base_layer_keeps_the_base_output():
    """A forward hook that keeps the base module's output (activation capture) must see the base
    output, not base + LoRA: no in-place add then."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    lk.inject(model, lk.LoraConfig(r=2, targets=["0"], init=False))
    kept = []
    model[0].base_layer.register_forward_hook(lambda m, i, o: kept.append(o))
    x = torch.randn(2, 3, 4)
    out = model(x)
    torch.testing.assert_close(kept[0], x @ model[0].base_layer.weight.T)
    assert not torch.equal(out, kept[0])


def test_dropout_keeps_only_a_one_byte_mask_for_backward():
    """With dropout a layer saves only its keep-mask more (1 byte per input element), not a
    dropped copy of its input (4 bytes)."""
    def saved(dropout):
        model = nn.Sequential(nn.Linear(64, 64))
        lk.inject(model, lk.LoraConfig(r=4, targets=["0"], dropout=dropout))
        model.train()
        x = torch.randn(32, 64, requires_grad=True)
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        out.sum().backward()
        return sum(seen.values())

    assert saved(0.5) - saved(0.0) == 32 * 64


def test_embedding_init_follows_peft_rule(tokens):
    """PEFT starts embedding adapters with A = 0 and B random (linear layers: the reverse)."""
    model = tiny_llama()
    before = model(tokens).logits
    lk.inject(model, lk.LoraConfig(r=4, targets=["embed_tokens", "q_proj"]))
    emb, q = model.model.embed_tokens, model.model.layers[0].self_attn.q_proj
    assert emb.lora_A["default"].abs().sum() == 0 and emb.lora_B["default"].abs().sum() > 0
    assert q.lora_B["default"].abs().sum() == 0 and q.lora_A["default"].abs().sum() > 0
    assert torch.equal(model(tokens).logits, before)


@pytest.mark.parametrize("kind", ["linear", "hf_conv1d"])
def test_no_grad_forward_with_many_tokens_merges_on_the_fly_exactly(kind, monkeypatch):
    """Inference with many tokens takes the merged-on-the-fly path; same function as the dense
    reference and the unmerged path."""
    from lorakit import core

    layer, _ = _layers()[kind]
    model = nn.Sequential()
    model.add_module("target", layer)
    lk.inject(model, lk.LoraConfig(r=3, alpha=5, targets=["target"], init=False))
    wrapped = model.target
    x = torch.randn(4, 20, 12)  # 80 tokens: above in*out/(in+out)
    calls = []
    real = core.linear_merged
    monkeypatch.setattr(core, "linear_merged", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fast = model(x)
    assert calls, "the merged-on-the-fly path was not taken"
    unmerged = model(x)  # grad enabled: the separate path
    ref = _dense(layer, x, wrapped.lora_A["default"], wrapped.lora_B["default"], 5 / 3)
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, unmerged.detach(), atol=1e-5, rtol=1e-5)
    calls.clear()
    with torch.no_grad():
        model(x[:1, :2])  # 2 tokens: the separate path is cheaper
    assert not calls


def test_autocast_keeps_the_separate_path(monkeypatch):
    from lorakit import core

    layer, _ = _layers()["linear"]
    model = nn.Sequential()
    model.add_module("target", layer)
    lk.inject(model, lk.LoraConfig(r=3, targets=["target"], init=False))
    calls = []
    monkeypatch.setattr(core, "linear_merged", lambda *a: calls.append(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(4, 20, 12))
    assert not calls


class UserLinear(nn.Module):
    """A user's own linear layer (not an nn.Linear): y = x W^T + b."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight.T + self.bias


def test_a_registered_kind_takes_the_fused_and_batched_paths(monkeypatch):
    """A kind declared with lk.register() is the one dispatch: its layers run the fused linear node,
    mixed batches run the batched op (not the reference loop), and the answers are the dense ones."""
    from lorakit import core, ops

    lk.register(UserLinear, lk.Kind(name="user_linear", dims=lambda m: (m.weight.shape[1], m.weight.shape[0]),
                                    matrix=lambda m: m.weight, a_shape=lambda m, r: (r, m.weight.shape[1]),
                                    b_shape=lambda m, r: (m.weight.shape[0], r), meets="matmul"))
    calls = {"fused": 0, "rows": 0}
    fused, rows = core.lora_linear, ops.lora_rows
    monkeypatch.setattr(core, "lora_linear", lambda *a, **k: (calls.__setitem__("fused", calls["fused"] + 1), fused(*a, **k))[1])
    monkeypatch.setattr(ops, "lora_rows", lambda *a, **k: (calls.__setitem__("rows", calls["rows"] + 1), rows(*a, **k))[1])
    torch.manual_seed(0)
    model = nn.Sequential(UserLinear(6, 8), nn.ReLU(), UserLinear(8, 4))
    dense = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in (model[0], model[2])]
    for name in ("a", "b"):
        lk.inject(model, lk.LoraConfig(r=2, alpha=4, targets=["0", "2"], init=False), name)
    x = torch.randn(3, 6)

    def reference(name):
        h = x
        for i, (W, b) in enumerate(dense):
            layer = model[2 * i]
            h = h @ (W + layer.delta(name)).T + b
            if i == 0:
                h = h.relu()
        return h

    lk.set_adapter(model, "a")
    torch.testing.assert_close(model(x), reference("a"), atol=1e-5, rtol=1e-5)
    assert calls["fused"] == 2 and calls["rows"] == 0
    with torch.no_grad(), lk.per_row(model, ["a", "b", "a"]):
        mixed = model(x)
    assert calls["rows"] == 2  # the batched op in both layers, no loop over adapters
    for i, name in enumerate(["a", "b", "a"]):
        torch.testing.assert_close(mixed[i], reference(name)[i], atol=1e-5, rtol=1e-5)


def test_a_bf16_base_runs_its_adapter_in_bf16_without_float32_copies_of_the_inputs():
    """On a bf16 base the LoRA matmuls run in bf16 (float32 accumulation inside) with float32
    master weights and gradients: the answers are the float32 path's to bf16 rounding, and no
    float32 tensor the size of an input or output is ever made (before: every input was copied
    to float32 for the adapter). set_compute_dtype(float32) keeps the old all-float32 path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Big32(TorchDispatchMode):
        def __init__(self, limit):
            super().__init__()
            self.limit, self.seen = limit, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.limit:
                    self.seen.append((str(func), tuple(t.shape)))
            return out

    torch.manual_seed(0)
    lin = nn.Linear(256, 192).to(torch.bfloat16)
    model = nn.Sequential(lin)
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, targets=["0"], dropout=0.1, init=False), "a")
    layer = model[0]
    assert layer.lora_A["a"].dtype == torch.float32
    x = torch.randn(4, 64, 256, dtype=torch.bfloat16, requires_grad=True)
    gout = torch.randn(4, 64, 192, dtype=torch.bfloat16)

    def run():
        torch.manual_seed(1)
        for p in (layer.lora_A["a"], layer.lora_B["a"], x):
            p.grad = None
        out = model(x)
        out.backward(gout)
        return out.detach(), [p.grad.clone() for p in (layer.lora_A["a"], layer.lora_B["a"], x)]

    with Big32(limit=4 * 64 * 64) as mode:
        fast, fast_grads = run()
    assert mode.seen == [], mode.seen[:5]  # nothing float32 beyond r-wide products
    lk.set_compute_dtype(model, torch.float32)
    slow, slow_grads = run()
    assert fast.dtype == slow.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), slow.float(), atol=0.05, rtol=0.02)
    for a, b in zip(fast_grads, slow_grads):
        assert a.dtype == b.dtype
        assert (a.float() - b.float()).norm() <= 0.02 * b.float().norm(), (a.dtype, a.shape)


def test_training_under_bf16_autocast():
    """torch.autocast (what Trainer(bf16=True) and TRL's SFTConfig default turn on): the adapter's
    matmuls run in the autocast dtype, forward and backward agree on dtypes, and the gradients are
    the float32 ones to bf16 rounding."""
    torch.manual_seed(0)
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, targets="all-linear", dropout=0.0, init=False), "a")
    x = torch.randint(0, 128, (2, 8))

    def grads(autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = model(x, labels=x).loss
        loss.backward()
        return [p.grad.float().clone() for p in lk.adapter_parameters(model, "a")]

    low, high = grads(True), grads(False)
    for a, b in zip(low, high):
        assert a.dtype == torch.float32
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6


def test_embedding_and_dora_adapters_train_under_autocast():
    torch.manual_seed(0)
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, targets=["embed_tokens", "q_proj"], use_dora=True, init=False), "a")
    x = torch.randint(0, 128, (2, 8))
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(x, labels=x).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lk.adapter_parameters(model, "a"))
