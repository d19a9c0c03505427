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
    raise ValueError(kind)


MIXES = ["one", "distinct", "uniform", "zipf", "skewed", "base", "sorted"]


def stacks(dtype=torch.float32, n_in=16, n_out=24, ranks=(4, 2, 8, 1, 8, 3, 4, 6), seed=0):
    """Slot stacks with mixed ranks, padded with zeros to the largest (as the bank stores them)."""
    g = torch.Generator().manual_seed(seed)
    r = max(ranks)
    A = torch.zeros(len(ranks), r, n_in, dtype=dtype)
    B = torch.zeros(len(ranks), n_out, r, dtype=dtype)
    for s, rk in enumerate(ranks):
        A[s, :rk] = torch.randn(rk, n_in, generator=g, dtype=dtype)
        B[s, :, :rk] = torch.randn(n_out, rk, generator=g, dtype=dtype)
    return A, B


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_matmul_matches_loop(dtype):
    g = torch.Generator().manual_seed(0)
    sizes = [3, 0, 5, 1, 0, 7]
    ends = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
    a = torch.randn(sum(sizes), 16, generator=g, dtype=dtype)
    b = torch.randn(len(sizes), 16, 8, generator=g, dtype=dtype)
    out = ops.grouped_matmul(a, b, ends, ends.tolist())
    torch.testing.assert_close(out, ops.grouped_matmul_ref(a, b, ends.tolist()))
    bt = torch.randn(len(sizes), 8, 16, generator=g, dtype=dtype).transpose(1, 2)  # strided weights
    torch.testing.assert_close(ops.grouped_matmul(a, bt, ends, ends.tolist()), ops.grouped_matmul_ref(a, bt, ends.tolist()))


@pytest.mark.parametrize("kind", MIXES)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("layout", [None, "runs", "sorted"])
def test_lora_rows_matches_loop(kind, T, layout):
    A, B = stacks()
    rows = 6
    slots = mix(kind, rows)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, T, A.shape[2], generator=g)
    y = torch.randn(rows, T, B.shape[1], generator=g)
    plan = ops.plan_rows(slots)
    out = ops.lora_rows(x, A, B, plan, y=y, layout=layout)
    torch.testing.assert_close(out, ops.lora_rows_ref(x, A, B, slots, y=y), atol=1e-5, rtol=1e-5)
    x2 = x[:, 0]  # rows without a sequence axis (decode, classifier inputs)
    torch.testing.assert_close(ops.lora_rows(x2, A, B, plan, layout=layout), ops.lora_rows_ref(x2, A, B, slots),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MIXES)
def test_lora_rows_float64_fallback_is_exact_to_rounding(kind):
    A, B = stacks(torch.float64)
    slots = mix(kind, 6, seed=3)
    x = torch.randn(6, 3, A.shape[2], dtype=torch.float64)
    torch.testing.assert_close(ops.lora_rows(x, A, B, ops.plan_rows(slots)), ops.lora_rows_ref(x, A, B, slots))


@pytest.mark.parametrize("kind", MIXES)
def test_embedding_rows_matches_loop(kind):
    A, B = stacks(n_in=32)
    At = A.transpose(1, 2).contiguous()
    slots = mix(kind, 5, seed=2)
    ids = torch.randint(0, 32, (5, 4))
    y = torch.randn(5, 4, B.shape[1])
    out = ops.embedding_rows(ids, At, B, ops.plan_rows(slots), y=y)
    torch.testing.assert_close(out, ops.embedding_rows_ref(ids, At, B, slots, y=y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["runs", "sorted"])
def test_lora_rows_gradients_match_loop(layout):
    A, B = stacks(torch.float64)
    slots = mix("base", 6, seed=5) + mix("zipf", 4, seed=6)
    x = torch.randn(10, 3, A.shape[2], dtype=torch.float64)
    w = torch.randn(10, 3, B.shape[1], dtype=torch.float64)
    grads = []
    for fast in (True, False):
        xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
        out = ops.lora_rows(xs, As, Bs, ops.plan_rows(slots), layout=layout) if fast else ops.lora_rows_ref(xs, As, Bs, slots)
        (out * w).sum().backward()
        grads.append((xs.grad, As.grad, Bs.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_plan_layout_choice_and_runs():
    p = ops.plan_rows([2, 2, -1, 0, 0, 0])
    assert p.runs == [(2, 0, 2), (-1, 2, 3), (0, 3, 6)]
    assert (p.lo, p.hi, p.adapter_rows, p.single) == (0, 2, 5, None)
    assert ops.plan_rows([4] * 3).single == 4 and ops.plan_rows([-1, -1]).empty
    tp = p.tokens(2, torch.device("cpu"))
    assert tp.order.tolist() == [6, 7, 8, 9, 10, 11, 0, 1, 2, 3]  # slot 0 rows first, then slot 2
    assert tp.sorted_ends_list == [6, 6, 10]


def test_dropout_rows():
    torch.manual_seed(0)
    x = torch.ones(3, 1000)
    out = ops.dropout_rows(x, [0.0, 0.5, 0.9])
    assert torch.equal(out[0], x[0])
    assert set(out[1].unique().tolist()) <= {0.0, 2.0} and 0.4 < (out[1] == 0).float().mean() < 0.6
    assert 0.85 < (out[2] == 0).float().mean() < 0.95
