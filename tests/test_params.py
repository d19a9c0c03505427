"""LoRA on nn.Parameters (target_parameters) against PEFT 0.21 and dense references: Qwen3-MoE's
(E, out, in) expert stacks, GPT-OSS's transposed (E, in, out) ones, 2-D parameters (E = 1),
PEFT's nesting of several parameters on one module (the first registered innermost) both ways,
training, merge/unmerge, and the operations on a model that has such adapters."""

import json
import warnings

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.errors import AdapterFileError, LoraError, TargetError
from lorakit.layer import lora_layers
from lorakit.params import ParamLayer, param_layers

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*|.*1-D lora.*")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_qwen3_moe(seed: int = 0, layers: int = 2):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen3MoeForCausalLM(cfg).eval()


def tiny_gpt_oss(seed: int = 0):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                       layer_types=["full_attention"])
    return GptOssForCausalLM(cfg).eval()


@pytest.fixture
def x():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))


def _logits(m, x):
    with torch.no_grad():
        return m(x).logits


def _shake(model, adapter="default", std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lk.adapter_parameters(model, adapter):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _peft(model, **kw):
    kw.setdefault("r", 2)
    kw.setdefault("lora_alpha", 4)
    kw.setdefault("init_lora_weights", False)
    pm = peft.get_peft_model(model, peft.LoraConfig(**kw)).eval()
    with torch.no_grad():  # PEFT's init=False B is small: make the update visible
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(5)
    return pm


def _dense_delta(A, B, s, E, transposed):
    """The memo's einsum, independent of lorakit: A (r*E, in) expert-major, B (out, r*E) rank-major."""
    r = A.shape[0] // E
    eq = "o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i"
    return torch.einsum(eq, B.double().reshape(B.shape[0], r, E), A.double().reshape(E, r, -1)) * s


def _dense_model(build, model, adapter="default"):
    """A fresh model with W + dW written into every adapted parameter (dW from the einsum)."""
    dense = build()
    for path, layer in param_layers(model):
        holder = dense.get_submodule(path)
        for pname, t in layer.targets.items():
            if adapter not in t.lora_A:
                continue
            W = getattr(holder, pname)
            transposed = bool(getattr(holder, "is_transposed", False)) and W.dim() == 3
            if W.dim() == 3:
                d = _dense_delta(t.lora_A[adapter], t.lora_B[adapter], t.scaling[adapter], W.shape[0], transposed)
            else:
                d = t.scaling[adapter] * t.lora_B[adapter].double() @ t.lora_A[adapter].double()
            with torch.no_grad():
                W.copy_((W.double() + d).to(W.dtype))
    for path, layer in lora_layers(model):  # module targets (nn.Linear here): W + s * B @ A
        if adapter in layer.lora_A:
            W = dense.get_submodule(path).weight
            d = layer.scaling[adapter] * layer.lora_B[adapter].double() @ layer.lora_A[adapter].double()
            with torch.no_grad():
                W.copy_((W.double() + d).to(W.dtype))
    return dense


# ---- forward against a dense model -----------------------------------------------------------
@pytest.mark.parametrize("build,targets", [(tiny_qwen3_moe, EXPERTS), (tiny_gpt_oss, ["experts.gate_up_proj",
                                                                                      "experts.down_proj"])])
def test_forward_equals_dense_w_plus_dw(build, targets, x):
    m = build()
    base = _logits(m, x)
    lk.inject(m, lk.LoraConfig(r=2, alpha=4, targets=[], target_parameters=targets))
    assert torch.equal(_logits(m, x), base)  # B = 0: starts as the base
    _shake(m)
    layers = param_layers(m)
    assert layers and all(set(layer.targets) == {"gate_up_proj", "down_proj"} for _, layer in layers)
    t = layers[0][1].targets["gate_up_proj"]
    E = 4
    assert t.lora_A["default"].shape[0] == 2 * E and t.lora_B["default"].shape[1] == 2 * E
    ours = _logits(m, x)
    assert torch.allclose(ours, _logits(_dense_model(build, m), x), atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-3)


def test_two_dimensional_parameter_is_one_expert(x):
    m = tiny_qwen3_moe()
    lk.inject(m, lk.LoraConfig(r=2, alpha=4, targets=[], target_parameters=["mlp.gate.weight"]))
    _shake(m)
    t = param_layers(m)[0][1].targets["weight"]
    assert t.experts == 1 and t.lora_A["default"].shape == (2, 16) and t.lora_B["default"].shape == (4, 2)
    assert torch.allclose(_logits(m, x), _logits(_dense_model(tiny_qwen3_moe, m), x), atol=1e-5)


# ---- PEFT both ways --------------------------------------------------------------------------
@pytest.mark.parametrize("build,kw", [
    (tiny_qwen3_moe, dict(target_modules=["q_proj"], target_parameters=EXPERTS)),  # mixed with modules
    (tiny_qwen3_moe, dict(target_modules=[], target_parameters=["down_proj"], rank_pattern={"down_proj": 3},
                          alpha_pattern={"layers.1.mlp.experts.down_proj": 7}, use_rslora=True)),
    (tiny_qwen3_moe, dict(target_modules=[], target_parameters=["mlp.gate.weight", "gate_up_proj"])),
    (tiny_gpt_oss, dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"])),
])
def test_peft_both_directions(build, kw, x, tmp_path):
    pm = _peft(build(), **kw)
    ref = _logits(pm, x)
    pm.save_pretrained(tmp_path / "peft")

    ours = build()
    lk.load_adapter(ours, tmp_path / "peft")
    assert torch.allclose(_logits(ours, x), ref, atol=1e-5)
    assert torch.allclose(_logits(_dense_model(build, ours), x), ref, atol=1e-5)

    lk.save_adapter(ours, tmp_path / "ours")
    theirs, mine = lk.read_adapter(tmp_path / "peft")[1], lk.read_adapter(tmp_path / "ours")[1]
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    assert torch.allclose(_logits(back, x), ref, atol=1e-5)


def test_adapter_made_here_loads_in_peft(x, tmp_path):
    m = tiny_qwen3_moe()
    lk.inject(m, lk.LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"], target_parameters=EXPERTS))
    _shake(m)
    ref = _logits(m, x)
    lk.save_adapter(m, tmp_path / "a")
    back = peft.PeftModel.from_pretrained(tiny_qwen3_moe(), tmp_path / "a").eval()
    assert torch.allclose(_logits(back, x), ref, atol=1e-5)


class _Experts(nn.Module):
    """Registers down_proj before gate_up_proj: PEFT then nests gate_up_proj outermost."""

    def __init__(self, flip: bool):
        super().__init__()
        if flip:
            self.down_proj = nn.Parameter(torch.randn(3, 4, 6))
            self.gate_up_proj = nn.Parameter(torch.randn(3, 12, 4))
        else:
            self.gate_up_proj = nn.Parameter(torch.randn(3, 12, 4))
            self.down_proj = nn.Parameter(torch.randn(3, 4, 6))
        self.is_transposed = False

    def forward(self, h):  # h (N, 4): every expert, summed
        mid = torch.einsum("ni,eoi->eno", h, self.gate_up_proj)[..., :6]
        return torch.einsum("eni,eoi->no", mid, self.down_proj)


class _Model(nn.Module):
    def __init__(self, flip: bool, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.experts = _Experts(flip)
        self.head = nn.Linear(4, 4)

    def forward(self, h):
        return self.head(self.experts(h))


@pytest.mark.parametrize("flip", [False, True])
def test_nesting_follows_registration_order_both_ways(flip, tmp_path):
    h = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    pm = _peft(_Model(flip), target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    inner = pm.base_model.model.experts.base_layer.parameter_name
    assert inner == ("down_proj" if flip else "gate_up_proj")  # PEFT: the first registered is innermost
    with torch.no_grad():
        ref = pm(h)
    pm.save_pretrained(tmp_path / "peft")
    ours = _Model(flip)
    lk.load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(ours(h), ref, atol=1e-5)
    lk.save_adapter(ours, tmp_path / "ours")
    theirs, mine = lk.read_adapter(tmp_path / "peft")[1], lk.read_adapter(tmp_path / "ours")[1]
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    a_inner = theirs["base_model.model.experts.base_layer.lora_A.weight"]
    assert a_inner.shape[1] == (6 if flip else 4)  # down_proj's input is 6 wide, gate_up_proj's 4
    back = peft.PeftModel.from_pretrained(_Model(flip), tmp_path / "ours")
    with torch.no_grad():
        assert torch.allclose(back(h), ref, atol=1e-5)


def test_file_with_the_nesting_swapped_is_refused(tmp_path):
    pm = _peft(_Model(False), target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    pm.save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterFileError, match="registration order|needs"):
        lk.load_adapter(_Model(True), tmp_path / "a")  # the same file on a model registering them the other way


# ---- training, merging -----------------------------------------------------------------------
def test_training_step_moves_a_and_b_not_the_base(x):
    m = tiny_qwen3_moe()
    lk.inject(m, lk.LoraConfig(r=2, alpha=4, targets=["q_proj"], target_parameters=EXPERTS))
    m.train()
    params = lk.adapter_parameters(m, "default")
    before = [p.detach().clone() for p in params]
    experts = m.model.layers[0].mlp.experts
    assert isinstance(experts, ParamLayer)
    w0 = experts.base_layer.gate_up_proj.detach().clone()
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(2):  # the first step moves B only (B = 0), the second A too
        opt.zero_grad()
        loss = m(x, labels=x).loss
        loss.backward()
        opt.step()
    assert experts.base_layer.gate_up_proj.grad is None and not experts.base_layer.gate_up_proj.requires_grad
    assert torch.equal(experts.base_layer.gate_up_proj, w0)
    t = experts.targets["gate_up_proj"]
    moved = {id(p): not torch.equal(p, b) for p, b in zip(params, before)}
    assert moved[id(t.lora_A["default"])] and moved[id(t.lora_B["default"])]


def test_merge_unmerge_exact_and_merged_state_dict(x):
    m = tiny_qwen3_moe()
    lk.inject(m, lk.LoraConfig(r=2, alpha=4, targets=["q_proj"], target_parameters=EXPERTS))
    _shake(m)
    ref = _logits(m, x)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    report = lk.merge(m, keep_original=True)
    assert report.layers == 2 + 2  # q_proj in 2 layers, experts in 2 layers
    assert torch.allclose(_logits(m, x), ref, atol=1e-5)
    with pytest.raises(LoraError, match="merged"):
        lk.set_adapter(m, None)
    with pytest.raises(LoraError, match="merged"):
        lk.delete_adapter(m, "default")
    with pytest.raises(LoraError, match="mixed-adapter|merged"):
        with lk.per_row(m, ["default", None]):
            m(x)
    lk.unmerge(m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # bit-exact
    lk.merge(m)  # float32 sum, one rounding; unmerge subtracts
    lk.unmerge(m)
    assert all(torch.allclose(before[k], v, atol=1e-6) for k, v in m.state_dict().items())

    sd = lk.merged_state_dict(m)
    plain = tiny_qwen3_moe()
    assert set(sd) == set(plain.state_dict())
    plain.load_state_dict(sd)
    assert torch.allclose(_logits(plain, x), ref, atol=1e-5)
    merged = lk.unload(m, merge=True)
    assert not param_layers(merged) and set(merged.state_dict()) == set(plain.state_dict())
    assert torch.allclose(_logits(merged, x), ref, atol=1e-5)


# ---- the model-level operations --------------------------------------------------------------
def test_adapters_switch_disable_delete_unload(x):
    m = tiny_qwen3_moe()
    base = _logits(m, x)
    n_base = sum(p.numel() for p in m.parameters())
    lk.inject(m, lk.LoraConfig(r=2, alpha=4, targets=[], target_parameters=EXPERTS), adapter="a")
    _shake(m, "a")
    lk.inject(m, lk.LoraConfig(r=4, alpha=4, targets=["q_proj"], target_parameters=["gate_up_proj"]), adapter="b")
    _shake(m, "b", seed=2)
    # E=4, r=2: gate_up (16 in, 16 out) + down (8 in, 16 out) per layer; b: r=4 gate_up + q_proj
    n_a = 2 * (2 * 4 * (16 + 16) + 2 * 4 * (8 + 16))
    assert sum(p.numel() for p in lk.adapter_parameters(m, "a")) == n_a
    summary = lk.param_summary(m)
    assert summary.trainable == sum(p.numel() for p in lk.adapter_parameters(m, "b"))
    assert summary.total == n_base + n_a + summary.trainable
    y_b = _logits(m, x)
    lk.set_adapter(m, "a")
    y_a = _logits(m, x)
    assert not torch.allclose(y_a, y_b, atol=1e-3)
    assert torch.allclose(y_a, _logits(_dense_model(tiny_qwen3_moe, m, "a"), x), atol=1e-5)
    with lk.disable_adapters(m):
        assert torch.equal(_logits(m, x), base)
    lk.delete_adapter(m, "a")
    assert all(set(layer.targets) == {"gate_up_proj"} for _, layer in param_layers(m))
    lk.set_adapter(m, "b")
    assert torch.allclose(_logits(m, x), y_b, atol=1e-6)
    plain = lk.unload(m)
    assert not param_layers(plain) and torch.equal(_logits(plain, x), base)


def test_mixed_batches_refuse_parameter_adapters(x, tmp_path):
    m = tiny_qwen3_moe()
    lk.inject(m, lk.LoraConfig(r=2, alpha=4, targets=["q_proj"], target_parameters=EXPERTS), adapter="moe")
    lk.inject(m, lk.LoraConfig(r=2, alpha=4, targets=["q_proj"]), adapter="plain")
    _shake(m, "plain")
    with lk.per_row(m, ["plain", None]):  # rows not using the parameter adapter still mix
        y = _logits(m, x)
    lk.set_adapter(m, "plain")
    assert torch.allclose(y[0], _logits(m, x)[0], atol=1e-5)
    with pytest.raises(LoraError, match="mixed-adapter batch"):
        with lk.per_row(m, ["moe", "plain"]):
            m(x)
    lk.save_adapter(m, tmp_path / "moe", adapter="moe")
    bank = lk.AdapterBank(tiny_qwen3_moe())
    with pytest.raises(LoraError, match="target_parameters adapters cannot share stacked slots"):
        bank.add("moe", tmp_path / "moe")


# ---- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(dropout=0.1), "dropout"), (dict(use_dora=True), "use_dora"), (dict(lora_bias=True), "lora_bias"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"), (dict(init="pissa"), "init"),
])
def test_peft_restrictions_refused(kw, match):
    with pytest.raises(LoraError, match=match):
        lk.LoraConfig(targets=[], target_parameters=EXPERTS, **kw)


def test_bad_targets_refused():
    with pytest.raises(LoraError, match="list of parameter names"):
        lk.LoraConfig(targets=[], target_parameters="mlp.experts.gate_up_proj")
    with pytest.raises(TargetError, match="match no parameter"):
        lk.inject(tiny_qwen3_moe(), lk.LoraConfig(targets=[], target_parameters=["experts.nope"]))
    with pytest.raises(TargetError, match="2-D or 3-D"):
        lk.inject(tiny_qwen3_moe(), lk.LoraConfig(targets=[], target_parameters=["input_layernorm.weight"]))
    with pytest.raises(TargetError, match="both"):  # a module is adapted one way
        lk.inject(tiny_qwen3_moe(), lk.LoraConfig(targets=["q_proj"], target_parameters=["q_proj.weight"]))
    with pytest.raises(LoraError, match="orthogonal"):
        lk.inject(tiny_qwen3_moe(), lk.LoraConfig(targets=[], target_parameters=EXPERTS, init="orthogonal"))
    m = tiny_qwen3_moe()
    lk.inject(m, lk.LoraConfig(targets=[], target_parameters=["q_proj.weight"]), adapter="p")
    with pytest.raises(TargetError, match="parameters or token rows"):
        lk.inject(m, lk.LoraConfig(targets=["q_proj"]), adapter="q")


def test_many_parameter_names_match_in_bounded_time():
    import time

    names = [f"layers.{i}.mlp.experts.gate_up_proj" for i in range(10_000)]
    t0 = time.perf_counter()
    lk.find_targets(tiny_qwen3_moe(), lk.LoraConfig(targets=[], target_parameters=names))
    from lorakit.params import find_parameter_targets

    found = find_parameter_targets(tiny_qwen3_moe(), lk.LoraConfig(targets=[], target_parameters=names))
    assert [p for _, p in found] == ["gate_up_proj", "gate_up_proj"]
    assert time.perf_counter() - t0 < 5


def test_lorakit_train_accepts_parameter_targets(tmp_path, capsys):
    from test_train_support import prompt_records, tiny_tokenizer, write_jsonl
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from lorakit.cli import main as cli_main

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    data = write_jsonl(tmp_path / "d.jsonl", prompt_records(8))
    out = tmp_path / "o"
    code = cli_main(["train", "--model", str(tmp_path / "moe"), "--data", str(data), "--task", "causal-lm",
                     "--targets", "q_proj,mlp.experts.gate_up_proj", "--target-parameters", "experts.down_proj",
                     "--steps", "2", "--batch-size", "4", "--threads", "1", "--quiet", "--out", str(out)])
    assert code == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["q_proj"] and saved["lora_dropout"] == 0
    assert sorted(saved["target_parameters"]) == ["experts.down_proj", "mlp.experts.gate_up_proj"]
    ours = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "moe").eval()
    lk.load_adapter(ours, out)
    assert param_layers(ours) and lk.adapter_state_dict(ours)
    back = peft.PeftModel.from_pretrained(Qwen3MoeForCausalLM.from_pretrained(tmp_path / "moe"), out).eval()
    x = torch.randint(3, len(tok), (2, 6))
    assert torch.allclose(_logits(back, x), _logits(ours, x), atol=1e-5)
    capsys.readouterr()
    code = cli_main(["train", "--model", str(tmp_path / "moe"), "--data", str(data), "--task", "causal-lm",
                     "--targets", "q_proj", "--target-parameters", "down_proj", "--dropout", "0.1", "--steps", "1",
                     "--threads", "1", "--quiet", "--out", str(tmp_path / "p")])
    assert code == 2 and "dropout=0.1: cannot be used with target_parameters" in capsys.readouterr().err


def test_bfloat16_base_float32_adapter(x):
    m = tiny_qwen3_moe().to(torch.bfloat16)
    lk.inject(m, lk.LoraConfig(r=2, alpha=4, targets=[], target_parameters=EXPERTS))
    t = param_layers(m)[0][1].targets["gate_up_proj"]
    assert t.lora_A["default"].dtype == torch.float32  # adapters train in float32 on a low-precision base
    _shake(m)
    ref = _logits(m, x)
    assert ref.dtype == torch.bfloat16
    dense = _dense_model(lambda: tiny_qwen3_moe().to(torch.bfloat16), m)
    assert torch.allclose(_logits(dense, x).float(), ref.float(), atol=0.1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    report = lk.merge(m, keep_original=True)
    assert 0 < report.max_abs_error < 0.05  # one rounding of the float32 sum into bfloat16
    lk.unmerge(m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
