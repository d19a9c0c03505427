"""torch.compile: LoRA layers trace in one graph (fullgraph=True) for training and inference, with
the eager results; a model prepared for hot swapping switches and replaces adapters with zero
recompiles (counted with a backend that counts its compilations)."""

import pytest
import torch
import torch._dynamo as dynamo

import lorakit as lk
from tiny import randomize, tiny_gpt2, tiny_llama

ARCHS = {"llama": tiny_llama, "gpt2": lambda: tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}  # no dropout:
# a compiled graph draws other random numbers than eager


def adapted(arch, names=("a",), r=4):
    m = ARCHS[arch]()
    for i, n in enumerate(names):
        lk.inject(m, lk.LoraConfig(r=r + 2 * i, alpha=8, targets="all-linear", init=False), n)
        torch.manual_seed(i)
        randomize(m, n, 0.2)
    return m


class Counting:
    """A torch.compile backend that runs the graph as traced and counts compilations."""

    def __init__(self):
        self.n = 0

    def __call__(self, gm, example_inputs):
        self.n += 1
        return gm.forward


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("grad", [True, False])
def test_fullgraph_matches_eager(arch, grad):
    dynamo.reset()
    model = adapted(arch)
    model.train(grad)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    params = lk.adapter_parameters(model, "a")
    with torch.set_grad_enabled(grad):
        eager = model(x).logits
        if grad:
            eager.float().pow(2).mean().backward()
            want = [p.grad.clone() for p in params]
            model.zero_grad(set_to_none=True)
        counting = Counting()
        compiled = torch.compile(model, fullgraph=True, backend=counting)
        got = compiled(x).logits
        torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
        if grad:
            got.float().pow(2).mean().backward()
            for p, w in zip(params, want):
                torch.testing.assert_close(p.grad, w, atol=1e-5, rtol=1e-5)
    assert counting.n == 1  # one graph: no break anywhere in the adapted model


def test_no_grad_over_many_tokens_merges_on_the_fly_in_one_graph():
    """The no-grad path that forms W + dW on the fly (many tokens) traces too."""
    dynamo.reset()
    model = adapted("llama").eval()
    x = torch.randint(0, 128, (4, 60))
    with torch.no_grad():
        eager = model(x).logits
        got = torch.compile(model, fullgraph=True, backend=Counting())(x).logits
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)


def _eager(arch, name, x, path=None):
    m = ARCHS[arch]()
    if path is not None:
        lk.load_adapter(m, path, name)
    with torch.no_grad():
        return m(x).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hot_swaps_without_recompiling(arch, tmp_path):
    dynamo.reset()
    model = adapted(arch, names=("a", "b")).eval()
    for n in ("a", "b"):
        lk.save_adapter(model, tmp_path / n, n)
    # a third adapter of another rank, saved from another model of the same base
    other = adapted(arch, names=("c",), r=2)
    torch.manual_seed(7)
    randomize(other, "c", 0.3)
    lk.save_adapter(other, tmp_path / "c", "c")
    x = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    want = {n: _eager(arch, n, x, tmp_path / n) for n in ("a", "b", "c")}
    base = _eager(arch, None, x)

    lk.set_adapter(model, "a")
    lk.prepare_for_compile(model, max_rank=8)
    counting = Counting()
    compiled = torch.compile(model, fullgraph=True, backend=counting)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, want["a"], atol=1e-5, rtol=1e-5)
        lk.set_adapter(model, "b")
        torch.testing.assert_close(compiled(x).logits, want["b"], atol=1e-5, rtol=1e-5)
        with lk.disable_adapters(model):
            torch.testing.assert_close(compiled(x).logits, base, atol=1e-5, rtol=1e-5)
        lk.hotswap_adapter(model, tmp_path / "c", "b")  # b's weights replaced by c's (rank 2 < 4)
        torch.testing.assert_close(compiled(x).logits, want["c"], atol=1e-5, rtol=1e-5)
        lk.set_adapter(model, "a")
        torch.testing.assert_close(compiled(x).logits, want["a"], atol=1e-5, rtol=1e-5)
    assert counting.n == 1  # every switch and swap was a copy into the slots


def test_without_preparing_a_switch_recompiles():
    """The counter can see recompiles: the same switch on an unprepared compiled model retraces."""
    dynamo.reset()
    model = adapted("llama", names=("a", "b")).eval()
    lk.set_adapter(model, "a")
    counting = Counting()
    compiled = torch.compile(model, backend=counting)
    x = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        compiled(x)
        lk.set_adapter(model, "b")
        compiled(x)
    assert counting.n == 2


def test_hot_swap_refuses_what_would_change_the_graph(tmp_path):
    model = adapted("llama").eval()
    lk.prepare_for_compile(model, max_rank=4)
    wide = adapted("llama", names=("w",), r=6)
    lk.save_adapter(wide, tmp_path / "w", "w")
    with pytest.raises(lk.AdapterFileError, match="max_rank=4"):
        lk.hotswap_adapter(model, tmp_path / "w", "a")
    emb = tiny_llama()
    lk.inject(emb, lk.LoraConfig(r=2, targets=["embed_tokens"]), "e")
    lk.save_adapter(emb, tmp_path / "e", "e")
    with pytest.raises(lk.AdapterFileError, match="does not wrap"):
        lk.hotswap_adapter(model, tmp_path / "e", "a")
    with pytest.raises(lk.LoraError, match="max_rank"):
        lk.prepare_for_compile(adapted("llama", r=6), max_rank=4)


def test_dropout_trains_in_one_graph_with_the_right_rate():
    """Adapter dropout under torch.compile: the mask's draw (Tensor.random_, which Dynamo does not
    trace) runs as one opaque random op; it keeps each element with probability 1-p, and the
    adapted model still traces in one graph and trains."""
    from lorakit import core

    dynamo.reset()
    p = 0.3
    x = torch.empty(1000, 999)
    # inductor itself: two draws from one input must stay two (no common-subexpression merge)
    bits, again = torch.compile(lambda x: (core.keep_bits(x, p), core.keep_bits(x, p)), fullgraph=True)(x)
    assert bits.dtype == torch.int8 and set(bits.unique().tolist()) <= {0, -1}
    rate = (bits != 0).double().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / bits.numel()) ** 0.5
    assert (bits != again).any()
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, targets="all-linear", dropout=p, init=False))
    model.train()
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    counting = Counting()
    compiled = torch.compile(model, fullgraph=True, backend=counting)
    losses = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        loss = compiled(x, labels=x).loss
        loss.backward()
        losses.append(loss.item())
    assert counting.n == 1 and losses[0] != losses[1]  # one graph; a fresh mask each step
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in lk.adapter_parameters(model))
    model.eval()  # no dropout: the compiled graph for eval equals eager
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=Counting())(x).logits, model(x).logits)
