"""An adapter bank: many adapters resident beside one base, ready for mixed batches.

For every wrapped layer the bank keeps stacked slots, A (S, r, in) and B transposed, Bt (S, r, out)
(embeddings: A transposed too, (S, vocab, r)), with each adapter's scaling folded into Bt and smaller ranks
padded with zeros to the layer's largest rank. `ops.lora_rows` reads the slots in place, so a batch
that mixes adapters costs two batched matmuls per layer instead of a loop over adapters.

Adapters are registered by name with a source: a PEFT folder on disk (read and checked when
registered; read again each time it is brought in, and refused if its bytes no longer hash to what
was checked), tensors held in CPU memory, or (for `per_row`) the model's own adapter. At most
`capacity` are resident; bringing in one more evicts the least recently used that the current batch
does not need. Slots are sized for the largest rank resident in each layer: evicting a large adapter
shrinks them again, so memory and step time return to what they were.

`per_row(model, names)` runs the model's own adapters per row through a bank of them kept beside
the model. Not thread-safe: call it from the thread that runs the model (the server has one worker
thread).
"""

from __future__ import annotations

import ctypes
import itertools
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from . import core
from .adapters import require_unmerged
from .batch import RowGroups, rows
from .config import LoraConfig
from .errors import LoraError
from .io import PREFIX, WEIGHTS_NAME, AdapterFiles, plan_adapter, read_adapter_files
from .layer import (LoraLayer, ModulesToSave, adapter_dtype, copy_with, lora_layers, require_adapter, require_state,
                    save_module, state_of, wrap)
from .variants import variant_for


@dataclass
class _Weights:
    lora: dict[LoraLayer, tuple[Tensor, Tensor, float]]  # layer -> (A r x in, B out x r, scaling)
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # modules_to_save path -> state dict


@dataclass
class _Stack:
    A: Tensor  # (S, r, in); embeddings (S, vocab, r)
    Bt: Tensor  # (S, r, out): B transposed, scaling folded in
    embedding: bool
    filled: set[int] = field(default_factory=set)  # slots holding a non-zero adapter here
    ranks: dict[int, int] = field(default_factory=dict)  # slot -> rank of the adapter in it

    @property
    def rank(self) -> int:
        return self.A.shape[2] if self.embedding else self.A.shape[1]

    def clear(self, slot: int) -> None:
        if slot in self.filled:
            self.A[slot].zero_()
            self.Bt[slot].zero_()
            self.filled.discard(slot)
            self.ranks.pop(slot, None)

    def cut(self, r: int) -> None:
        """Keep the first r rank columns (the others are zero in every slot): frees the memory
        and the step time a larger adapter left behind."""
        self.A = (self.A[:, :, :r] if self.embedding else self.A[:, :r]).clone()
        self.Bt = self.Bt[:, :r].clone()


class _ModelSource:
    """The model's own adapter `name` (its ParameterDicts); refreshed when its tensors change."""

    def __init__(self, name: str):
        self.name = name

    def fingerprint(self, tables: list[tuple[int, dict, dict, dict]]) -> tuple:
        """What changes when the adapter's tensors do (in-place updates bump `_version`).
        tables: `_model_tables(model)`, built once for all adapters of a batch."""
        n = self.name
        return tuple((lid, id(a), a._version, id(b), b._version, sc[n])
                     for lid, As, Bs, sc in tables if (a := As.get(n)) is not None and (b := Bs.get(n)) is not None)

    def fetch(self, model: nn.Module) -> _Weights:
        return _Weights({l: (l.lora_A[self.name].detach(), l.lora_B[self.name].detach(), l.scaling[self.name])
                         for _, l in lora_layers(model) if self.name in l.lora_A})


def _model_tables(model: nn.Module) -> list[tuple[int, dict, dict, dict]]:
    """(layer id, A params, B params, scalings) of every wrapped layer, as plain dicts by name."""
    return [(id(l), l.lora_A._parameters, l.lora_B._parameters, l.scaling) for _, l in lora_layers(model)]


@dataclass
class _Layout:
    """Where an adapter's tensors sit in its file and what they mean, worked out once when it was
    checked: a reload of the same bytes needs no pattern matching or planning again."""

    lora: dict[str, tuple[str, str, int, float]]  # module path -> (A's key, B's key, rank, scaling)
    saved: dict[str, dict[str, str]]  # modules_to_save path -> {state-dict key: file key}


