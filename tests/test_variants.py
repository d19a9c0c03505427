"""LoRA variants against PEFT 0.21 (same files, same logits, both directions) and dense references:
DoRA, PiSSA / OLoRA, gaussian init, rsLoRA, rank/alpha patterns, layers_to_transform, LoRA+."""

import math
import warnings

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.errors import AdapterFileError, LoraError
from lorakit.layer import lora_layers
from lorakit.variants import LORA
from tiny import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")


def _peft(model, **kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    return peft.get_peft_model(model, peft.LoraConfig(**kw)).eval()


@torch.no_grad()
def _shake_magnitudes(pm, seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, p in pm.named_parameters():
        if "lora_magnitude_vector" in name:
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _logits(m, x):
    with torch.no_grad():
        return m(x).logits if hasattr(m(x), "logits") else m(x)


# ---- DoRA -------------------------------------------------------------------------------------
@pytest.mark.parametrize("build,targets", [(tiny_llama, ["q_proj", "v_proj", "embed_tokens"]),
                                           (tiny_gpt2, ["c_attn"])])
def test_dora_peft_both_directions_and_dense(build, targets, tokens, tmp_path):
    pm = _peft(build(), target_modules=targets, use_dora=True, init_lora_weights=False, lora_alpha=6)
    _shake_magnitudes(pm)
    ref = _logits(pm, tokens)
    pm.save_pretrained(tmp_path / "peft")

    ours = build()
    lk.load_adapter(ours, tmp_path / "peft")
    assert lk.get_config(ours, "default").use_dora
    assert torch.allclose(_logits(ours, tokens), ref, atol=1e-5)

    lk.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    assert torch.allclose(_logits(back, tokens), ref, atol=1e-5)

    # dense reference: W' = m * (W + s B A) / ||W + s B A||_row written into a plain model
    dense = build()
    mods = dict(dense.named_modules())
    with torch.no_grad():
        for path, layer in lora_layers(ours):
            A, B = layer.lora_A["default"].double(), layer.lora_B["default"].double()
            W = layer.kind.matrix(layer.base_layer).double()
            V = W + layer.scaling["default"] * B @ A
            mag = layer.lora_magnitude_vector["default"].double()
            layer.kind.matrix(mods[path]).copy_((mag / V.norm(dim=1))[:, None] * V)
    assert torch.allclose(_logits(dense, tokens), ref, atol=1e-5)
    # and DoRA really differs from plain LoRA with the same A, B
    plain = build()
    lk.load_adapter(plain, tmp_path / "ours")
    for _, layer in lora_layers(plain):  # the same A, B as a plain LoRA adapter
        layer.variants["default"] = LORA
    assert not torch.allclose(_logits(plain, tokens), ref, atol=1e-3)


def test_dora_merge_unmerge_matches_peft(tokens, tmp_path):
    pm = _peft(tiny_llama(), target_modules=["q_proj", "v_proj", "o_proj"], use_dora=True,
               init_lora_weights=False)
    _shake_magnitudes(pm)
    ref = _logits(pm, tokens)
    pm.save_pretrained(tmp_path)
    ours = tiny_llama()
    lk.load_adapter(ours, tmp_path)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    report = lk.merge(ours)
    assert report.layers == 6
    assert torch.allclose(_logits(ours, tokens), ref, atol=1e-5)
    peft_merged = pm.merge_and_unload().state_dict()
    ours_plain = lk.merged_state_dict(ours)
    assert ours_plain.keys() == peft_merged.keys()
    for k in peft_merged:
        assert torch.allclose(ours_plain[k], peft_merged[k], atol=1e-6), k
    lk.unmerge(ours)
    for k, v in ours.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-6), k
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with lk.merged(ours):  # keep_original: bit-exact
        assert torch.allclose(_logits(ours, tokens), ref, atol=1e-5)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dora_merged_state_dict_without_merging_and_with_plain_adapter(tokens):
    m = tiny_llama()
    lk.inject(m, lk.LoraConfig(r=2, targets=["q_proj"], init=False), adapter="plain")
    lk.inject(m, lk.LoraConfig(r=3, targets=["q_proj", "v_proj"], init=False, use_dora=True), adapter="d")
    with torch.no_grad():
        for _, layer in lora_layers(m):
            layer.lora_magnitude_vector["d"].mul_(1.5)
    lk.set_adapter(m, ["plain", "d"])
    ref = _logits(m, tokens)
    sd = lk.merged_state_dict(m)
    lk.merge(m, "plain")  # plain first, then DoRA on top: its norm must use the unmerged base
    lk.merge(m, "d")
    assert torch.allclose(_logits(m, tokens), ref, atol=1e-5)
    plain = tiny_llama()
    plain.load_state_dict(sd)
    assert torch.allclose(_logits(plain, tokens), ref, atol=1e-5)
    lk.unmerge(m)
    assert torch.allclose(_logits(m, tokens), ref, atol=1e-5)


def test_dora_conv_matches_peft(tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()

    x = torch.randn(2, 3, 8, 8)
    pm = _peft(build(), target_modules=["0", "2"], use_dora=True, init_lora_weights=False)
    _shake_magnitudes(pm)
    with torch.no_grad():
        ref = pm(x)
    pm.save_pretrained(tmp_path / "p")
    ours = build()
    lk.load_adapter(ours, tmp_path / "p")
    with torch.no_grad():
        assert torch.allclose(ours(x), ref, atol=1e-5)
        lk.merge(ours)
        assert torch.allclose(ours(x), ref, atol=1e-5)
        lk.unmerge(ours)
    lk.save_adapter(ours, tmp_path / "o")
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "o").eval()
    with torch.no_grad():
        assert torch.allclose(back(x), ref, atol=1e-5)


def test_dora_trains_magnitude_and_per_row(tokens):
    m = tiny_llama()
    lk.inject(m, lk.LoraConfig(r=4, targets=["q_proj", "v_proj"], use_dora=True), adapter="a")
    params = lk.adapter_parameters(m, "a")
    mags = [layer.lora_magnitude_vector["a"] for _, layer in lora_layers(m)]
    assert all(any(p is q for q in params) for p in mags)
    base = tiny_llama()
    assert torch.allclose(_logits(m, tokens), _logits(base, tokens), atol=1e-5)  # starts at the base
    m.train()
    m(tokens).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mags)
    m.eval()
    with torch.no_grad():
        for p in mags:
            p.mul_(1.2)
        for _, layer in lora_layers(m):
            layer.lora_B["a"].normal_(0, 0.1)
    full = _logits(m, tokens)
    with lk.per_row(m, ["a", None, "a"]):
        mixed = _logits(m, tokens)
    assert torch.allclose(mixed[0], full[0], atol=1e-5) and torch.allclose(mixed[2], full[2], atol=1e-5)
    assert torch.allclose(mixed[1], _logits(base, tokens)[1], atol=1e-5)


