"""Many adapters in one batch: row i of the batch uses adapter names[i] (None: the base)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from .adapters import _check_unmerged
from .errors import LoraError
from .layer import require_state


@contextmanager
def per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, row i of every batch uses adapter `names[i]` (None = base model).

    The base matmul runs once for the whole batch; each adapter's low-rank path runs on its rows.
    Every row equals the output of a run with that row's adapter alone.
    """
    state = require_state(model)
    names = list(names)
    for n in names:
        if n is not None and n not in state.configs:
            raise LoraError(f"per_row: no adapter named {n!r}; adapters: {list(state.configs)}")
    _check_unmerged(model, "use per_row")
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        if n is not None:
            groups.setdefault(n, []).append(i)
    prev = (state.rows, state.row_groups)
    state.rows = names
    state.row_groups = {n: torch.tensor(idx, dtype=torch.long) for n, idx in groups.items()}
    try:
        yield
    finally:
        state.rows, state.row_groups = prev
