"""Batched LoRA ops against their plain loop references, across adapter mixes (punica-style)."""

import random

import pytest
import torch

from lorakit import ops

N_SLOTS = 8


def mix(kind: str, rows: int, slots: int = N_SLOTS, seed: int = 0) -> list[int]:
    """Per-row slot ids for the mixes a serving batch sees (-1: base row)."""
    rng = random.Random(seed)
    if kind == "one":
        return [3] * rows
    if kind == "distinct":
        return rng.sample(range(slots), rows)
    if kind == "uniform":
        return [rng.randrange(slots) for _ in range(rows)]
    if kind == "zipf":
        w = [1 / (k + 1) ** 1.5 for k in range(slots)]
        return rng.choices(range(slots), weights=w, k=rows)
    if kind == "skewed":
        return [0 if rng.random() < 0.85 else rng.randrange(1, slots) for _ in range(rows)]
    if kind == "base":
        return [rng.choice([-1, -1, 2, 5]) for _ in range(rows)]
    if kind == "sorted":
        return sorted(rng.randrange(slots) for _ in range(rows))
    if kind == "pairs":  # in slot order, equal groups: the sorted layout works in place
        return [2 + i // 2 for i in range(rows)]
    raise ValueError(kind)


MIXES = ["one", "distinct", "uniform", "zipf", "skewed", "base", "sorted", "pairs"]


def stacks(dtype=torch.float32, n_in=16, n_out=24, ranks=(4, 2, 8, 1, 8, 3, 4, 6), seed=0):
    """Slot stacks A (S, r, in), Bt (S, r, out) with mixed ranks, zero-padded to the largest (as
    the bank stores them)."""
    g = torch.Generator().manual_seed(seed)
    r = max(ranks)
    A = torch.zeros(len(ranks), r, n_in, dtype=dtype)
    Bt = torch.zeros(len(ranks), r, n_out, dtype=dtype)
    for s, rk in enumerate(ranks):
        A[s, :rk] = torch.randn(rk, n_in, generator=g, dtype=dtype)
        Bt[s, :rk] = torch.randn(rk, n_out, generator=g, dtype=dtype)
    return A, Bt


@pytest.mark.parametrize("kind", MIXES)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("layout", [None, "rows", "sorted"])
@pytest.mark.parametrize("inplace", [False, True])
def test_lora_rows_matches_loop(kind, T, layout, inplace):
    A, B = stacks()
    rows = 6
    slots = mix(kind, rows)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, T, A.shape[2], generator=g)
    y = torch.randn(rows, T, B.shape[2], generator=g)
    want = ops.lora_rows_ref(x, A, B, slots, y=y)
    plan = ops.plan_rows(slots)
    y_in = y.clone()
    out = ops.lora_rows(x, A, B, plan, y=y_in, layout=layout, inplace=inplace)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    if not inplace:
        assert torch.equal(y_in, y)  # the caller's y is left alone
    x2 = x[:, 0]  # rows without a sequence axis (decode, classifier inputs)
    torch.testing.assert_close(ops.lora_rows(x2, A, B, plan, layout=layout), ops.lora_rows_ref(x2, A, B, slots),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MIXES)
def test_lora_rows_float64_fallback_is_exact_to_rounding(kind):
    A, B = stacks(torch.float64)
    slots = mix(kind, 6, seed=3)
    x = torch.randn(6, 3, A.shape[2], dtype=torch.float64)
    for layout in ("rows", "sorted"):
        torch.testing.assert_close(ops.lora_rows(x, A, B, ops.plan_rows(slots), layout=layout),
                                   ops.lora_rows_ref(x, A, B, slots))


