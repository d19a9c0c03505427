"""Progress bars for long loops, when tqdm is installed (an optional dependency)."""

from __future__ import annotations

from typing import Any, Iterable


def progress_bar(items: Iterable[Any], desc: str, show: bool | None) -> Iterable[Any]:
    """`items` behind a tqdm bar when tqdm is installed; show=None: only on a terminal."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, disable=None if show is None else not show, leave=False)
