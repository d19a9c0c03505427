"""per_row on real models: every row equals a run of that row's adapter alone (the independent
oracle), and equals the reference loop over adapters; prefill, KV-cache decode, autograd."""

import random

import pytest
import torch

import lorakit as lk
from lorakit.batch import RowGroups, reference_layer, rows
from lorakit.layer import state_of
from tiny import randomize, tiny_gpt2, tiny_llama

ADAPTERS = [("a", 2), ("b", 4), ("c", 8), ("d", 3), ("e", 4)]


def build(arch: str, dtype=torch.float32):
    if arch == "llama":
        model, targets = tiny_llama(), ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    else:
        model, targets = tiny_gpt2(), ["c_attn", "c_fc", "wte"]
    model = model.to(dtype)
    for i, (name, r) in enumerate(ADAPTERS):
        t = targets if i != 3 else targets[:1]  # "d" touches only one kind of layer
        lk.inject(model, lk.LoraConfig(r=r, alpha=2 * r, targets=t, init=False), name)
        randomize(model, name, 0.2)  # a visible effect per adapter
    return model


def mixes(rows: int, seed: int = 0) -> dict[str, list]:
    rng = random.Random(seed)
    names = [n for n, _ in ADAPTERS]
    w = [1 / (k + 1) ** 1.5 for k in range(len(names))]
    return {
        "one": ["c"] * rows,
        "distinct": (names + [None])[:rows],
        "uniform": [rng.choice(names) for _ in range(rows)],
        "zipf": rng.choices(names, weights=w, k=rows),
        "skewed": ["b" if rng.random() < 0.8 else rng.choice(names) for _ in range(rows)],
        "base": [rng.choice([None, None, "a", "e"]) for _ in range(rows)],
    }


def alone(model, x, names, **kw):
    out = []
    trains = [(p, p.requires_grad) for p in model.parameters()]
    for i, n in enumerate(names):
        lk.set_adapter(model, n)
        for p, t in trains:  # set_adapter freezes the other adapters; every row's gradient must reach its own
            p.requires_grad_(t)
        out.append(model(x[i:i + 1], **kw).logits)
    return torch.cat(out)


class Loop(RowGroups):
    """Row groups that every layer runs through the reference loop (one adapter at a time)."""

    def layer_forward(self, layer, x, y):
        return reference_layer(layer, x, y, self)

    def single_weights(self, layer, x):
        return None


def reference(model, x, names):
    """The reference loop over adapters, in every layer."""
    with rows(state_of(model), Loop(names, slots=None, keys=names, trainable=True, model_mode=True)):
        return model(x).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_row_matches_single_adapter_runs_across_mixes(arch):
    model = build(arch)
    x = torch.randint(0, 128, (6, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for kind, names in mixes(6).items():
            with lk.per_row(model, names):
                mixed = model(x).logits
            torch.testing.assert_close(mixed, alone(model, x, names), atol=2e-5, rtol=1e-4, msg=kind)
            torch.testing.assert_close(mixed, reference(model, x, names), atol=2e-5, rtol=1e-4, msg=kind)


def test_decode_with_kv_cache_matches_single_adapter_runs():
    model = build("llama")
    g = torch.Generator().manual_seed(1)
    names = ["a", "c", None, "e", "c", "b", "d", "a"]
    prompt = torch.randint(0, 128, (8, 5), generator=g)
    steps = torch.randint(0, 128, (8, 3), generator=g)
    with torch.no_grad():
        with lk.per_row(model, names):
            out = model(prompt, use_cache=True)
            cache, got = out.past_key_values, []
            for t in range(3):  # one new token per row, as a server's decode step
                out = model(steps[:, t:t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                got.append(out.logits[:, -1])
        want = alone(model, torch.cat([prompt, steps], 1), names)[:, -3:]
    torch.testing.assert_close(torch.stack(got, 1), want, atol=2e-5, rtol=1e-4)


def test_mixed_training_batch_gradients_reach_each_adapter():
    model = build("llama", torch.float64).train()
    for p in lk.adapter_parameters(model):
        p.requires_grad_(True)
    x = torch.randint(0, 128, (5, 6), generator=torch.Generator().manual_seed(2))
    names = ["a", "b", None, "a", "c"]

    def grads(run):
        model.zero_grad(set_to_none=True)
        run().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def fast():
        with lk.per_row(model, names):
            return model(x).logits

    def per_adapter():  # independent: each row alone with its adapter, losses summed
        return alone(model, x, names)

    got, want = grads(fast), grads(per_adapter)
    assert got.keys() == want.keys() and any(k.endswith(".a") for k in got) and not any(k.endswith(".d") for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


def test_per_row_sees_in_place_updates_and_new_adapters():
    model = build("llama")
    x = torch.randint(0, 128, (3, 4))
    names = ["a", "b", "a"]
    with torch.no_grad():
        with lk.per_row(model, names):
            model(x)
        for p in lk.adapter_parameters(model, "a"):
            p.mul_(1.5)  # an optimizer step, in place
        with lk.per_row(model, names):
            mixed = model(x).logits
        torch.testing.assert_close(mixed, alone(model, x, names), atol=2e-5, rtol=1e-4)
        lk.delete_adapter(model, "b")
        lk.inject(model, lk.LoraConfig(r=16, alpha=4, targets=["q_proj"], init=False), "b")
        with torch.no_grad():
            lk.adapter_parameters(model, "b")[1].normal_()
        with lk.per_row(model, names):
            mixed = model(x).logits
        torch.testing.assert_close(mixed, alone(model, x, names), atol=2e-5, rtol=1e-4)


def test_row_groups_still_map_adapters_to_rows():
    model = build("gpt2")
    with lk.per_row(model, ["a", None, "a", "b"]):
        g = state_of(model).rows
        assert isinstance(g, RowGroups) and {k: v.tolist() for k, v in g.items()} == {"a": [0, 2], "b": [3]}
    assert state_of(model).rows is None


def test_one_adapter_for_every_row_merges_on_the_fly_like_set_adapter(monkeypatch, tmp_path):
    """A mixed batch whose rows all use one adapter, with many tokens, takes the same merged path
    as a single active adapter (per_row and the bank); rows still equal the adapter alone."""
    from lorakit import core
    from lorakit.bank import AdapterBank

    model = build("llama")
    x = torch.randint(0, 128, (4, 40), generator=torch.Generator().manual_seed(3))  # 160 tokens
    calls = []
    real = core.linear_merged
    monkeypatch.setattr(core, "linear_merged", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        want = alone(model, x, ["c"] * 4)
        calls.clear()
        with lk.per_row(model, ["c"] * 4):
            got = model(x).logits
        assert calls, "per_row with one adapter did not merge on the fly"
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        lk.save_adapter(model, tmp_path / "c", "c")
        fresh = build("llama")
        for n, _ in ADAPTERS:
            lk.delete_adapter(fresh, n)
        bank = AdapterBank(fresh, capacity=2)
        bank.add("c", tmp_path / "c")
        calls.clear()
        with bank.rows(["c"] * 4):
            got = fresh(x).logits
        assert calls, "the bank with one adapter did not merge on the fly"
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        calls.clear()
        with lk.per_row(model, ["c", "c", None, "c"]):  # a base row: no single adapter
            model(x)
        assert not calls