def test_dora_file_errors(tmp_path, tokens):
    from safetensors.torch import load_file, save_file

    m = tiny_llama()
    lk.inject(m, lk.LoraConfig(r=2, targets=["q_proj"], use_dora=True))
    lk.save_adapter(m, tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if k.endswith("lora_magnitude_vector"))
    save_file({k: v for k, v in sd.items() if k != key}, f)
    with pytest.raises(AdapterFileError, match="lora_magnitude_vector.*missing"):
        lk.load_adapter(tiny_llama(), tmp_path)
    sd[key] = torch.ones(7)
    save_file(sd, f)
    with pytest.raises(AdapterFileError, match=r"shape \(7,\)"):
        lk.load_adapter(tiny_llama(), tmp_path)


# ---- PiSSA / OLoRA / gaussian -----------------------------------------------------------------
@pytest.mark.parametrize("build,targets,init", [(tiny_llama, ["q_proj", "down_proj"], "pissa"),
                                                (tiny_llama, ["q_proj", "down_proj"], "olora"),
                                                (tiny_gpt2, ["c_attn", "c_fc"], "pissa")])
def test_base_changing_init_matches_peft_and_reloads(build, targets, init, tokens, tmp_path):
    original = _logits(build(), tokens)
    pm = _peft(build(), target_modules=targets, init_lora_weights=init, lora_alpha=16)
    ours = build()
    lk.inject(ours, lk.LoraConfig(r=4, alpha=16, targets=targets, init=init))
    # same split as PEFT: same residual base weights and factors, and the start equals the base
    peft_sd = {k.replace("base_model.model.", ""): v for k, v in pm.state_dict().items()}
    for k, v in ours.state_dict().items():
        pk = k.replace("lora_A.default", "lora_A.default.weight").replace("lora_B.default", "lora_B.default.weight")
        assert torch.allclose(v, peft_sd[pk], atol=1e-5), k
    assert torch.allclose(_logits(ours, tokens), original, atol=1e-4)
    with torch.no_grad():  # "train"
        for _, layer in lora_layers(ours):
            layer.lora_B["default"].add_(0.05 * torch.randn_like(layer.lora_B["default"]))
    trained = _logits(ours, tokens)
    assert not torch.allclose(trained, original, atol=1e-3)
    lk.save_adapter(ours, tmp_path / "ours")
    # reloads onto the ORIGINAL base, here and in PEFT (which re-runs the init and loads A, B)
    again = build()
    lk.load_adapter(again, tmp_path / "ours")
    assert torch.allclose(_logits(again, tokens), trained, atol=1e-5)
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    assert torch.allclose(_logits(back, tokens), trained, atol=1e-5)
    # dense reference: original W (out x in) + s*B@A - s*B0@A0 == what both compute
    assert lk.read_adapter(tmp_path / "ours")[0].init == init


