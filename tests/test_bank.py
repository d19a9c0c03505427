"""AdapterBank: adapters from disk in stacked slots, LRU at a capacity, all-or-nothing loads;
every row equals the model with that adapter loaded alone by load_adapter."""

import json

import pytest
import torch

import lorakit as lk
from lorakit.bank import AdapterBank
from tiny import randomize, tiny_bert, tiny_llama

RANKS = {"a": 2, "b": 8, "c": 4, "d": 1}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, r) in enumerate(RANKS.items()):
        m = tiny_llama()
        targets = ["q_proj", "v_proj", "embed_tokens"] if i % 2 == 0 else ["k_proj", "o_proj", "up_proj"]
        lk.inject(m, lk.LoraConfig(r=r, alpha=3 * r, targets=targets, init=False, rslora=i == 3), name)
        randomize(m, name, 0.3)
        lk.save_adapter(m, root / name, name)
    return root


def single(saved, name, x):
    m = tiny_llama()
    lk.load_adapter(m, saved / name, name)
    with torch.no_grad():
        return m(x).logits


def test_bank_rows_match_single_adapter_models_and_lru(saved):
    model = tiny_llama()
    bank = AdapterBank(model, capacity=3)
    for n in RANKS:
        bank.add(n, saved / n)
    assert bank.resident() == [] and lk.list_adapters(model) == []
    x = torch.randint(0, 128, (6, 5), generator=torch.Generator().manual_seed(0))
    want = {n: single(saved, n, x) for n in RANKS}
    base = tiny_llama()(x).logits.detach()
    batches = [["a", "b", None, "a", "c", "b"], ["d", "d", "a", "a", "a", None], ["c"] * 6, ["d", "b", "c", "a", "b", "d"][:5] + [None]]
    for names in batches[:3]:
        with torch.no_grad(), bank.rows(names):
            got = model(x).logits
        for i, n in enumerate(names):
            torch.testing.assert_close(got[i], (want[n] if n else base)[i], atol=2e-5, rtol=1e-4)
    assert bank.resident() == ["d", "a", "c"] and bank.evictions == 1  # "b" was least recently used
    with pytest.raises(lk.LoraError, match="at most 3"):
        with bank.rows(batches[3]):
            pass
    with pytest.raises(lk.LoraError, match="zzz"):
        with bank.rows(["zzz"]):
            pass


