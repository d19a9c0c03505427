"""Patterns from adapter configs, matched in bounded time.

Patterns come from adapter configs, which are untrusted. Python's `re` backtracks without limit
while holding the GIL (one pattern froze a whole server), so every user pattern is matched with
the `regex` engine under a time budget (`match_budget`: one per user-facing operation), and its
size is capped before it is compiled. The language accepted is Python's `re` (what PEFT matches
with), less the few constructs `regex` reads differently.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import regex

from .errors import LoraError


def short(value: Any, limit: int = 200) -> str:
    """repr() cut to `limit` characters: a hostile 1 MB value must not become a 1 MB message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _fail(field_name: str, value: Any, why: str) -> None:
    raise LoraError(f"LoraConfig.{field_name}={short(value)}: {why}")


MATCH_BUDGET_S = 0.8  # matching time allowed to one user-facing operation (all its patterns and paths)
MAX_PATTERN_CHARS = 4096  # one pattern or module name
MAX_ENTRIES = 10_000  # entries of a list or dict field
MAX_EXPANSION = 100_000  # counted repeats multiplied out (regex expands `(a{1000}){1000}` at compile time)
_GIL_SLICE_S = 0.002  # a match first runs holding the GIL this long; a slower one goes on without it
RANK_TEMPLATE = r"(.*\.)?({})$"  # PEFT's rule for rank_pattern / alpha_pattern keys
LAYERS_TEMPLATE = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."  # PEFT's rule for layers_pattern
_budget = threading.local()


@contextmanager
def match_budget(seconds: float = MATCH_BUDGET_S, *, source: str | None = None) -> Iterator[None]:
    """Give every pattern match inside (this thread) one shared budget of matching time.

    Wrap a whole user-facing operation (find targets, inject, plan a load) so that many slowish
    matches cannot add up to a hang either; only time spent matching (and compiling) counts. Nested budgets join the outermost one. `source`
    (a file name) prefixes the error message. Outside any budget each match gets `seconds` alone.
    """
    if getattr(_budget, "left", None) is not None:
        yield
        return
    _budget.left, _budget.total, _budget.source = float(seconds), float(seconds), source
    try:
        yield
    finally:
        _budget.left = _budget.total = _budget.source = None


def _expansion(source: str) -> int:
    """Size of `source` with its counted repeats multiplied out (an upper bound: a bounded
    `{m,n}` counts n). Iterative: Python's parser already refuses nesting deep enough to matter."""
    try:
        from re import _parser as sre_parse  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse  # type: ignore[no-redef]
    repeats = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)}
    total, stack = 0, [(sre_parse.parse(source), 1)]
    while stack:
        node, factor = stack.pop()
        if isinstance(node, sre_parse.SubPattern):
            for op, av in node.data:
                total += factor
                if op in repeats:
                    lo, hi, sub = av
                    stack.append((sub, factor * max(1, hi if hi != sre_parse.MAXREPEAT else lo)))
                else:
                    stack.append((av, factor))
            if total > MAX_EXPANSION:
                return total
        elif isinstance(node, (list, tuple)):
            stack.extend((x, factor) for x in node)
    return total


_RE_REPEAT = re.compile(r"\{(?:\d+(?:,\d*)?|,\d*)\}")  # what Python's re reads as a {m,n} repeat


def _dialect_problem(source: str) -> str | None:
    """Where `regex` would read `source` otherwise than Python's re: a '{' that re takes as a
    literal (regex: fuzzy matching, `x{e<=1}`), a '[' inside a set (regex: a POSIX class or a
    nested set) or a doubled '-&~|' inside a set (regex: set operations)."""
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            j = i + 1
            j += source.startswith("^", j)
            j += source.startswith("]", j)
            while j < n and source[j] != "]":
                if source[j] == "\\":
                    j += 2
                    continue
                if source[j] == "[":
                    return f"'[' inside a character set at position {j} (escape it: '\\[')"
                if source[j] in "-&~|" and source.startswith(source[j] * 2, j):
                    return f"{source[j] * 2!r} inside a character set at position {j} (escape one of them)"
                j += 1
            i = j + 1
            continue
        if c == "{" and not _RE_REPEAT.match(source, i):
            return f"a literal '{{' at position {i} (escape it: '\\{{')"
        i += 1
    return None


