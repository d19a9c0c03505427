"""The serving engine: one base model, many adapters, one worker thread that batches requests.

HTTP handlers (any thread) submit work items; the worker collects what arrives within a short
wait window, puts requests for different adapters in one batch (up to the bank's capacity of
distinct adapters) and runs it through the bank's mixed-batch path: the base runs once per
batch, each row's adapter through two batched matmuls per layer. Adapter loads and unloads are done by
the worker between batches, so a forward never sees the model change under it. A request pins
the exact adapter version it was admitted with: unloading or replacing an adapter never breaks a
request already admitted.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..bank import AdapterBank
from ..errors import LoraError
from ..io import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger("lorakit.serve")
Emit = Callable[[str, Any], None]  # (event, payload), thread-safe


class ServeError(LoraError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class GenRequest:
    key: str | None  # bank key of the pinned adapter (None: base)
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    emit: Emit = lambda e, p: None


@dataclass
class ClassifyRequest:
    key: str | None
    texts: list[str]
    emit: Emit = lambda e, p: None


@dataclass
class Control:
    fn: Callable[[], Any]
    emit: Emit


def _is_adapter_dir(p: Path) -> bool:
    return p.is_dir() and (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


def _adapter_tasks(root: Path | None) -> set[str]:
    """PEFT task_type of the adapters in `root` (a bare base model does not say what it serves)."""
    tasks: set[str] = set()
    if root is not None and root.is_dir():
        for sub in root.iterdir():
            if _is_adapter_dir(sub):
                try:
                    tasks.add(str(json.loads((sub / CONFIG_NAME).read_text()).get("task_type")))
                except (OSError, ValueError, AttributeError):
                    pass  # reported when it is registered
    return tasks


def _logits_layer(model: torch.nn.Module) -> str | None:
    """Path of the Linear that computes a classifier's logits: the last with num_labels outputs."""
    n = getattr(model.config, "num_labels", None)
    return next((p for p, m in reversed(list(model.named_modules()))
                 if isinstance(m, torch.nn.Linear) and m.out_features == n), None)