class _FileSource:
    """A PEFT adapter folder (or its tensors kept in CPU memory), checked against the model.

    A folder is read once at registration (`io.read_adapter_files`: the bytes hashed are the bytes
    parsed) and, unless kept in memory, read again whenever it is brought into a slot: those bytes
    must hash to the registered digest, else the load is refused (AdapterChangedError) before they
    are parsed. What the bank serves is therefore always exactly what was checked.

    Building one checks the adapter against the model without changing the model (it reads the
    module tree only), so it may run on another thread than the model's (`AdapterBank.prepare`)."""

    def __init__(self, model: nn.Module, source: Any, keep_in_memory: bool, root: str | os.PathLike | None = None,
                 max_bytes: int | None = None):
        self.root, self.max_bytes = root, max_bytes
        if isinstance(source, tuple):
            self.path, self.digest, (config, tensors) = None, None, source
        else:
            files = source if isinstance(source, AdapterFiles) else read_adapter_files(
                source, root=root, max_bytes=max_bytes)
            self.path, self.digest, config, tensors = files.folder, files.digest, files.config, files.tensors
        self.config = config
        self.layout = self._check(model, config, tensors)  # raises before anything changes
        keep = keep_in_memory or self.path is None
        self.memory = tensors if keep else None  # else read again from disk when brought in

    def _check(self, model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor]) -> _Layout:
        where = str(self.path / WEIGHTS_NAME) if self.path else "adapter tensors"
        variant = variant_for(config)
        if not variant.batchable:
            raise LoraError(f"{where}: {variant.name} adapters cannot share stacked slots in a mixed batch; "
                            "merge it or serve it alone")
        plan = plan_adapter(model, config, tensors, where)
        if plan.biases:
            raise LoraError(f"{where}: the adapter trains biases {sorted(plan.biases)[:3]}, which change the "
                            "shared base; it cannot be served in a mixed batch")
        if plan.base_weights:
            raise LoraError(f"{where}: the adapter rewrites base weights (PiSSA/OLoRA residual); it cannot share a base")
        lora = {}
        # slots of a float16 model hold A and s * B in float16: what exceeds its range would be inf
        half = any(p.dtype == torch.float16 for p in model.parameters())
        bound = torch.finfo(torch.float16 if half else torch.float32).max  # beyond: inf (NaN fails too)
        for path, (A, B) in plan.lora.items():
            s = core.scaling(plan.alphas[path], A.shape[0], config.rslora)
            if not ((B.float() * s).abs() <= bound).all() or not (A.float().abs() <= bound).all():
                raise LoraError(f"{where}: {path}'s scaled update overflows (alpha {plan.alphas[path]}); "
                                "it would give infinite logits")
            lora[path] = (*plan.keys[path], A.shape[0], s)
        saved = {p: {k: f"{PREFIX}{p}.{k}" for k in sd} for p, sd in plan.saved.items()}
        return _Layout(lora, saved)

    def wrap(self, model: nn.Module) -> None:
        """Wrap the layers the adapter needs (the model's thread only; others are untouched)."""
        state = state_of(model, create=True)
        for path in self.layout.lora:
            wrap(model, path, state)
        for path in self.layout.saved:
            save_module(model, path, state)

    def fetch(self, model: nn.Module) -> _Weights:
        if self.memory is not None:
            tensors = self.memory
        else:
            tensors = read_adapter_files(self.path, root=self.root, max_bytes=self.max_bytes,
                                         expected_digest=self.digest).tensors
        self.wrap(model)
        lora = {}
        for path, (ka, kb, r, s) in self.layout.lora.items():
            B = tensors[kb]
            lora[model.get_submodule(path)] = (tensors[ka].reshape(r, -1), B.reshape(B.shape[0], r), s)
        saved = {p: {k: tensors[fk] for k, fk in keys.items()} for p, keys in self.layout.saved.items()}
        return _Weights(lora, saved)


