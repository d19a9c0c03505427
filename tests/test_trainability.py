"""set_adapter decides what trains, as PEFT's does: the active adapters' parameters require grad,
every other adapter's are frozen, the base stays frozen; inference_mode=True freezes them all.
The oracle is PEFT itself on the same tiny Llama and the same sequence of switches."""

import re
import warnings

import pytest
import torch

import lorakit as lk

from tiny import randomize, tiny_llama

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]
_KEY = re.compile(r"^(?:base_model\.model\.)?(.*?)\.(lora_A|lora_B|lora_magnitude_vector|modules_to_save)\."
                  r"([A-Za-z0-9_-]+)(?:\.weight)?$")


def trainable(model) -> set[tuple[str, ...]]:
    """(module path, part, adapter) of every parameter that requires grad, in lorakit's and PEFT's
    naming alike; anything else (a base weight) as ("base", name)."""
    out = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            m = _KEY.match(name)
            out.add(m.groups() if m else ("base", name))
    return out


def test_the_switched_to_adapter_trains():
    """inject a, inject b (which froze a), set_adapter a: a training step trains a, not b."""
    model = tiny_llama()
    cfg = lk.LoraConfig(r=4, targets=TARGETS)
    lk.inject(model, cfg, "a")
    lk.inject(model, cfg, "b")
    lk.set_adapter(model, "a")
    randomize(model, "a", 0.1)  # B = 0 at init would give A a zero gradient
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()(x, labels=x).loss.backward()  # before: "element 0 of tensors does not require grad"
    a, b = lk.adapter_parameters(model, "a"), lk.adapter_parameters(model, "b")
    assert len(a) == len(b) == 4 * len(TARGETS)  # A and B of q_proj and v_proj in both layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a)
    assert all(p.grad is None for p in b)
    ids = {id(p) for p in a + b}
    assert all(p.grad is None and not p.requires_grad for p in model.parameters() if id(p) not in ids)
    before = [p.detach().clone() for p in a]
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(a, before))


CASES = {
    "lora": dict(),
    "dora": dict(use_dora=True),
    "modules_to_save": dict(modules_to_save=["lm_head"]),
}
# (adapters to activate, inference_mode); PEFT's modules_to_save take one adapter at a time
SWITCHES = [("a", False), ("b", False), (["a", "b"], False), ("a", True), ("b", False), (["b"], True), ("a", False)]


@pytest.mark.parametrize("case", list(CASES))
def test_same_trainable_parameters_as_peft(case):
    ours = tiny_llama()
    cfg = lk.LoraConfig(r=2, targets=TARGETS, **CASES[case])
    lk.inject(ours, cfg, "a")
    lk.inject(ours, cfg, "b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pcfg = peft.LoraConfig(r=2, target_modules=TARGETS, **CASES[case])  # same field names
        theirs = peft.get_peft_model(tiny_llama(), pcfg, adapter_name="a")
        theirs.add_adapter("b", pcfg)
    seen = 0
    for names, inference in SWITCHES:
        if case == "modules_to_save" and isinstance(names, list) and len(names) > 1:
            continue
        lk.set_adapter(ours, names, inference_mode=inference)
        if isinstance(names, list):
            theirs.base_model.set_adapter(names, inference_mode=inference)
        else:
            theirs.set_adapter(names, inference_mode=inference)
        want = trainable(theirs)
        assert trainable(ours) == want, (names, inference)
        assert not any(k[0] == "base" for k in want)
        active = {names} if isinstance(names, str) else set(names)
        assert {k[2] for k in want} == (set() if inference else active)
        assert lk.active_adapters(ours) == sorted(active, key=["a", "b"].index)
        seen += 1
    assert seen >= 5


def test_inference_mode_must_be_a_bool_and_none_freezes_every_adapter():
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=2, targets=TARGETS), "a")
    with pytest.raises(lk.LoraError, match="inference_mode"):
        lk.set_adapter(model, "a", inference_mode="yes")
    lk.set_adapter(model, None)
    assert not any(p.requires_grad for p in model.parameters())
    lk.set_adapter(model, "a")
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in lk.adapter_parameters(model, "a")}