class Engine:
    """Loads the base once; serves the adapters of `adapters_dir` (each subfolder, by its name)."""

    def __init__(self, model: str, adapters_dir: str | Path | None = None, *, max_resident: int = 8,
                 max_batch: int = 32, wait_ms: float = 5.0, device: str = "cpu", dtype: str = "auto",
                 base_name: str | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        from ..models import model_path

        from transformers.utils import logging as hf_logging

        path = model_path(model)
        config = AutoConfig.from_pretrained(path)
        self.root = Path(adapters_dir).resolve() if adapters_dir else None
        archs = " ".join(getattr(config, "architectures", None) or [])
        # a bare encoder (e.g. minilm, a BertModel) served with classification adapters: their heads classify
        classify = "ForSequenceClassification" in archs or "SEQ_CLS" in _adapter_tasks(self.root)
        self.task = "classify" if classify else "generate"
        cls = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
        kw = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # a missing (fresh) head is reported below, by what it means here
        hf_logging.disable_progress_bar()
        try:
            self.model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        self.model = self.model.to(device).eval().requires_grad_(False)
        # a classifier whose head was freshly initialised answers only through adapters' own heads
        self.base_head = not (classify and info.get("missing_keys"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.device = torch.device(device)
        self.base_name = base_name or str(model)
        self.bank = AdapterBank(self.model, capacity=max_resident)
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self.context = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                        or min(getattr(self.tokenizer, "model_max_length", 2048), 1 << 20))
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._pos_ids = "position_ids" in params
        # the last position's logits only: a prompt's full logits are tokens x vocab per row
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # registry: public name -> bank key; pinned requests count per key; keys to drop when unpinned
        self._lock = threading.Lock()
        self._registry: dict[str, str] = {}
        self._labels: dict[str | None, list[str] | None] = {}  # bank key (None: base) -> its class names
        self._head = _logits_layer(self.model) if classify else None
        if classify:
            id2label = getattr(self.model.config, "id2label", None) or {}
            self._labels[None] = [str(id2label.get(i, f"LABEL_{i}")) for i in range(self.model.config.num_labels)]
        self._pending: Counter[str] = Counter()
        self._doomed: set[str] = set()
        self._gen = itertools.count()
        self.metrics: Counter[str] = Counter()
        self._q: queue.Queue = queue.Queue()
        self._backlog: deque = deque()
        if self.root is not None:
            if not self.root.is_dir():
                raise LoraError(f"adapters folder {self.root} does not exist")
            for sub in sorted(self.root.iterdir()):
                if _is_adapter_dir(sub):
                    try:
                        self._register(sub.name, sub)
                    except LoraError as e:
                        log.warning("skipping adapter %s: %s", sub.name, e)
        self._worker = threading.Thread(target=self._run, name="lorakit-serve-worker", daemon=True)
        self._worker.start()

    # ---- adapters ---------------------------------------------------------------------------
    def adapters(self) -> list[str]:
        with self._lock:
            return sorted(self._registry)

    def labels(self, model: str) -> list[str] | None:
        """The class names a classify request for `model` (an adapter or the base) answers with."""
        if model == self.base_name:
            return self._labels.get(None) if self.base_head else None
        with self._lock:
            key = self._registry.get(model)
            return self._labels.get(key) if key is not None else None

    def _register(self, name: str, path: Path) -> None:
        """Worker thread (or before it starts): check + register; the old version stays until unpinned."""
        from ..inject import check_adapter_name

        check_adapter_name(name)
        key = f"{name}#{next(self._gen)}"
        self.bank.add(key, path)  # all checks first: raises without touching the current version
        labels = self._adapter_labels(path) if self.task == "classify" else None
        with self._lock:
            self._labels[key] = labels
            old = self._registry.get(name)
            self._registry[name] = key
            if old is not None:
                self._doomed.add(old)
        self._purge()

    def resolve_path(self, path: str) -> Path:
        if self.root is None:
            raise ServeError("this server has no adapters folder (--adapters): it cannot load adapters", 400)
        p = Path(path)
        p = (p if p.is_absolute() else self.root / p).resolve()
        if p != self.root and self.root not in p.parents:
            raise ServeError(f"adapter path {path!r} is outside the adapters folder {self.root}", 400)
        if not _is_adapter_dir(p):
            raise ServeError(f"adapter path {path!r}: not an adapter folder ({CONFIG_NAME} + {WEIGHTS_NAME})", 400)
        return p

    def load_adapter(self, name: str, path: str, replace: bool = False) -> Control:
        from ..inject import check_adapter_name

        try:
            check_adapter_name(name)
        except LoraError as e:
            raise ServeError(str(e), 400) from None
        resolved = self.resolve_path(path)
        with self._lock:
            if name in self._registry and not replace:
                raise ServeError(f"adapter {name!r} is already loaded; pass \"replace\": true to swap it", 409)
        return Control(lambda: self._register(name, resolved), lambda e, p: None)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            key = self._registry.pop(name, None)
            if key is None:
                raise ServeError(f"no adapter named {name!r}", 404, "model_not_found")
            self._doomed.add(key)
        self.submit(Control(self._purge, lambda e, p: None))

    def _purge(self) -> None:
        with self._lock:
            gone = [k for k in self._doomed if self._pending[k] == 0]
            self._doomed.difference_update(gone)
        for k in gone:
            self._labels.pop(k, None)
            if k in self.bank:
                self.bank.remove(k)

    def _adapter_labels(self, path: Path) -> list[str] | None:
        """Class names for an adapter's rows. An adapter with its own head has its own label count
        (read from the file), named by the `labels` that `lorakit train` writes to metrics.json
        beside it, else LABEL_i; an adapter without a head answers with the base's labels."""
        from safetensors import safe_open

        from ..io import PREFIX

        if self._head is None:
            return None  # unknown logits layer: named by position, LABEL_i
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
            key = f"{PREFIX}{self._head}.weight"
            if key not in f.keys():
                return self._labels[None]
            width = f.get_slice(key).get_shape()[0]
        try:
            names = json.loads((path / "metrics.json").read_text()).get("labels")
        except (OSError, ValueError, AttributeError):
            names = None
        if isinstance(names, list) and len(names) == width and all(isinstance(n, str) for n in names):
            return names
        return [f"LABEL_{i}" for i in range(width)]

    def pin(self, model: str) -> str | None:
        """The bank key for a request's `model` (None: the base), pinned until release()."""
        if model == self.base_name:
            if not self.base_head:
                raise ServeError(f"the base {model!r} has no trained classification head (it was freshly "
                                 f"initialised): name an adapter, one of {self.adapters()}", 400)
            return None
        with self._lock:
            key = self._registry.get(model)
            if key is None:
                known = [self.base_name, *sorted(self._registry)]
                raise ServeError(f"model {model!r} does not exist; models: {known}", 404, "model_not_found")
            self._pending[key] += 1
            return key

    def release(self, key: str | None, n: int = 1) -> None:
        if key is None:
            return
        with self._lock:
            self._pending[key] -= n
            if self._pending[key] <= 0:
                del self._pending[key]

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, item: GenRequest | ClassifyRequest | Control) -> None:
        self._q.put(item)

    def check_length(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.context:
            raise ServeError(
                f"too many tokens: the prompt has {n_prompt} tokens and max_tokens is {max_tokens}, "
                f"but the model's context is {self.context}", 400, "context_length_exceeded")

    def close(self) -> None:
        self._q.put(None)
        self._worker.join(timeout=10)

    # ---- the worker -------------------------------------------------------------------------
    def _next(self, timeout: float | None):
        if self._backlog:
            return self._backlog.popleft()
        return self._q.get(timeout=timeout) if timeout is None or timeout > 0 else self._q.get_nowait()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            item = self._next(None)
            if item is None:
                return
            items, deadline = [item], time.monotonic() + self.wait
            while len(items) < self.max_batch:
                try:
                    more = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if more is None:
                    self._q.put(None)
                    break
                items.append(more)
            for c in [i for i in items if isinstance(i, Control)]:
                try:
                    c.emit("done", c.fn())
                except Exception as e:  # noqa: BLE001 - reported to the caller
                    c.emit("error", e)
            for kind in (GenRequest, ClassifyRequest):
                reqs = [i for i in items if isinstance(i, kind)]
                if reqs:
                    self._batch(reqs)
            self._purge()

    def _batch(self, reqs: list) -> None:
        """Take as many as fit the bank's capacity of distinct adapters; the rest wait."""
        cap = self.bank.capacity or len(reqs)
        keys: list[str] = []
        take, rest = [], []
        for r in reqs:
            if r.key is None or r.key in keys or len(keys) < cap:
                if r.key is not None and r.key not in keys:
                    keys.append(r.key)
                take.append(r)
            else:
                rest.append(r)
        self._backlog.extend(rest)
        try:
            if isinstance(take[0], GenRequest):
                self._generate(take)
            else:
                self._classify(take)
            self.metrics["batches"] += 1
            self.metrics["batch_rows"] += sum(getattr(r, "n", 1) if isinstance(r, GenRequest) else len(r.texts) for r in take)
        except Exception as e:  # noqa: BLE001 - every request of the batch gets the error
            log.exception("batch failed")
            for r in take:
                r.emit("error", e)
        finally:
            for r in take:
                self.release(r.key)

    def _classify(self, reqs: list[ClassifyRequest]) -> None:
        texts = [t for r in reqs for t in r.texts]
        names = [r.key for r in reqs for _ in r.texts]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.context, return_tensors="pt").to(self.device)
        with self.bank.rows(names):  # heads of different label counts: padded to the widest with -inf
            logits = self.model(**enc).logits.float().cpu()
        i = 0
        for r in reqs:
            labels = self._labels.get(r.key) or [f"LABEL_{j}" for j in range(logits.shape[-1])]
            probs = logits[i:i + len(r.texts), :len(labels)].softmax(-1)  # the request's own head
            r.emit("result", {"probs": probs.tolist(), "labels": labels,
                              "tokens": int(enc["attention_mask"][i:i + len(r.texts)].sum())})
            i += len(r.texts)

    def _generate(self, reqs: list[GenRequest]) -> None:
        rows = [(r, c) for r in reqs for c in range(r.n)]
        names = [r.key for r, _ in rows]
        B, L = len(rows), max(len(r.prompt_ids) for r, _ in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((B, L), pad, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for i, (r, _) in enumerate(rows):  # left padding: every row's next token is at the end
            ids[i, L - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, L - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator().manual_seed(r.seed + c) if r.seed is not None else None for r, c in rows]
        out_ids: list[list[int]] = [[] for _ in rows]
        sent = [""] * B
        done: list[str | None] = [None] * B
        steps = max(r.max_tokens for r, _ in rows)
        with self.bank.rows(names):
            kw = {"attention_mask": mask, "use_cache": True, **self._last_only}
            if self._pos_ids:
                kw["position_ids"] = pos
            out = self.model(input_ids=ids, **kw)
            for step in range(steps):
                nxt = self._choose(out.logits[:, -1].float(), rows, gens)
                for i, (r, c) in enumerate(rows):
                    if done[i]:
                        continue
                    tok = int(nxt[i])
                    text = sent[i]
                    if tok in self.eos:
                        done[i] = "stop"
                    else:
                        out_ids[i].append(tok)
                        text = self.tokenizer.decode(out_ids[i], skip_special_tokens=True)
                        cut = min((text.find(s) for s in r.stop if s and s in text), default=-1)
                        if cut >= 0:
                            text, done[i] = text[:cut], "stop"
                        elif len(out_ids[i]) >= r.max_tokens:
                            done[i] = "length"
                    # hold back a partial UTF-8 character until it completes (or the row ends)
                    if len(text) > len(sent[i]) and (done[i] or not text.endswith("\ufffd")):
                        r.emit("delta", (c, text[len(sent[i]):]))
                        sent[i] = text
                    if done[i]:
                        r.emit("finish", (c, done[i], len(out_ids[i])))
                        self.metrics["completion_tokens"] += len(out_ids[i])
                if all(done) or step == steps - 1:
                    break
                mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
                pos = pos[:, -1:] + 1
                kw = {"attention_mask": mask, "use_cache": True, self._cache_kw: out.past_key_values, **self._last_only}
                if self._pos_ids:
                    kw["position_ids"] = pos
                out = self.model(input_ids=nxt[:, None].to(self.device), **kw)
        for i, (r, c) in enumerate(rows):
            if not done[i]:
                r.emit("finish", (c, "length", len(out_ids[i])))
                self.metrics["completion_tokens"] += len(out_ids[i])

    @staticmethod
    def _choose(logits: torch.Tensor, rows: list, gens: list) -> torch.Tensor:
        nxt = logits.argmax(-1).cpu()
        for i, (r, _) in enumerate(rows):
            if r.temperature and r.temperature > 0:
                p = (logits[i] / r.temperature).softmax(-1).cpu()
                if r.top_p < 1.0:
                    sp, si = p.sort(descending=True)
                    keep = sp.cumsum(0) - sp < r.top_p
                    p = torch.zeros_like(p).scatter(0, si[keep], sp[keep])
                nxt[i] = torch.multinomial(p, 1, generator=gens[i])[0]
        return nxt