@pytest.mark.parametrize("kind", MIXES)
@pytest.mark.parametrize("layout", [None, "rows", "sorted"])
def test_embedding_rows_matches_loop(kind, layout):
    A, B = stacks(n_in=32)
    At = A.transpose(1, 2).contiguous()
    slots = mix(kind, 5, seed=2)
    ids = torch.randint(0, 32, (5, 4))
    y = torch.randn(5, 4, B.shape[2])
    out = ops.embedding_rows(ids, At, B, ops.plan_rows(slots), y=y, layout=layout)
    torch.testing.assert_close(out, ops.embedding_rows_ref(ids, At, B, slots, y=y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["rows", "sorted"])
def test_lora_rows_gradients_match_loop(layout):
    A, B = stacks(torch.float64)
    slots = mix("base", 6, seed=5) + mix("zipf", 4, seed=6)
    x = torch.randn(10, 3, A.shape[2], dtype=torch.float64)
    w = torch.randn(10, 3, B.shape[2], dtype=torch.float64)
    grads = []
    for fast in (True, False):
        xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
        out = ops.lora_rows(xs, As, Bs, ops.plan_rows(slots), layout=layout) if fast else ops.lora_rows_ref(xs, As, Bs, slots)
        (out * w).sum().backward()
        grads.append((xs.grad, As.grad, Bs.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_plan_groups_sorted_chunks_pad_and_views():
    p = ops.plan_rows([2, 2, -1, 0, 0, 0])
    assert (p.adapter_rows, p.single, p.used) == (5, None, frozenset({0, 2}))
    assert ops.plan_rows([4] * 3).single == 4 and ops.plan_rows([-1, -1]).empty and ops.plan_rows([4, -1]).single is None
    g = p.groups(2, torch.device("cpu"), "sorted")  # slot 0 has 3 rows, slot 2 has 2: M = 3
    assert g.slots == [0, 2] and not g.consecutive
    assert g.src.tolist() == [6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 0, 1]  # slot 2's chunk padded with row 0
    assert g.keep.tolist() == list(range(10)) and g.dst.tolist() == [6, 7, 8, 9, 10, 11, 0, 1, 2, 3]
    skew = ops.plan_rows([0] * 9 + [1, 2, 3])  # padding every slot to 9 rows would be 36 for 12
    gs = skew.groups(1, torch.device("cpu"), "sorted")
    assert gs.slots == [0, 0, 0, 1, 2, 3] and gs.keep is not None and len(gs.src) == 6 * 3
    assert not gs.consecutive
    inplace = ops.plan_rows([3, 3, 4, 4, 5, 5]).groups(2, torch.device("cpu"), "sorted")
    assert inplace.src is None and inplace.slots == [3, 4, 5]  # in slot order already: no gather
    d = ops.plan_rows([5, 3, 4, 6]).groups(1, torch.device("cpu"), "sorted")
    assert d.slots == [3, 4, 5, 6] and d.consecutive and d.keep is None  # weights are a view of the stack
    W = torch.arange(8.0).view(8, 1, 1)
    assert d.take(W).data_ptr() == W[3].data_ptr()
    rows = ops.plan_rows([1, -1, 2]).groups(4, torch.device("cpu"), "rows")
    assert rows.src is None and rows.base.tolist() == [False, True, False]
    assert rows.take(W, mask=True).flatten().tolist() == [1.0, 0.0, 2.0]
    assert ops.plan_rows([1, 2]).layout(128, 16) == "rows" and ops.plan_rows([1, 2]).layout(1, 16) == "sorted"
    assert ops.plan_rows([1, -1, -1, 2]).layout(128, 16) == "sorted"  # rows would compute base rows


def test_dropout_rows():
    torch.manual_seed(0)
    x = torch.ones(3, 1000)
    out = ops.dropout_rows(x, [0.0, 0.5, 0.9])
    assert torch.equal(out[0], x[0])
    assert set(out[1].unique().tolist()) <= {0.0, 2.0} and 0.4 < (out[1] == 0).float().mean() < 0.6
    assert 0.85 < (out[2] == 0).float().mean() < 0.95


def test_rows_must_match_the_plan_and_empty_sequences_pass_through():
    A, B = stacks()
    plan = ops.plan_rows([1, 2, 3])
    with pytest.raises(ValueError, match="4 rows but the plan names 3"):
        ops.lora_rows(torch.randn(4, 2, A.shape[2]), A, B, plan)
    y = torch.randn(3, 0, B.shape[2])
    assert ops.lora_rows(torch.randn(3, 0, A.shape[2]), A, B, plan, y=y) is y
