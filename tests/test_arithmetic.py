"""Adapter arithmetic: exact `linear` (rank concatenation) against per-adapter outputs and a dense
reference; svd error; ties/dare against PEFT's merge_utils and repeatable with a seed; results
save, load here and in PEFT."""

import pytest
import torch

import lorakit as lk
from lorakit.arithmetic import dare, ties
from lorakit.errors import LoraError
from lorakit.layer import lora_layers
from tiny import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def _two(build=tiny_llama, targets=("q_proj", "v_proj")):
    m = build()
    torch.manual_seed(1)
    lk.inject(m, lk.LoraConfig(r=2, alpha=4, targets=list(targets), init=False), adapter="a")
    # b: another rank, rsLoRA, one layer more, a rank_pattern
    more = list(targets) + (["o_proj"] if build is tiny_llama else [])
    lk.inject(m, lk.LoraConfig(r=3, alpha=5, targets=more, init=False, rslora=True,
                               rank_pattern={"v_proj": 4}), adapter="b")
    return m


def _logits(m, x):
    with torch.no_grad():
        return m(x).logits


@torch.no_grad()
def _dense(build, m, weights):
    """A plain model with W + sum_i w_i s_i B_i A_i written in (float64 arithmetic)."""
    plain = build()
    mods = dict(plain.named_modules())
    for path, layer in lora_layers(m):
        W = layer.kind.matrix(mods[path])
        acc = W.double()
        for name, w in weights.items():
            if name in layer.lora_A:
                acc = acc + w * layer.scaling[name] * layer.lora_B[name].double() @ layer.lora_A[name].double()
        W.copy_(acc.to(W.dtype))
    return plain


@pytest.mark.parametrize("build,targets", [(tiny_llama, ("q_proj", "v_proj")), (tiny_gpt2, ("c_attn",))])
def test_linear_is_exact(build, targets, tokens, tmp_path):
    m = _two(build, targets)
    report = lk.combine_adapters(m, ["a", "b"], [0.7, -1.3], "ab")
    assert report.error == 0.0 and report.method == "linear"
    first = next(p for p, _ in lora_layers(m))
    assert report.ranks[first] == 2 + 3
    # per layer: the combined delta output is the weighted sum of the adapters' delta outputs
    for path, layer in lora_layers(m):
        x = torch.randn(5, layer.in_features)
        want = sum(w * layer.lora_delta_out(x, n) for n, w in (("a", 0.7), ("b", -1.3)) if n in layer.lora_A)
        assert torch.allclose(layer.lora_delta_out(x, "ab"), want, atol=1e-6), path
    # whole model: equals the dense weighted sum of the updates
    lk.set_adapter(m, "ab")
    assert torch.allclose(_logits(m, tokens), _logits(_dense(build, m, {"a": 0.7, "b": -1.3}), tokens), atol=1e-5)
    # weights 1, 1: the same as both adapters active together
    lk.combine_adapters(m, ["a", "b"], [1, 1], "sum")
    lk.set_adapter(m, "sum")
    together = _logits(m, tokens)
    lk.set_adapter(m, ["a", "b"])
    assert torch.allclose(together, _logits(m, tokens), atol=1e-5)
    # a normal adapter: saves, loads here and in PEFT with the same logits
    lk.set_adapter(m, "ab")
    ref = _logits(m, tokens)
    lk.save_adapter(m, tmp_path, adapter="ab")
    again = lk.load_adapter(build(), tmp_path)
    assert torch.allclose(_logits(again, tokens), ref, atol=1e-5)
    back = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    assert torch.allclose(_logits(back, tokens), ref, atol=1e-5)


