"""The fused LM-head + cross-entropy loss against the plain computation it replaces."""

import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.train.loss import causal_lm_loss, fusable_head, linear_cross_entropy
from tiny import tiny_gpt2, tiny_llama


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_logits_then_cross_entropy(chunk, bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 6, dtype=torch.float64, generator=g)
    W = torch.randn(13, 6, dtype=torch.float64, generator=g)
    b = torch.randn(13, dtype=torch.float64, generator=g) if bias else None
    labels = torch.randint(0, 13, (10,), generator=g)
    labels[[2, 7]] = -100
    got, want = [], []
    for fused, out in ((True, got), (False, want)):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        bb = b.clone().requires_grad_() if bias else None
        if fused:
            loss = linear_cross_entropy(hh, WW, bb, labels, chunk=chunk)
        else:
            loss = F.cross_entropy(F.linear(hh, WW, bb), labels, ignore_index=-100)
        (loss * 1.7).backward()
        out += [loss.detach(), hh.grad, WW.grad] + ([bb.grad] if bias else [])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    assert got[1][[2, 7]].abs().sum() == 0  # ignored positions get no gradient


def test_all_labels_ignored_gives_zero_loss_not_nan():
    h = torch.randn(4, 3, requires_grad=True)
    loss = linear_cross_entropy(h, torch.randn(5, 3), None, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(h.grad, torch.zeros_like(h))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(N, hidden\)"):
        linear_cross_entropy(torch.randn(2, 3, 4), torch.randn(5, 4), None, torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_loss_equals_hf_loss_and_gradients_with_lora(arch):
    torch.manual_seed(0)
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    lk.inject(model, lk.LoraConfig(r=4, targets="all-linear", init=False))
    assert fusable_head(model) is not None
    ids = torch.randint(0, 128, (3, 9))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0
    labels[2, -2:] = -100
    grads = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        if fused:
            loss = causal_lm_loss(model, ids, labels, attention_mask=mask)
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, g1), (l2, g2) = grads
    torch.testing.assert_close(l1, l2)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-6, rtol=1e-4, msg=k)


def test_causal_lm_loss_keeps_no_logits_for_backward():
    """What autograd keeps: no tensor as large as the logits (tokens x vocab) with the fused loss."""
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    ids = torch.randint(0, 128, (4, 16))
    vocab = model.config.vocab_size
    for fused in (True, False):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = causal_lm_loss(model, ids, ids) if fused else model(input_ids=ids, labels=ids).loss
        loss.backward()
        biggest = max(sizes)
        if fused:
            assert biggest < 4 * 15 * vocab, biggest
        else:
            assert biggest >= 4 * 15 * vocab  # the check can fail: HF's loss keeps the logits


def test_targeted_lm_head_falls_back_to_the_model_loss():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2, targets=["lm_head", "q_proj"], init=False))
    assert fusable_head(model) is None
    ids = torch.randint(0, 128, (2, 7))
    torch.testing.assert_close(causal_lm_loss(model, ids, ids), model(input_ids=ids, labels=ids).loss)


def test_granite_logits_scaling_is_not_fused_and_matches_hf():
    """Granite divides its logits by config.logits_scaling: fusing the plain head would be wrong."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    model = GraniteForCausalLM(GraniteConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, logits_scaling=8.0))
    assert fusable_head(model) is None
    ids = torch.randint(0, 64, (2, 6))
    torch.testing.assert_close(causal_lm_loss(model, ids, ids), model(input_ids=ids, labels=ids).loss)


def test_no_grad_loss_equals_grad_loss():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        a = causal_lm_loss(model, ids, ids)
    torch.testing.assert_close(a, model(input_ids=ids, labels=ids).loss.detach())