def test_pissa_niter_is_fast_approximation(tokens):
    def build():  # q_proj with a decaying spectrum, where a randomized SVD is accurate
        m = tiny_llama()
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for layer in m.model.layers:
                U, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
                V, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
                layer.self_attn.q_proj.weight.copy_(U @ torch.diag(0.5 ** torch.arange(32.0)) @ V.T)
        return m

    base, m = build(), build()
    torch.manual_seed(0)
    lk.inject(m, lk.LoraConfig(r=4, alpha=4, targets=["q_proj"], init="pissa_niter_4"))
    assert torch.allclose(_logits(m, tokens), _logits(base, tokens), atol=1e-4)
    for path, layer in lora_layers(m):
        W = base.get_submodule(path).weight
        S = torch.linalg.svdvals(W)[:4]
        dW = layer.scaling["default"] * layer.lora_B["default"] @ layer.lora_A["default"]
        assert torch.allclose(torch.linalg.svdvals(dW)[:4], S, rtol=1e-3)


def test_gaussian_init_is_peft_rule():
    m = tiny_llama(hidden_size=256, intermediate_size=64, num_attention_heads=4)
    lk.inject(m, lk.LoraConfig(r=8, targets=["q_proj"], init="gaussian"))
    A = torch.cat([l.lora_A["default"].flatten() for _, l in lora_layers(m)])
    assert abs(A.std().item() - 1 / 8) < 0.01  # PEFT: nn.init.normal_(A, std=1/r), B = 0
    assert all(l.lora_B["default"].abs().sum() == 0 for _, l in lora_layers(m))


def test_base_changing_init_refuses_non_linear():
    with pytest.raises(LoraError, match="init='olora'.*embedding"):
        lk.inject(tiny_llama(), lk.LoraConfig(r=2, targets=["embed_tokens"], init="olora"))


# ---- rsLoRA, rank/alpha patterns, layers_to_transform -----------------------------------------
def test_patterns_rslora_layers_match_peft(tokens, tmp_path):
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
              rank_pattern={"q_proj": 2, r"model\.layers\.1\.mlp\.up_proj": 6},
              alpha_pattern={"v_proj": 3, "up_proj": 5}, use_rslora=True, init_lora_weights=False,
              layers_to_transform=[1, 2], layers_pattern="layers")
    pm = _peft(tiny_llama(num_hidden_layers=3), **kw)
    ref = _logits(pm, tokens)
    cfg = lk.LoraConfig(r=4, alpha=8, targets=kw["target_modules"], rank_pattern=kw["rank_pattern"],
                        alpha_pattern=kw["alpha_pattern"], rslora=True, layers_to_transform=[1, 2],
                        layers_pattern="layers")
    peft_layers = {n.replace("base_model.model.", ""): mod for n, mod in pm.named_modules()
                   if isinstance(mod, peft.tuners.lora.LoraLayer)}
    assert sorted(lk.find_targets(tiny_llama(num_hidden_layers=3), cfg)) == sorted(peft_layers)
    ours = lk.inject(tiny_llama(num_hidden_layers=3), cfg)
    for path, layer in lora_layers(ours):
        assert layer.rank("default") == peft_layers[path].r["default"], path
        assert layer.scaling["default"] == pytest.approx(peft_layers[path].scaling["default"]), path
    pm.save_pretrained(tmp_path / "p")
    loaded = lk.load_adapter(tiny_llama(num_hidden_layers=3), tmp_path / "p")
    assert torch.allclose(_logits(loaded, tokens), ref, atol=1e-5)
    lk.save_adapter(loaded, tmp_path / "o")
    back = peft.PeftModel.from_pretrained(tiny_llama(num_hidden_layers=3), tmp_path / "o").eval()
    assert torch.allclose(_logits(back, tokens), ref, atol=1e-5)
    sc = next(l for p, l in lora_layers(loaded) if p.endswith("1.mlp.up_proj")).scaling["default"]
    assert sc == pytest.approx(5 / math.sqrt(6))