def test_svd_error_reported_and_decreasing(tokens):
    m = _two()
    errs = []
    for r in (1, 2, 4, 9):
        rep = lk.combine_adapters(m, ["a", "b"], [1.0, 0.5], f"s{r}", method="svd", rank=r)
        errs.append(rep.error)
        assert set(rep.errors) == set(rep.ranks) and all(0 <= e <= 1 for e in rep.errors.values())
        assert str(rep).startswith("svd")
    assert errs[0] > errs[1] > errs[2] > 0
    assert errs[3] < 1e-6  # rank >= 2 + 4: the sum is represented exactly
    lk.set_adapter(m, "s9")
    exact = _dense(tiny_llama, m, {"a": 1.0, "b": 0.5})
    assert torch.allclose(_logits(m, tokens), _logits(exact, tokens), atol=1e-5)
    # the reported error is the true relative Frobenius error of the compressed update
    rep = lk.combine_adapters(m, ["a", "b"], [1.0, 0.5], "chk", method="svd", rank=2)
    for path, layer in lora_layers(m):
        target = sum(w * layer.scaling[n] * layer.lora_B[n] @ layer.lora_A[n]
                     for n, w in (("a", 1.0), ("b", 0.5)) if n in layer.lora_A)
        got = layer.scaling["chk"] * layer.lora_B["chk"] @ layer.lora_A["chk"]
        true = ((target - got).norm() / target.norm()).item()
        assert rep.errors[path] == pytest.approx(true, rel=1e-3, abs=1e-6)


def test_ties_dare_match_peft_merge_utils():
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(6, 5, generator=g) for _ in range(3)]
    w = [0.5, 1.0, -0.7]
    ref = merge_utils.ties(torch.stack(deltas), torch.tensor(w), density=0.4)
    assert torch.allclose(ties(deltas, w, 0.4), ref, atol=1e-6)
    # dare: PEFT draws its mask with torch.bernoulli; same distribution, check the rule instead
    out = dare(deltas, w, 0.5, torch.Generator().manual_seed(3))
    kept = sum(wi * d for d, wi in zip(deltas, w))
    assert out.shape == kept.shape
    one = dare([deltas[0]], [1.0], 0.5, torch.Generator().manual_seed(3))
    nz = one != 0
    assert torch.allclose(one[nz], 2 * deltas[0][nz]) and 0.2 < nz.float().mean() < 0.8


def test_ties_dare_deterministic_and_save(tokens, tmp_path):
    m = _two()
    r1 = lk.combine_adapters(m, ["a", "b"], [1.0, 1.0], "t1", method="ties", density=0.5, rank=3)
    r2 = lk.combine_adapters(m, ["a", "b"], [1.0, 1.0], "t2", method="ties", density=0.5, rank=3)
    d1 = lk.combine_adapters(m, ["a", "b"], [1.0, 1.0], "d1", method="dare", density=0.5, seed=7)
    d2 = lk.combine_adapters(m, ["a", "b"], [1.0, 1.0], "d2", method="dare", density=0.5, seed=7)
    d3 = lk.combine_adapters(m, ["a", "b"], [1.0, 1.0], "d3", method="dare", density=0.5, seed=8)
    assert r1.error == r2.error and d1.error == d2.error
    for _, layer in lora_layers(m):
        assert torch.equal(layer.lora_A["t1"], layer.lora_A["t2"])
        assert torch.equal(layer.lora_B["d1"], layer.lora_B["d2"])
        assert not torch.equal(layer.lora_B["d1"], layer.lora_B["d3"])
    lk.set_adapter(m, "t1")
    ref = _logits(m, tokens)
    lk.save_adapter(m, tmp_path, adapter="t1")
    assert torch.allclose(_logits(lk.load_adapter(tiny_llama(), tmp_path), tokens), ref, atol=1e-5)


def test_combine_errors():
    m = _two()
    with pytest.raises(LoraError, match="method"):
        lk.combine_adapters(m, ["a", "b"], [1, 1], "x", method="cat")
    with pytest.raises(LoraError, match="2 adapters but 1 weights"):
        lk.combine_adapters(m, ["a", "b"], [1], "x")
    with pytest.raises(LoraError, match="no adapter named 'zz'"):
        lk.combine_adapters(m, ["a", "zz"], [1, 1], "x")
    with pytest.raises(LoraError, match="already exists"):
        lk.combine_adapters(m, ["a"], [1], "b")
    with pytest.raises(LoraError, match="linear.*exact"):
        lk.combine_adapters(m, ["a"], [1], "x", rank=3)
    with pytest.raises(LoraError, match="density"):
        lk.combine_adapters(m, ["a"], [1], "x", method="ties", density=0)
    lk.inject(m, lk.LoraConfig(r=2, targets=["q_proj"], use_dora=True), adapter="d")
    with pytest.raises(LoraError, match="dora variant"):
        lk.combine_adapters(m, ["a", "d"], [1, 1], "x")