class AdapterBank:
    """Stacked slots for up to `capacity` resident adapters of one model (None: no limit).

    bank = AdapterBank(model, capacity=8)
    bank.add("fr", "adapters/fr"); bank.add("de", "adapters/de")
    with bank.rows(["fr", None, "de", "fr"]):   # a different adapter per batch row
        logits = model(x).logits
    """

    def __init__(self, model: nn.Module, capacity: int | None = 8, dtype: torch.dtype | None = None):
        """dtype: the slots' dtype (default: what the adapters compute in, core.compute_dtype: a
        bf16 base's own, half the bytes a decode step with many adapters must read; float32
        adapters of a float32 model stay float32, so a mixed batch equals each adapter alone)."""
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise LoraError(f"AdapterBank capacity must be a positive int or None, got {capacity!r}")
        self.model = model
        self.capacity = capacity
        self.dtype = dtype
        self._sources: dict[str, _ModelSource | _FileSource] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recent first
        self._fingerprint: dict[str, tuple] = {}
        self._stacks: dict[LoraLayer, _Stack] = {}
        self._saved: dict[str, dict[str, nn.Module]] = {}  # name -> {modules_to_save path: module}
        self._n_slots = 1  # slots in every layer's stack: grown as adapters come in (up to capacity), cut again
        self.loads = self.evictions = self.hits = 0

    # ---- registry ---------------------------------------------------------------------------
    def add(self, name: str, source: Any = None, *, keep_in_memory: bool = False, replace: bool = False,
            root: str | os.PathLike | None = None, max_bytes: int | None = None) -> None:
        """Register adapter `name`: a PEFT folder, the `io.AdapterFiles` read from one, (config,
        tensors) in memory, what `prepare()` checked, or None for the model's own adapter of that
        name. A folder is fully checked now (keys, shapes, config) and read again when brought in
        (its bytes must hash as they did now), unless keep_in_memory. `root`: every file read must
        resolve inside it; `max_bytes`: the largest weights file read. With replace=True an
        existing adapter of that name is swapped out only once the new one passed every check."""
        if name in self._sources and not replace:
            raise LoraError(f"adapter {name!r} is already in the bank; pass replace=True or another name")
        if source is None:
            st = state_of(self.model)
            if st is None or name not in st.configs:
                raise LoraError(f"the model has no adapter {name!r}")
            variant = variant_for(st.configs[name])
            if not variant.batchable:
                raise LoraError(f"adapter {name!r}: {variant.name} adapters cannot share stacked slots in a mixed "
                                "batch; run it alone or merged")
            src: _ModelSource | _FileSource = _ModelSource(name)
        else:
            src = source if isinstance(source, _FileSource) else self.prepare(source, keep_in_memory=keep_in_memory,
                                                                               root=root, max_bytes=max_bytes)
            src.wrap(self.model)
        if name in self._sources:
            self.remove(name)
        self._sources[name] = src

    def prepare(self, source: Any, *, keep_in_memory: bool = False, root: str | os.PathLike | None = None,
                max_bytes: int | None = None) -> _FileSource:
        """Read and check an adapter against the model without changing anything: the slow,
        untrusted part of add(), which may run on another thread than the model's (the server's
        file threads). Pass the result to add()."""
        return _FileSource(self.model, source, keep_in_memory, root, max_bytes)

    def remove(self, name: str) -> None:
        """Forget adapter `name` (evicting it if resident)."""
        if name not in self._sources:
            raise LoraError(f"the bank has no adapter {name!r}; adapters: {list(self._sources)}")
        if name in self._resident:
            self.evict(name)
        del self._sources[name]

    def __contains__(self, name: object) -> bool:
        return name in self._sources

    def names(self) -> list[str]:
        return list(self._sources)

    def resident(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._resident)

    # ---- residency --------------------------------------------------------------------------
    def load(self, name: str) -> int:
        """Bring `name` into a slot (evicting the least recently used if full); returns its slot."""
        return self.ensure([name])[name]

    def evict(self, name: str, shrink: bool = True) -> None:
        """Drop `name` from its slot; shrink=False when the slot is refilled at once (ensure):
        resizing the stacks in between would reallocate them on every load of a full bank."""
        slot = self._resident.pop(name, None)
        if slot is None:
            return
        with torch.no_grad():
            for st in self._stacks.values():
                st.clear(slot)
        self._saved.pop(name, None)
        self._fingerprint.pop(name, None)
        self.evictions += 1
        if shrink:
            self._shrink()

    def _shrink(self) -> None:
        """Size every layer's slots for the largest rank still resident there (a layer no resident
        adapter touches drops its slots) and the stacks for the slots still in use, then hand
        freed memory back to the OS."""
        freed = 0
        need = max(max(self._resident.values(), default=0) + 1, 1)
        if need <= self._n_slots // 2:  # (halving, so a bank at its capacity does not churn)
            for st in self._stacks.values():
                freed += st.A[need:].nbytes + st.Bt[need:].nbytes
                st.A, st.Bt = st.A[:need].clone(), st.Bt[:need].clone()
            self._n_slots = need
        for layer in list(self._stacks):
            st = self._stacks[layer]
            need = max(st.ranks.values(), default=0)
            if need == st.rank:
                continue
            freed += st.A.nbytes + st.Bt.nbytes
            if need == 0:
                del self._stacks[layer]
            else:
                st.cut(need)
                freed -= st.A.nbytes + st.Bt.nbytes
        if freed >= 1 << 20:
            _trim_heap()

    def ensure(self, names: Sequence[str]) -> dict[str, int]:
        """Make every adapter in `names` resident; returns name -> slot."""
        wanted = list(dict.fromkeys(names))
        for n in wanted:
            if n not in self._sources:
                raise LoraError(f"the bank has no adapter {n!r}; adapters: {list(self._sources)}")
        if self.capacity is not None and len(wanted) > self.capacity:
            raise LoraError(f"the batch uses {len(wanted)} adapters but the bank holds at most {self.capacity}")
        keep = set(wanted)
        evicted = False
        cache: list = []

        def tables() -> list:  # one walk of the model per call, whatever the adapter count
            if not cache:
                cache.append(_model_tables(self.model))
            return cache[0]

        for n in wanted:
            src = self._sources[n]
            if n in self._resident:
                if isinstance(src, _ModelSource) and self._fingerprint.get(n) != src.fingerprint(tables()):
                    self._fill(self._resident[n], n)
                else:
                    self.hits += 1
                self._resident.move_to_end(n)
                continue
            used = set(self._resident.values())
            if self.capacity is not None and len(used) >= self.capacity:  # full: the least recently used goes
                victim = next(v for v in self._resident if v not in keep)
                slot = self._resident[victim]
                self.evict(victim, shrink=False)  # its slot is refilled below
                evicted = True
            else:
                slot = next(s for s in itertools.count() if s not in used)
            if slot >= self._n_slots:  # stacks hold as many slots as are in use (amortised doubling)
                top = self.capacity if self.capacity is not None else slot + 1 + self._n_slots
                self._grow(min(max(slot + 1, 2 * self._n_slots), top))
            self._resident[n] = slot
            try:
                self._fill(slot, n)
            except BaseException:
                self._resident.pop(n, None)
                raise
        if evicted:  # ranks the evicted adapters alone needed go now that the slots are refilled
            self._shrink()
        return {n: self._resident[n] for n in wanted}

    @torch.no_grad()
    def _fill(self, slot: int, name: str) -> None:
        src = self._sources[name]
        w = src.fetch(self.model)
        for st in self._stacks.values():
            st.clear(slot)
        for layer, (A, B, s) in w.lora.items():
            r = A.shape[0]
            st = self._stack(layer, r)
            if st.embedding:
                st.A[slot, :, :r].copy_(A.T)
            else:
                st.A[slot, :r].copy_(A)
            st.Bt[slot, :r].copy_(B.T.float() * s)  # scaled in float32, rounded once into the slot
            st.filled.add(slot)
            st.ranks[slot] = r
        self._saved[name] = {p: self._saved_copy(p, sd) for p, sd in w.saved.items()}
        if isinstance(src, _ModelSource):
            self._fingerprint[name] = src.fingerprint(_model_tables(self.model))
        self.loads += 1

    def _saved_copy(self, path: str, sd: dict[str, Tensor]) -> nn.Module:
        mod = self.model.get_submodule(path)
        original = mod.original_module if isinstance(mod, ModulesToSave) else mod
        return copy_with(original, sd).eval().requires_grad_(False)

    def _stack(self, layer: LoraLayer, r: int) -> _Stack:
        st = self._stacks.get(layer)
        if st is not None and st.rank >= r:
            return st
        w = layer.weight_tensor()
        dev = w.device
        dt = self.dtype or (w.dtype if w.dtype in core.LOW_PRECISION and layer.state.compute_dtype == "auto"
                            else adapter_dtype(w))
        emb = layer.kind.meets == "lookup"
        S, n_in, n_out = self._n_slots, layer.in_features, layer.out_features
        A = torch.zeros((S, n_in, r) if emb else (S, r, n_in), dtype=dt, device=dev)
        Bt = torch.zeros(S, r, n_out, dtype=dt, device=dev)
        new = _Stack(A, Bt, emb)
        if st is not None:  # a larger rank arrived: pad the old slots into the new stack
            old_r = st.rank
            (new.A[:, :, :old_r] if emb else new.A[:, :old_r]).copy_(st.A)
            new.Bt[:, :old_r].copy_(st.Bt)
            new.filled, new.ranks = st.filled, st.ranks
        self._stacks[layer] = new
        return new

    @torch.no_grad()
    def _grow(self, n: int) -> None:
        for layer, st in self._stacks.items():
            A = st.A.new_zeros((n, *st.A.shape[1:]))
            Bt = st.Bt.new_zeros((n, *st.Bt.shape[1:]))
            A[: st.A.shape[0]].copy_(st.A)
            Bt[: st.Bt.shape[0]].copy_(st.Bt)
            st.A, st.Bt = A, Bt
        self._n_slots = n

    # ---- what the forward reads -------------------------------------------------------------
    def stacks(self, layer: LoraLayer, plan) -> tuple[Tensor, Tensor] | None:
        """The layer's (A, Bt) slot stacks, or None if no adapter in `plan` touches this layer."""
        st = self._stacks.get(layer)
        if st is None or st.filled.isdisjoint(plan.used):
            return None
        return st.A, st.Bt

    def saved_module(self, mod: ModulesToSave, name: str) -> nn.Module | None:
        for path, m in self._saved.get(name, {}).items():
            if self.model.get_submodule(path) is mod:
                return m
        return None

    def sync_model(self, names: Sequence[str | None]) -> None:
        """For per_row: follow the model's own adapters (new ones registered, deleted ones dropped)."""
        st = state_of(self.model)
        configs = st.configs if st else {}
        for n in [n for n, s in self._sources.items() if isinstance(s, _ModelSource) and n not in configs]:
            self.remove(n)
        for n in names:
            if n is not None and n not in self._sources:
                self._sources[n] = _ModelSource(n)

    @contextmanager
    def rows(self, names: Sequence[str | None]) -> Iterator[None]:
        """Inside the block, row i of every batch uses the bank's adapter names[i] (None: base).
        Heads of different label counts are padded to the widest with -inf (as in `per_row`)."""
        names = list(names)
        require_unmerged(self.model, "run a mixed batch")
        state = state_of(self.model, create=True)
        groups = RowGroups(names, slots=self, keys=names, trainable=False, model_mode=False)
        groups.bank_plan()  # bring adapters in now, not inside the forward
        with rows(state, groups):
            yield

    def stats(self) -> dict[str, int]:
        return {"registered": len(self._sources), "resident": len(self._resident), "loads": self.loads,
                "evictions": self.evictions, "hits": self.hits}