@functools.lru_cache(maxsize=16384)
def _compiled(source: str) -> "regex.Pattern[str]":
    """Check `source` once and compile it for the `regex` engine (cached; raises on a bad one).

    Accepted: Python's `re` language (PEFT matches with `re`), less the few constructs `regex`
    reads differently, so a config means here what it means there; matched: with `regex`,
    which has a timeout and can drop the GIL."""
    re.compile(source)
    problem = _dialect_problem(source)
    if problem:
        raise re.error(f"ambiguous between regular-expression engines: {problem}")
    size = _expansion(source)
    if size > MAX_EXPANSION:
        raise ValueError(f"its counted repeats expand to {size:,}+ items (at most {MAX_EXPANSION:,})")
    return regex.compile(source)


def compile_pattern(field_name: str, shown: str, source: str) -> "regex.Pattern[str]":
    """`_compiled`, with a LoraError naming the field and the user's pattern."""
    if len(shown) > MAX_PATTERN_CHARS:
        _fail(field_name, shown, f"pattern of {len(shown):,} characters (at most {MAX_PATTERN_CHARS:,})")
    try:
        return _compiled(source)
    except (re.error, regex.error) as e:
        _fail(field_name, shown, f"not a valid regular expression ({e})")
    except RecursionError:
        _fail(field_name, shown, "not a valid regular expression (nested too deeply)")
    except (ValueError, OverflowError, MemoryError) as e:
        _fail(field_name, shown, f"pattern too large: {e}")
    raise AssertionError("unreachable")  # pragma: no cover


def match_pattern(field_name: str, shown: str, source: str, path: str, *,
                  full: bool = False) -> "regex.Match[str] | None":
    """`source` matched (full=False: at the start, like re.match) against `path`, charged to the
    current budget; out of time: a LoraError naming the field and pattern (`shown`)."""
    left = getattr(_budget, "left", None)
    total = _budget.total if left is not None else MATCH_BUDGET_S
    left = total if left is None else left
    t0 = time.perf_counter()
    try:
        if left <= 0:
            raise TimeoutError
        compiled = compile_pattern(field_name, shown, source)
        run = compiled.fullmatch if full else compiled.match
        try:
            return run(path, timeout=min(_GIL_SLICE_S, left))
        except TimeoutError:  # not an ordinary pattern: go on with the GIL released, other threads run
            rest = left - (time.perf_counter() - t0)
            if rest <= 0:
                raise
            return run(path, timeout=rest, concurrent=True)
    except TimeoutError:
        where = f"{_budget.source}: " if getattr(_budget, "source", None) else ""
        raise LoraError(
            f"{where}LoraConfig.{field_name}: pattern {short(shown)} took over {total:g} s to match module "
            f"paths (catastrophic backtracking, or too many patterns); use a simpler pattern, e.g. a list "
            "of module names") from None
    finally:
        if getattr(_budget, "left", None) is not None:
            _budget.left -= time.perf_counter() - t0


# ---- plain-name matching (PEFT's lists of module and parameter names) -------------------------
# Lists come from untrusted configs with up to MAX_ENTRIES names: every check below is set
# lookups, time bounded by the path's depth whatever the number of names (a regex or an
# `endswith` per name was 0.65 s a path with 10k names).
@functools.lru_cache(maxsize=64)
def name_set(names: tuple[str, ...]) -> frozenset[str]:
    """A list of names as a set, built once per list."""
    return frozenset(names)


def dotted_suffixes(key: str) -> list[str]:
    """key and each of its dotted suffixes: "a.b.c" -> ["a.b.c", "b.c", "c"]."""
    out, i = [key], key.find(".")
    while i != -1:
        out.append(key[i + 1:])
        i = key.find(".", i + 1)
    return out


def suffix_match(key: str, wanted: frozenset[str] | set[str]) -> bool:
    """PEFT's rule `key in names or key.endswith("." + name)`."""
    return any(s in wanted for s in dotted_suffixes(key))


def segment_run_match(path: str, wanted: frozenset[str] | set[str]) -> bool:
    """Whether a name equals a run of whole dotted segments of `path`: PEFT's modules_to_save
    rule, the regex `(^|.*\\.)name($|\\..*)`."""
    parts = path.split(".")
    return any(".".join(parts[i:j]) in wanted for i in range(len(parts)) for j in range(i + 1, len(parts) + 1))
