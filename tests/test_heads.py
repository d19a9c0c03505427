"""Adapters whose classification heads have their own label counts, on one base.

Oracle: for each adapter, a fresh model built with that adapter's label count (so its head has the
file's shape: the plain load path) with the adapter loaded alone. The base here has 2 labels, the
adapters 3 and 5: every head is a resized copy.
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.bank import AdapterBank
from lorakit.errors import AdapterFileError
from tiny import randomize, tiny_bert

HEADS = {"three": 3, "five": 5}


def model_with(n_labels: int):
    """The tiny BERT with `n_labels` outputs; the encoder is the same for every label count."""
    m = tiny_bert(num_labels=n_labels)
    m.bert.load_state_dict(tiny_bert(num_labels=2).bert.state_dict())
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    for i, (name, n) in enumerate(HEADS.items()):
        m = model_with(n)
        cfg = lk.LoraConfig(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"],
                            init=False, task_type="SEQ_CLS")
        lk.inject(m, cfg, name)
        torch.manual_seed(10 + i)
        randomize(m, name, 0.4)
        lk.save_adapter(m, root / name, name)
    return root


def oracle(saved, name, x):
    m = model_with(HEADS[name]).eval()
    lk.load_adapter(m, saved / name, name)
    with torch.no_grad():
        return m(input_ids=x).logits


def shared(saved):
    base = model_with(2).eval()
    for name in HEADS:
        lk.load_adapter(base, saved / name, name)
    return base


@pytest.fixture
def x():
    return torch.randint(0, 128, (6, 9), generator=torch.Generator().manual_seed(3))


def test_set_adapter_switches_heads_of_different_sizes(saved, x):
    base = shared(saved)
    with torch.no_grad():
        plain = model_with(2).eval()(input_ids=x).logits
        for name, n in HEADS.items():
            lk.set_adapter(base, name)
            got = base(input_ids=x).logits
            assert got.shape == (6, n)
            torch.testing.assert_close(got, oracle(saved, name, x))
        with lk.disable_adapters(base):
            torch.testing.assert_close(base(input_ids=x).logits, plain)
    # saved again from the shared base, it is the same file
    out = saved.parent / "resaved"
    lk.save_adapter(base, out, "five")
    m = model_with(5).eval()
    lk.load_adapter(m, out, "five")
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=x).logits, oracle(saved, "five", x))
    shutil.rmtree(out)


def _check_padded(got, names, saved, x, plain):
    assert got.shape == (len(names), max(HEADS.values()))
    want = {n: oracle(saved, n, x) for n in HEADS}
    for i, n in enumerate(names):
        k = HEADS[n] if n else 2
        ref = want[n][i] if n else plain[i]
        torch.testing.assert_close(got[i, :k], ref)
        assert torch.isneginf(got[i, k:]).all(), (i, n)
        torch.testing.assert_close(got[i].softmax(-1)[:k], ref.softmax(-1))


@pytest.mark.parametrize("names", [["three", "five", None, "three", "five", None],
                                   ["five", "three", "three", "three", "three", "five"]])
def test_mixed_batch_pads_to_the_widest_head_with_minus_inf(saved, x, names):
    base = shared(saved)
    with torch.no_grad():
        plain = model_with(2).eval()(input_ids=x).logits
        with lk.per_row(base, names):
            got = base(input_ids=x).logits
        _check_padded(got, names, saved, x, plain)
        # the adapter bank (what the server runs) reads the same files
        fresh = model_with(2).eval()
        bank = AdapterBank(fresh, capacity=2)
        for n in HEADS:
            bank.add(n, saved / n)
        with bank.rows(names):
            _check_padded(fresh(input_ids=x).logits, names, saved, x, plain)
    # one adapter on every row: its own width, no padding
    with torch.no_grad(), lk.per_row(base, ["three"] * 6):
        torch.testing.assert_close(base(input_ids=x).logits, oracle(saved, "three", x))


def test_mixed_batch_trains_each_head(saved, x):
    base = shared(saved)
    for n in HEADS:
        for p in lk.adapter_parameters(base, n):
            p.requires_grad_(True)
    names = ["three", "five", "five", "three", "five", "three"]
    target = torch.tensor([2, 4, 0, 1, 3, 0])
    with lk.per_row(base, names):
        logits = base(input_ids=x).logits
    F.cross_entropy(logits, target).backward()
    for n in HEADS:
        head = base.classifier.modules_to_save[n]
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
        assert head.weight.grad.shape == (HEADS[n], 32)


def test_only_a_classification_heads_output_may_differ(saved, tmp_path):
    base = model_with(2).eval()
    cfg_file = saved / "five" / "adapter_config.json"
    # no task_type: a resized head is refused, and the error says why
    plain = tmp_path / "plain"
    shutil.copytree(saved / "five", plain)
    cfg = json.loads(cfg_file.read_text())
    cfg["task_type"] = None
    (plain / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="task_type"):
        lk.load_adapter(base, plain, "x")
    # a classification adapter still may not change the head's input size, nor disagree on its labels
    from safetensors.torch import load_file, save_file

    for bad, change in [("wide_in", lambda t: {**t, "base_model.model.classifier.weight": torch.zeros(5, 16)}),
                        ("bias", lambda t: {**t, "base_model.model.classifier.bias": torch.zeros(4)})]:
        d = tmp_path / bad
        shutil.copytree(saved / "five", d)
        save_file(change(load_file(d / "adapter_model.safetensors")), d / "adapter_model.safetensors")
        with pytest.raises(AdapterFileError, match="classifier"):
            lk.load_adapter(base, d, "x")
    assert lk.layer.state_of(base) is None or not lk.layer.state_of(base).configs  # nothing half-loaded