def _model_bank(model: nn.Module) -> AdapterBank:
    """The bank of the model's own adapters that per_row reads at inference (kept beside it)."""
    bank = model.__dict__.get("_lorakit_bank")
    if bank is None:
        bank = model.__dict__["_lorakit_bank"] = AdapterBank(model, capacity=None)
    return bank


@contextmanager
def per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, row i of every batch uses adapter `names[i]` (None = base model).

    The base matmul runs once for the whole batch; the adapters' low-rank terms run as two batched
    matmuls per layer. Every row equals the output of a run with that row's adapter alone. Works
    under autograd (gradients reach each row's adapter); at inference the adapters are read from a
    stacked copy kept beside the model and refreshed whenever their tensors change.

    Adapters whose classification heads (modules_to_save) have different label counts mix too:
    the logits are padded to the widest head used with -inf, so row i's first n_labels logits are
    its adapter's own and softmax gives the padding probability 0 (see `batch.saved_forward`).
    """
    state = require_state(model)
    names = list(names)
    for n in names:
        if n is not None:
            require_adapter(state, n)
    require_unmerged(model, "use per_row")
    bank = _model_bank(model)
    bank.sync_model(names)
    used = set(n for n in names if n is not None)

    def trainable() -> bool:  # asked only by a forward with grad enabled
        return any(p.requires_grad for _, layer in lora_layers(model) for n in used if n in layer.lora_A
                   for p in (layer.lora_A[n], layer.lora_B[n]))
    groups = RowGroups(names, slots=bank, keys=names, trainable=trainable, model_mode=True)
    with rows(state, groups):
        yield


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps large freed blocks mapped otherwise, and the
    process would stay as large as the largest adapter ever loaded). A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


__all__ = ["AdapterBank", "per_row"]