def test_bank_failed_replace_keeps_working_adapter(saved, tmp_path):
    model = tiny_llama()
    bank = AdapterBank(model, capacity=2)
    bank.add("a", saved / "a")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((saved / "b" / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(lk.LoraError, match="safetensors"):
        bank.add("a", bad, replace=True)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    cfg = json.loads((saved / "b" / "adapter_config.json").read_text())
    cfg["r"] = 5
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    (wrong / "adapter_model.safetensors").write_bytes((saved / "b" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(lk.LoraError, match="rank"):
        bank.add("a", wrong, replace=True)
    x = torch.randint(0, 128, (2, 4))
    with torch.no_grad(), bank.rows(["a", "a"]):
        got = model(x).logits
    torch.testing.assert_close(got, single(saved, "a", x), atol=2e-5, rtol=1e-4)
    bank.add("a", saved / "c", replace=True)  # a good replacement does replace
    with torch.no_grad(), bank.rows(["a", "a"]):
        got = model(x).logits
    torch.testing.assert_close(got, single(saved, "c", x), atol=2e-5, rtol=1e-4)


def test_load_adapter_replace_is_all_or_nothing(saved, tmp_path):
    model = tiny_llama()
    lk.load_adapter(model, saved / "a", "a")
    x = torch.randint(0, 128, (2, 4))
    before = model(x).logits.detach()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((saved / "b" / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(lk.LoraError):
        lk.load_adapter(model, bad, "a", replace=True)
    assert lk.list_adapters(model) == ["a"]
    torch.testing.assert_close(model(x).logits.detach(), before)


def test_bank_classifier_heads_per_row(tmp_path):
    for name, seed in (("pos", 1), ("neg", 2)):
        m = tiny_bert()
        lk.inject(m, lk.LoraConfig(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"], init=False), name)
        torch.manual_seed(seed)
        randomize(m, name, 0.3)
        lk.save_adapter(m, tmp_path / name, name)
    model = tiny_bert()
    bank = AdapterBank(model, capacity=2)
    bank.add("pos", tmp_path / "pos")
    bank.add("neg", tmp_path / "neg", keep_in_memory=True)
    x = torch.randint(0, 128, (4, 6))
    names = ["neg", "pos", None, "neg"]
    with torch.no_grad(), bank.rows(names):
        got = model(x).logits
    base = tiny_bert()(x).logits.detach()
    for i, n in enumerate(names):
        if n is None:
            want = base[i]
        else:
            m = tiny_bert()
            lk.load_adapter(m, tmp_path / n, n)
            want = m(x[i:i + 1]).logits.detach()[0]
        torch.testing.assert_close(got[i], want, atol=2e-5, rtol=1e-4)


def test_slots_shrink_back_when_a_large_adapter_leaves(saved, tmp_path):
    """A rank-64 adapter widens the slots of the layers it touches; once it is evicted or removed
    the slots are the size the remaining adapters need again (memory and step time come back),
    and the answers are unchanged."""
    m = tiny_llama()
    lk.inject(m, lk.LoraConfig(r=64, alpha=8, targets=["q_proj", "up_proj"], init=False), "big")
    randomize(m, "big", 0.1)
    lk.save_adapter(m, tmp_path / "big", "big")
    model = tiny_llama()
    bank = AdapterBank(model, capacity=2)
    bank.add("a", saved / "a")  # r=2 on q_proj, v_proj, embed_tokens
    bank.add("big", tmp_path / "big")
    x = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(1))

    def slots() -> dict:
        return {(n, st.rank, st.A.shape) for layer, st in bank._stacks.items() for n, l in lk.layer.lora_layers(model)
                if l is layer}

    with torch.no_grad(), bank.rows(["a", "a"]):
        want = model(x).logits
    small = slots()
    with torch.no_grad(), bank.rows(["a", "big"]):
        model(x)
    assert max(r for _, r, _ in slots()) == 64
    bank.evict("big")
    assert slots() == small
    with torch.no_grad(), bank.rows(["a", "a"]):
        torch.testing.assert_close(model(x).logits, want, atol=0, rtol=0)
    bank.load("big")
    bank.remove("big")
    assert slots() == small
    bank.remove("a")
    assert bank._stacks == {}  # nothing resident: no slots at all


def test_slots_are_allocated_for_the_adapters_in_use_not_the_capacity(saved):
    model = tiny_llama()
    bank = AdapterBank(model, capacity=8)
    for n in RANKS:
        bank.add(n, saved / n)
    bank.ensure(["a", "b"])
    assert {st.A.shape[0] for st in bank._stacks.values()} == {2}  # two resident: two slots, of 8 allowed
    bank.ensure(["a", "b", "c", "d"])
    assert {st.A.shape[0] for st in bank._stacks.values()} == {4}
    bank.evict("c")
    bank.evict("d")
    bank.evict("b")
    assert {st.A.shape[0] for st in bank._stacks.values()} == {1}


def test_a_float16_model_refuses_an_adapter_its_slots_cannot_hold(tmp_path):
    """Slots of a float16 model hold s * B in float16: an update beyond 65504 would be inf there
    (though finite in float32), so it is refused when checked; one within range is served, scaled
    in float32 and rounded once."""
    src = tiny_llama()
    lk.inject(src, lk.LoraConfig(r=2, alpha=4, targets=["q_proj"], init=False))
    for name, scale in (("big", 1e5), ("ok", 1.0)):
        with torch.no_grad():
            for n, p in src.named_parameters():
                if "lora_B" in n:
                    p.fill_(scale / 2)  # s = alpha / r = 2
        lk.save_adapter(src, tmp_path / name)
    model = tiny_llama().half()
    bank = AdapterBank(model)
    with pytest.raises(lk.LoraError, match="overflows"):
        bank.prepare(tmp_path / "big")
    ref = tiny_llama()  # as PEFT would build it: the adapter alone, float32
    lk.load_adapter(ref, tmp_path / "ok")
    x = torch.randint(0, 128, (2, 6))
    bank.add("ok", bank.prepare(tmp_path / "ok"))
    with bank.rows(["ok", "ok"]), torch.no_grad():
        got = model(x).logits.float()
    torch.testing.assert_close(got, ref(x).logits, atol=5e-2, rtol=5e-2)


def test_a_full_bank_reuses_its_slots_without_reallocating(monkeypatch):
    """Loading into a full bank evicts the least recently used adapter and refills its slot in
    place: the stacks are not shrunk and grown again on every load."""
    m = tiny_llama()
    for i in range(4):
        lk.inject(m, lk.LoraConfig(r=4, targets="all-linear", init=False), f"a{i}")
    bank = AdapterBank(m, capacity=2)
    for i in range(4):
        bank.add(f"a{i}")
    grows = []
    real = AdapterBank._grow
    monkeypatch.setattr(AdapterBank, "_grow", lambda self, n: (grows.append(n), real(self, n))[1])
    for k in range(30):
        bank.load(f"a{k % 4}")
    assert len(grows) <= 2 and bank.evictions >= 26  # once to 1 slot, once to 2; then only refills