@pytest.mark.parametrize("field,value,match", [
    ("use_dora", "yes", "use_dora"), ("init", "loftq", "init"), ("init", "pissa_niter_x", "init"),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern"), ("rank_pattern", ["q"], "rank_pattern"),
    ("alpha_pattern", {"q_proj": float("nan")}, "alpha_pattern"), ("alpha_pattern", {"(": 2}, "alpha_pattern"),
    ("layers_to_transform", [-1], "layers_to_transform"), ("layers_pattern", 3, "layers_pattern"),
    ("layers_pattern", [""], "layers_pattern"),
])
def test_new_config_fields_are_validated(field, value, match):
    with pytest.raises(LoraError, match=match):
        lk.LoraConfig(targets=["q_proj"], **{field: value})


def test_use_dora_reads_from_peft_json():
    cfg = lk.LoraConfig.from_peft({"peft_type": "LORA", "r": 2, "use_dora": True, "target_modules": ["q"]})
    assert cfg.use_dora and cfg.to_peft()["use_dora"] is True


# ---- LoRA+ ------------------------------------------------------------------------------------
def test_lora_plus_groups():
    m = tiny_llama()
    lk.inject(m, lk.LoraConfig(r=2, targets=["q_proj"], use_dora=True))
    opt = lk.lora_plus_optimizer(m, lr=1e-3, ratio=16, weight_decay=0.1)
    by_lr = {g["lr"]: g for g in opt.param_groups}
    Bs = {id(l.lora_B["default"]) for _, l in lora_layers(m)}
    As = {id(l.lora_A["default"]) for _, l in lora_layers(m)}
    assert {id(p) for p in by_lr[1e-3 * 16]["params"]} == Bs
    low = {id(p) for g in opt.param_groups if g["lr"] == 1e-3 for p in g["params"]}
    assert As <= low and len(low) == len(As) + len(Bs)  # A and the magnitudes at the base rate
    n_all = len(lk.adapter_parameters(m, "default"))
    assert sum(len(g["params"]) for g in opt.param_groups) == n_all
    with pytest.raises(LoraError, match="ratio"):
        lk.lora_plus_optimizer(m, lr=1e-3, ratio=0)


@pytest.mark.parametrize("build,kw", [
    ("bert", dict(target_modules=["query", "value"], layers_to_transform=1)),
    ("bert", dict(target_modules=["query", "dense"], layers_to_transform=[0], layers_pattern=["layer"],
                  rank_pattern={"attention.output.dense": 3})),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], layers_to_transform=[1], layers_pattern="h",
                  rank_pattern={r"transformer\.h\.1\.mlp\.c_proj": 5}, alpha_pattern={"c_attn": 2})),
])
def test_layer_selection_matches_peft(build, kw):
    from tiny import MODELS

    pm = _peft(MODELS[build](), **kw)
    peft_layers = {n.replace("base_model.model.", ""): mod for n, mod in pm.named_modules()
                   if isinstance(mod, peft.tuners.lora.LoraLayer)}
    cfg = lk.LoraConfig(r=4, alpha=8, targets=kw["target_modules"], layers_to_transform=kw["layers_to_transform"],
                        layers_pattern=kw.get("layers_pattern"), rank_pattern=kw.get("rank_pattern", {}),
                        alpha_pattern=kw.get("alpha_pattern", {}))
    ours = lk.inject(MODELS[build](), cfg)
    got = dict(lora_layers(ours))
    assert sorted(got) == sorted(peft_layers) and got
    for path, layer in got.items():
        assert layer.rank("default") == peft_layers[path].r["default"], path
        assert layer.scaling["default"] == pytest.approx(peft_layers[path].scaling["default"]), path
