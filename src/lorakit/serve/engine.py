"""The serving engine: one base model, many adapters, one worker thread that batches requests.

HTTP handlers (any thread) submit work items; the worker collects what arrives within a short
wait window, puts requests for different adapters in one batch (up to the bank's capacity of
distinct adapters) and runs it through the bank's mixed-batch path: the base runs once per
batch, each row's adapter through two batched matmuls per layer. Generation is continuously
batched: requests that arrive while a batch decodes are prefilled and join it between two decode
steps, and finished rows leave at once. Adapter loads and unloads are done by the worker between
forwards, so a forward never sees the model change under it. A request pins
the exact adapter version it was admitted with: unloading or replacing an adapter never breaks a
request already admitted.

Off the happy path: a request whose client went away (`cancel`) leaves the batch at the next
step, its cache rows and columns cut and its adapter pin released; at most `max_queue` requests
wait (beyond: 429); a batch's adapters are brought into slots before it forms, so an adapter that
fails to load (its files changed on disk since they were checked, or went bad) fails only its own
requests; adapter files are read, hashed and checked off the worker, and the bytes checked are the
bytes served.
"""

from __future__ import annotations

import copy
import ctypes
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
from ..errors import AdapterChangedError, LoraError
from ..inject import check_adapter_name
from ..io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_adapter_files
from ..models import contiguous_head_input, model_path

log = logging.getLogger("lorakit.serve")
Emit = Callable[[str, Any], None]  # (event, payload), thread-safe


class ServeError(LoraError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class GenRequest:
    """One generation request (n choices of one prompt). Events to `emit`: ("prompt_logprobs",
    entries) once if prompt_logprobs; ("delta", (choice, text, entries or None)); ("finish",
    (choice, reason, tokens)); or ("error", exception). An entry is one token's {"id", "token",
    "logprob", "top": [(token, logprob), ...]} under the model's own distribution."""

    key: str | None  # bank key of the pinned adapter (None: base)
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    emit: Emit = lambda e, p: None
    logprobs: int | None = None  # alternatives per generated token to report (None: no logprobs)
    prompt_logprobs: bool = False  # report the prompt tokens' logprobs too (echo with logprobs)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    rows_left: int = field(default=0, init=False)  # choices still running (the worker's count)
    closed: bool = field(default=False, init=False)  # answered (or failed) and its pin released
    cancelled: bool = field(default=False, init=False)  # the client went away (set by any thread)

    @property
    def plain(self) -> bool:
        """Greedy with nothing to report or adjust: the batch's argmax is the answer."""
        return not (self.temperature and self.temperature > 0) and self.logprobs is None and not (
            self.logit_bias or self.presence_penalty or self.frequency_penalty)


@dataclass
class ClassifyRequest:
    key: str | None
    texts: list[str]
    emit: Emit = lambda e, p: None
    closed: bool = field(default=False, init=False)
    cancelled: bool = field(default=False, init=False)


@dataclass
class Control:
    fn: Callable[[], Any]
    emit: Emit


def _is_adapter_dir(p: Path) -> bool:
    return p.is_dir() and (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


def _adapter_tasks(root: Path | None) -> set[str]:
    """PEFT task_type of the adapters in `root` (a bare base model does not say what it serves).
    Read as the adapters themselves are: only folders and configs that resolve inside the root,
    configs of at most 1 MiB."""
    tasks: set[str] = set()
    if root is None or not root.is_dir():
        return tasks
    for sub in root.iterdir():
        try:
            cfg = (sub / CONFIG_NAME).resolve(strict=True)
            if not _is_adapter_dir(sub) or root not in cfg.parents or cfg.stat().st_size > 1 << 20:
                continue
            tasks.add(str(json.loads(cfg.read_bytes()).get("task_type")))
        except (OSError, ValueError, AttributeError, RuntimeError):
            pass  # reported when it is registered
    return tasks


def _eager_heap_release() -> None:
    """Serve large allocations (adapter files, slots, prefill activations) from their own memory
    maps: glibc otherwise raises its mmap threshold after the first large free and keeps later
    large blocks in its heap, so a process that loaded and deleted a big adapter stayed larger.
    A fixed 1 MiB threshold hands such memory back to the OS as soon as it is freed (Linux/glibc;
    a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _logits_layer(model: torch.nn.Module) -> str | None:
    """Path of the Linear that computes a classifier's logits: the last with num_labels outputs."""
    n = getattr(model.config, "num_labels", None)
    return next((p for p, m in reversed(list(model.named_modules()))
                 if isinstance(m, torch.nn.Linear) and m.out_features == n), None)


class Engine:
    """Loads the base once; serves the adapters of `adapters_dir` (each subfolder, by its name)."""

    def __init__(self, model: str, adapters_dir: str | Path | None = None, *, max_resident: int = 8,
                 max_batch: int = 32, wait_ms: float = 5.0, device: str = "cpu", dtype: str = "auto",
                 base_name: str | None = None, continuous: bool = True, max_queue: int = 256,
                 max_batch_tokens: int = 16384, max_adapter_bytes: int | None = 2 << 30):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        _eager_heap_release()
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
        contiguous_head_input(self.model)  # logits_to_keep slices the head's input: torch's slow path when frozen
        # a classifier whose head was freshly initialised answers only through adapters' own heads
        self.base_head = not (classify and info.get("missing_keys"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        # the worker's own copy: padding / truncation set the Rust tokenizer's state on every call,
        # which under the request threads' concurrent encodes raises "Already borrowed"
        self._batch_tok = copy.deepcopy(self.tokenizer)
        self.device = torch.device(device)
        self.base_name = base_name or str(model)
        self.bank = AdapterBank(self.model, capacity=max_resident)
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self.max_queue = max_queue  # requests waiting for a batch; beyond: 429
        self.max_batch_tokens = max_batch_tokens  # padded prompt tokens in one prefill (memory bound)
        self.max_adapter_bytes = max_adapter_bytes
        self.vocab = int(getattr(config, "vocab_size", 0) or len(self.tokenizer))
        decoder = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = "ByteLevel" in type(decoder).__name__ or "ByteLevel" in repr(decoder)
        self.continuous = continuous  # False: a generation batch runs to its end before others start
        self.context = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                        or min(getattr(self.tokenizer, "model_max_length", 2048), 1 << 20))
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._pos_ids = "position_ids" in params
        # rows join and leave a running batch only where positions are passed explicitly and every
        # layer attends to the whole cache (a sliding window reads cache indices, which padding moves)
        self._joinable = self._pos_ids and not (getattr(config, "sliding_window", None)
                                                and getattr(config, "use_sliding_window", None) is not False)
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
        self._loading: set[str] = set()  # names whose registration is under way (the 409 rule)
        self._gen = itertools.count()
        self.metrics: Counter[str] = Counter()
        self._q: queue.Queue = queue.Queue()
        self._backlog: deque = deque()
        self._running: _Running | None = None  # the generation batch in progress (worker thread only)
        if self.root is not None:
            if not self.root.is_dir():
                raise LoraError(f"adapters folder {self.root} does not exist")
            for sub in sorted(self.root.iterdir()):
                if _is_adapter_dir(sub):
                    try:
                        if sub.name == self.base_name:
                            raise LoraError("the folder has the base model's name")
                        self._register(sub.name, *self.check_adapter(sub))
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

    def _register(self, name: str, checked: Any, labels: list[str] | None) -> None:
        """Worker thread (or before it starts): register what check_adapter() read and checked
        (this only wraps the layers it needs); the old version stays until unpinned."""
        key = f"{name}#{next(self._gen)}"
        self.bank.add(key, checked)
        with self._lock:
            self._labels[key] = labels
            old = self._registry.get(name)
            self._registry[name] = key
            if old is not None:
                self._doomed.add(old)
        self._purge()

    def redact(self, message: str) -> str:
        """A message for a client: the adapters folder's place on the server's disk left out."""
        return message.replace(str(self.root), "<adapters>") if self.root is not None else message

    def check_name(self, name: str) -> None:
        try:
            check_adapter_name(name)
        except LoraError as e:
            raise ServeError(str(e), 400, "invalid_adapter_name") from None
        if name == self.base_name:
            raise ServeError(f"adapter name {name!r} is the base model's name", 400, "invalid_adapter_name")

    def resolve_path(self, path: str, max_chars: int = 4096) -> Path:
        """An adapter folder named by a client: inside the adapters root once symlinks are
        followed (the files in it are checked again when read). Call it off the event loop."""
        if self.root is None:
            raise ServeError("this server has no adapters folder (--adapters): it cannot load adapters", 400)
        if len(path) > max_chars or "\x00" in path:
            raise ServeError(f"adapter path: at most {max_chars} characters, no NUL bytes", 400)
        try:
            p = Path(path)
            p = (p if p.is_absolute() else self.root / p).resolve()
        except (OSError, ValueError, RuntimeError):  # symlink loops, names the OS refuses
            raise ServeError(f"adapter path {_short(path)}: cannot be resolved", 400) from None
        if p != self.root and self.root not in p.parents:
            raise ServeError(f"adapter path {_short(path)} is outside the adapters folder", 400)
        if not _is_adapter_dir(p):
            raise ServeError(f"adapter path {_short(path)}: not an adapter folder ({CONFIG_NAME} + {WEIGHTS_NAME})", 400)
        return p

    def check_adapter(self, folder: Path) -> tuple[Any, list[str] | None]:
        """Read and hash an adapter folder's files (confined to the root), check them against the
        model (keys, shapes, every pattern of its config, in bounded time) and read its class
        names: all of it on the calling thread, never the event loop or the worker, so a slow or
        hostile adapter never stalls generation. The model is only read here."""
        files = read_adapter_files(folder, root=self.root, max_bytes=self.max_adapter_bytes)
        labels = self._adapter_labels(files) if self.task == "classify" else None
        return self.bank.prepare(files, root=self.root, max_bytes=self.max_adapter_bytes), labels

    def load_adapter(self, name: str, path: str, replace: bool = False, timeout: float = 600.0) -> None:
        """Register adapter `name` from `path` (inside the adapters root); blocking, for a thread
        other than the event loop and the worker. The name is reserved at once, so of two
        concurrent loads of one new name exactly one succeeds (the other: 409)."""
        self.check_name(name)
        with self._lock:
            if name in self._loading:
                raise ServeError(f"adapter {name!r} is being loaded by another request", 409, "adapter_exists")
            if name in self._registry and not replace:
                raise ServeError(f"adapter {name!r} is already loaded; pass \"replace\": true to swap it", 409,
                                 "adapter_exists")
            self._loading.add(name)
        try:
            folder = self.resolve_path(path)
            try:
                checked, labels = self.check_adapter(folder)
            except LoraError as e:
                raise ServeError(f"adapter {name!r} was not loaded (any previous version keeps serving): "
                                 f"{self.redact(str(e))}", 400, "adapter_load_failed") from None
            done, result = threading.Event(), []

            def emit(event: str, payload: Any) -> None:
                result.append((event, payload))
                done.set()

            self.submit(Control(lambda: self._register(name, checked, labels), emit))
            if not done.wait(timeout):
                raise ServeError("the adapter load did not finish in time", 503, "timeout")
            event, payload = result[0]
            if event == "error":
                if isinstance(payload, ServeError):
                    raise payload
                if isinstance(payload, LoraError):
                    raise ServeError(f"adapter {name!r} was not loaded (any previous version keeps serving): "
                                     f"{self.redact(str(payload))}", 400, "adapter_load_failed")
                raise payload
        finally:
            with self._lock:
                self._loading.discard(name)

    def unload_adapter(self, name: str) -> None:
        if name == self.base_name:
            raise ServeError(f"{_short(name)} is the base model: it cannot be unloaded", 400, "invalid_request_error")
        with self._lock:
            key = self._registry.pop(name, None)
            if key is None:
                raise ServeError(f"adapter {_short(name)} is not loaded", 404, "model_not_found")
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

    def _adapter_labels(self, files: Any) -> list[str] | None:
        """Class names for an adapter's rows. An adapter with its own head has its own label count
        (read from the file), named by the `labels` that `lorakit train` writes to metrics.json
        beside it, else LABEL_i; an adapter without a head answers with the base's labels."""
        if self._head is None:
            return None  # unknown logits layer: named by position, LABEL_i
        head = files.tensors.get(f"{PREFIX}{self._head}.weight")
        if head is None:
            return self._labels[None]
        width = head.shape[0]
        names = None
        meta = files.folder / "metrics.json"
        try:  # optional; read only inside the root and when small
            real = meta.resolve(strict=True)
            if (self.root is None or self.root in real.parents) and real.stat().st_size < 1 << 20:
                names = json.loads(real.read_bytes()).get("labels")
        except (OSError, ValueError, AttributeError, RuntimeError):
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
                raise ServeError(f"model {_short(model)} does not exist; models: {known[:20]}", 404, "model_not_found")
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

    def rows_running(self) -> int:
        """Generation rows in the running batch (any thread; a snapshot)."""
        run = self._running
        return sum(1 for r in list(run.rows) if not r.done) if run is not None else 0

    def queue_depth(self) -> int:
        """Work items waiting for the worker (submitted, not yet in a batch)."""
        return self._q.qsize() + len(self._backlog)

    def enqueue(self, reqs: list[GenRequest | ClassifyRequest]) -> None:
        """Submit a request's items, or refuse them all with 429 when max_queue are waiting
        already (their pins are released)."""
        if len(reqs) > self.max_queue:  # would never fit, however long the client waits
            for r in reqs:
                self.release(r.key)
                r.closed = True
            raise ServeError(f"the request has {len(reqs)} prompts; this server queues at most {self.max_queue}", 400)
        if self.queue_depth() + len(reqs) > self.max_queue:
            for r in reqs:
                self.release(r.key)
                r.closed = True
            self.metrics["rejected"] += 1
            raise ServeError(f"the server is busy ({self.max_queue} requests waiting); retry shortly", 429,
                             "rate_limit_exceeded")
        for r in reqs:
            self.submit(r)

    def cancel(self, reqs: list[GenRequest | ClassifyRequest]) -> None:
        """The client went away: its requests leave the batch at the next step (any thread)."""
        for r in reqs:
            r.cancelled = True

    def check_length(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.context:
            raise ServeError(
                f"too many tokens: the prompt has {n_prompt} tokens and max_tokens is {max_tokens}, "
                f"but the model's context is {self.context}", 400, "context_length_exceeded")

    def close(self) -> None:
        self._q.put(None)
        self._worker.join(timeout=10)

    # ---- the worker -------------------------------------------------------------------------
    def _gather(self, idle: bool) -> list | None:
        """Controls and requests to handle now; None: shut down. Everything queued moves to the
        end of the backlog (controls run at once) and requests are taken from its front, so they
        are served in order. Idle: wait for work, then for what arrives within the wait window."""
        fresh: list = []
        stop = False

        def put(item) -> None:
            nonlocal stop
            if item is None:
                stop = True
            else:
                fresh.append(item)

        while not stop:
            try:
                put(self._q.get_nowait())
            except queue.Empty:
                break
        if idle and not stop and not fresh and not self._backlog:
            put(self._q.get())
            deadline = time.monotonic() + self.wait  # the window opens with the first item
            while not stop and (left := deadline - time.monotonic()) > 0:
                try:
                    put(self._q.get(timeout=left))
                except queue.Empty:
                    break
        controls = [i for i in fresh if isinstance(i, Control)]
        self._backlog.extend(i for i in fresh if not isinstance(i, Control))
        if stop:
            self._shutdown(controls)
            return None
        return controls + [self._backlog.popleft() for _ in range(min(self.max_batch, len(self._backlog)))]

    def _defer(self, reqs: list) -> None:
        """Requests that could not be taken go back to the front of the backlog, in order."""
        self._backlog.extendleft(reversed(reqs))

    def _reap(self, items: list) -> list:
        """Drop what was cancelled: waiting requests, running rows (their cache rows and columns
        are cut), and `items` just gathered. Returns the items still wanted."""
        if any(r.cancelled for r in self._backlog):
            keep = [r for r in self._backlog if not r.cancelled]
            for r in self._backlog:
                if r.cancelled:
                    self._drop(r)
            self._backlog.clear()
            self._backlog.extend(keep)
        run = self._running
        if run is not None:
            gone = [row for row in run.rows if not row.done and (row.req.cancelled or row.req.closed)]
            for row in gone:
                row.done = "cancelled"
                self._drop(row.req)
            if gone:
                run.compact(self)
                if all(r.done for r in run.rows):
                    self._running = None
        out = []
        for i in items:
            if getattr(i, "cancelled", False):
                self._drop(i)
            else:
                out.append(i)
        return out

    def _drop(self, req: GenRequest | ClassifyRequest) -> None:
        """A cancelled request leaves: counted once, pin released, no more events."""
        if not req.closed:
            self.metrics["cancelled"] += 1
            self._close(req)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            items = self._gather(idle=self._running is None)
            if items is None:
                return
            try:
                items = self._reap(items)
                for c in [i for i in items if isinstance(i, Control)]:
                    try:
                        _emit(c, "done", c.fn())
                    except Exception as e:  # noqa: BLE001 - reported to the caller
                        _emit(c, "error", e)
                classify = [i for i in items if isinstance(i, ClassifyRequest)]
                if classify:
                    self._batch(classify)
                gen = [i for i in items if isinstance(i, GenRequest)]
                if gen:
                    self._admit(gen)
                if self._running is not None:
                    self._guarded(None, self._decode_step)
                self._purge()
            except Exception as e:  # noqa: BLE001 - the worker must outlive any one item
                log.exception("worker error")
                waiting = {id(r) for r in self._backlog}
                for r in items:
                    if not isinstance(r, Control) and id(r) not in waiting and not getattr(r, "rows_left", 0):
                        self._fail(r, e)

    def _shutdown(self, controls: list[Control]) -> None:
        """Stopping: every request still here gets an error and its pin back."""
        err = ServeError("the server is shutting down", 503, "server_shutting_down")
        for c in controls:
            _emit(c, "error", err)
        reqs = list(self._backlog) + ([r.req for r in self._running.rows] if self._running else [])
        self._backlog.clear()
        self._running = None
        for r in reqs:
            self._fail(r, err)

    def _close(self, req: GenRequest | ClassifyRequest) -> None:
        """req is answered: its adapter pin goes back (once)."""
        if not req.closed:
            req.closed = True
            self.release(req.key)

    def _fail(self, req: GenRequest | ClassifyRequest, e: Exception) -> None:
        """req gets the error (once) and leaves; its running rows are dropped at the next step."""
        if not req.closed:
            _emit(req, "error", e)
            self._close(req)

    def _batch(self, reqs: list[ClassifyRequest]) -> None:
        """Take as many as fit the bank's capacity of distinct adapters; the rest wait."""
        take, rest = self._fit(reqs, set(), 0)
        self._defer(rest)
        take = self._preload(take, set())
        if not take:
            return
        try:
            self._classify(take)
            self.metrics["batches"] += 1
            self.metrics["batch_rows"] += sum(len(r.texts) for r in take)
        except Exception as e:  # noqa: BLE001 - every request of the batch gets the error
            log.exception("batch failed")
            for r in take:
                self._fail(r, e)
        finally:
            for r in take:
                self._close(r)

    def _fit(self, reqs: list, keys: set, rows: int) -> tuple[list, list]:
        """The requests that join a batch already holding adapters `keys` and `rows` rows: at most
        the bank's capacity of distinct adapters, max_batch rows, and max_batch_tokens padded
        prompt tokens in the new prefill (one request always fits an empty batch); the others
        wait, in order."""
        cap = self.bank.capacity or len(reqs) + len(keys)
        keys, take, rest = set(keys), [], []
        new_rows, width = 0, 0
        for r in reqs:
            n = r.n if isinstance(r, GenRequest) else len(r.texts)
            length = len(r.prompt_ids) if isinstance(r, GenRequest) else 0
            new_key = r.key is not None and r.key not in keys
            too_long = new_rows and (new_rows + n) * max(width, length) > self.max_batch_tokens
            if rest or (new_key and len(keys) >= cap) or (rows and rows + n > self.max_batch) or too_long:
                rest.append(r)
                continue
            if new_key:
                keys.add(r.key)
            take.append(r)
            rows += n
            new_rows, width = new_rows + n, max(width, length)
        return take, rest

    def _preload(self, reqs: list, keep: set) -> list:
        """Bring each new adapter of `reqs` into a slot before the batch forms (keeping `keep`,
        the running batch's). An adapter that fails to load fails its own requests only."""
        keep = {k for k in keep if k is not None}
        failed: dict[str, ServeError] = {}
        ok = []
        for r in reqs:
            k = r.key
            if k is not None and k not in keep and k not in failed:
                try:
                    self.bank.ensure([*keep, k])
                    keep.add(k)
                except Exception as e:  # noqa: BLE001 - this adapter's requests get the error
                    failed[k] = self._load_error(k, e)
            if k in failed:
                self._fail(r, failed[k])
            else:
                ok.append(r)
        return ok

    def _load_error(self, key: str, e: Exception) -> ServeError:
        name = key.rsplit("#", 1)[0]
        self.metrics["adapter_load_failures"] += 1
        if isinstance(e, AdapterChangedError):
            self.metrics["adapter_integrity_failures"] += 1
            log.warning("adapter %s refused: %s", name, e)
            why = "its files changed on disk since they were checked; the server refuses it until it is replaced"
        else:
            log.warning("adapter %s could not be brought into a slot: %s", name, e)
            why = "it could not be loaded (see the server log)"
        return ServeError(f"adapter {name!r} is unavailable: {why}", 503, "adapter_unavailable")

    def _classify(self, reqs: list[ClassifyRequest]) -> None:
        texts = [t for r in reqs for t in r.texts]
        names = [r.key for r in reqs for _ in r.texts]
        enc = self._batch_tok(texts, padding=True, truncation=True, max_length=self.context, return_tensors="pt").to(self.device)
        with self.bank.rows(names):  # heads of different label counts: padded to the widest with -inf
            logits = self.model(**enc).logits.float().cpu()
        i = 0
        for r in reqs:
            labels = self._labels.get(r.key) or [f"LABEL_{j}" for j in range(logits.shape[-1])]
            probs = logits[i:i + len(r.texts), :len(labels)].softmax(-1)  # the request's own head
            _emit(r, "result", {"probs": probs.tolist(), "labels": labels,
                                "tokens": int(enc["attention_mask"][i:i + len(r.texts)].sum())})
            i += len(r.texts)

    # ---- generation: continuous batching ------------------------------------------------------
    # The worker keeps one running batch. New requests are prefilled on their own (a mixed batch of
    # their adapters) and their rows join the running batch between two decode steps: its KV cache,
    # attention mask and positions are left-padded to a common length. Finished rows leave at once,
    # so a short request never waits for a long one. Caches that cannot be joined (other than
    # transformers' DynamicCache of full-attention layers), models that take no position_ids and
    # sliding-window models run one batch at a time instead.
    def _admit(self, reqs: list[GenRequest]) -> None:
        run = self._running
        if run is not None and (not self.continuous or self._editable(run) is None):  # wait for it to end
            self._defer(reqs)
            return
        live = [r for r in run.rows if not r.done] if run else []
        take, rest = self._fit(reqs, {r.req.key for r in live}, len(live))
        self._defer(rest)
        take = self._preload(take, {r.req.key for r in live})
        for r in [r for r in take if r.prompt_logprobs]:  # echo with logprobs: the prompt scored first
            self._guarded([r], lambda r=r: self._score(r))
        for r in [r for r in take if r.max_tokens <= 0 and not r.closed]:  # nothing to generate
            for c in range(r.n):
                _emit(r, "finish", (c, "length", 0))
            self._close(r)
        take = [r for r in take if r.max_tokens > 0 and not r.closed]
        if take:
            self._guarded(take, lambda: self._prefill(take))

    def _guarded(self, reqs: list[GenRequest] | None, fn: Callable[[], None]) -> None:
        """Run fn; if it fails, the requests `reqs` (None: those of the running batch, which then
        ends) get the error and leave. A failed prefill leaves the running batch intact."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every request of the batch gets the error
            log.exception("generation failed")
            if reqs is None:
                reqs = [r.req for r in self._running.rows] if self._running is not None else []
                self._running = None
            for req in reqs:
                self._fail(req, e)

    def _prefill(self, reqs: list[GenRequest]) -> None:
        rows = [_Row(r, c, torch.Generator().manual_seed((r.seed + c) % 2**64) if r.seed is not None else None)
                for r in reqs for c in range(r.n)]
        for r in reqs:
            r.rows_left = r.n
        B, L = len(rows), max(len(r.req.prompt_ids) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((B, L), pad, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's next token is at the end
            ids[i, L - len(r.req.prompt_ids):] = torch.tensor(r.req.prompt_ids)
            mask[i, L - len(r.req.prompt_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, logits, _ = self._forward(ids, mask, pos, rows)
        self.metrics["batches"] += 1
        self.metrics["batch_rows"] += B
        new = _Running(rows, cache, mask, pos[:, -1:] + 1, self._choose(logits, rows))
        new.settle(self)
        if all(r.done for r in new.rows):
            return
        if self._running is None:
            self._running = new
        else:
            self._running = self._running.join(new)
            self.metrics["rows_joined"] += len(new.rows)

    def _score(self, req: GenRequest) -> None:
        """The prompt's own token logprobs (echo with logprobs), in a forward of that prompt alone
        with every position's logits: one prompt's tokens x vocab at a time (the app caps it),
        whatever its n or the batch it joins."""
        ids = torch.tensor([req.prompt_ids])
        mask = torch.ones_like(ids)
        _, _, every = self._forward(ids, mask, torch.arange(ids.shape[1])[None], [_Row(req, 0, None)], full=True,
                                    cache=False)
        _emit(req, "prompt_logprobs", self._prompt_logprobs(every[0], req))

    def _decode_step(self) -> None:
        run = self._running
        mask = torch.cat([run.mask, run.mask.new_ones(len(run.rows), 1)], 1)
        run.cache, logits, _ = self._forward(run.nxt[:, None], mask, run.pos, run.rows, run.cache)
        run.mask, run.pos, run.nxt = mask, run.pos + 1, self._choose(logits, run.rows)
        run.settle(self)
        if all(r.done for r in run.rows):
            self._running = None

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, rows: list[_Row],
                 cache: Any = None, full: bool = False) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
        """One forward of the rows' tokens (each row through its own adapter): the KV cache, the
        last position's logits (B, vocab) and, with `full`, every position's (B, L, vocab).
        cache: the running cache, None (start one) or False (no cache: scoring only)."""
        kw = {"attention_mask": mask.to(self.device), "use_cache": cache is not False,
              **({} if full else self._last_only)}
        if cache is not None and cache is not False:
            kw[self._cache_kw] = cache
        if self._pos_ids:
            kw["position_ids"] = pos.to(self.device)
        with self.bank.rows([None if r.done else r.req.key for r in rows]):  # (a finished row's adapter may be gone)
            out = self.model(input_ids=ids.to(self.device), **kw)
        return _cache_of(out), out.logits[:, -1].float(), out.logits if full else None

    def _prompt_logprobs(self, logits: torch.Tensor, req: GenRequest) -> list[dict]:
        """Entries for the prompt's tokens (the first has no logprob: nothing comes before it),
        from this row's logits over the whole left-padded sequence (L, vocab)."""
        ids = req.prompt_ids
        n = len(ids)
        lp = logits[-n:].float().log_softmax(-1)  # position j predicts token j + 1
        out = [{"id": ids[0], "token": self.tokenizer.decode([ids[0]]), "logprob": None, "top": []}]
        for j in range(1, n):
            out.append(self._entry(ids[j], lp[j - 1], req.logprobs or 0))
        return out

    def _entry(self, tok: int, logp: torch.Tensor, k: int) -> dict:
        """One token's logprob and the k most likely tokens at that step, with their bytes."""
        top = []
        if k:
            vals, idx = logp.topk(min(k, logp.shape[-1]))
            top = [(self.tokenizer.decode([int(i)]), float(v), self.token_bytes(int(i)))
                   for v, i in zip(vals.tolist(), idx.tolist())]
        return {"id": int(tok), "token": self.tokenizer.decode([int(tok)]), "logprob": float(logp[tok]), "top": top,
                "bytes": self.token_bytes(int(tok))}

    def token_bytes(self, tok: int) -> list[int]:
        """The bytes a token stands for (OpenAI's `bytes`): a token that is part of a UTF-8
        character decodes alone to U+FFFD, so the bytes come from the vocabulary itself where it
        says them (byte-level BPE, SentencePiece byte tokens), else from the decoded text."""
        piece = self.tokenizer.convert_ids_to_tokens(tok)
        if isinstance(piece, str):
            if self._byte_level and all(c in _BYTE_OF for c in piece):
                return [_BYTE_OF[c] for c in piece]
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return [int(piece[3:5], 16)]
                except ValueError:
                    pass
        return list(self.tokenizer.decode([tok]).encode())

    def _editable(self, run: _Running) -> list | None:
        """The running batch's cache as [keys, values] per layer when rows may join and leave it."""
        return run.kv() if self._joinable else None

    def _emit_token(self, r: _Row, tok: int) -> None:
        """Take row r's next token: stream the new text, finish the row on EOS, a stop string or max_tokens."""
        req, text = r.req, r.sent
        if req.cancelled:  # its client went away: the row leaves (counted, pin released, once)
            r.done = "cancelled"
            self._drop(req)
            return
        if req.closed:  # the request failed: the row leaves
            r.done = "error"
            return
        entries, r.pending = r.pending, []
        if req.max_tokens <= 0:  # the prompt was scored (echo with logprobs): nothing is generated
            r.done, entries = "length", []
        elif tok in self.eos:
            r.done = "stop"
            entries = entries[:-1]  # the end-of-sequence token is not part of the answer
            text = self.tokenizer.decode(r.out_ids, skip_special_tokens=True) if r.out_ids else ""
        else:
            if entries and entries[-1]["id"] == tok:
                entries[-1]["offset"] = r.text_len  # where the token's text starts in the answer
            r.out_ids.append(tok)
            text = self.tokenizer.decode(r.out_ids, skip_special_tokens=True)
            r.text_len = len(text)
            cut = min((text.find(s) for s in req.stop if s and s in text), default=-1)
            if cut >= 0:
                text, r.done = text[:cut], "stop"
            elif len(r.out_ids) >= req.max_tokens:
                r.done = "length"
        # hold back a partial UTF-8 character until it completes, and a tail that may be the start
        # of a stop string until it is known not to be (text once sent cannot be taken back)
        upto = len(text)
        if not r.done:
            upto = len(r.sent) if text.endswith("\ufffd") else upto - _stop_prefix(text, req.stop)
        if upto > len(r.sent) or (r.done and entries):
            _emit(req, "delta", (r.choice, text[len(r.sent):upto], entries or None))
            r.sent = text[:upto]
        else:
            r.pending = entries  # reported with the text they belong to
        if r.done:
            _emit(req, "finish", (r.choice, r.done, len(r.out_ids)))
            self.metrics["completion_tokens"] += len(r.out_ids)
            req.rows_left -= 1
            if req.rows_left == 0:
                self._close(req)

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Each row's next token: greedy, or sampled with its request's temperature and top_p,
        after its logit_bias and penalties; with logprobs, the token's entry is kept on the row."""
        nxt = logits.argmax(-1).cpu()
        for i, row in enumerate(rows):
            r = row.req
            if row.done or r.closed or r.cancelled or r.plain or r.max_tokens <= 0:
                continue
            try:
                nxt[i] = self._pick(logits[i], row)
            except Exception as e:  # noqa: BLE001 - one request's sampling never fails the batch
                log.warning("sampling failed for one request: %s", e)
                self._fail(r, ServeError("the model gave no usable next-token distribution for this request", 500,
                                         "sampling_failed"))
        return nxt

    def _pick(self, logits: torch.Tensor, row: _Row) -> int:
        """One row's token. Numerically safe for every accepted temperature (down to the smallest
        float) and top_p: the logits are shifted by their maximum and divided in float64 (a float32
        temperature of 1e-300 would be 0), so the largest is 0 and the rest at most 0 (a tiny
        temperature gives -inf, i.e. greedy)."""
        r = row.req
        l = logits.float().cpu()
        if not torch.isfinite(l).all():
            l = torch.nan_to_num(l, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
            if not torch.isfinite(l).any():
                raise ValueError("no finite logit")
        raw = l.log_softmax(-1) if r.logprobs is not None else None
        if r.logit_bias:
            ids = torch.tensor(list(r.logit_bias), dtype=torch.long)
            l = l.index_add(0, ids, torch.tensor(list(r.logit_bias.values()), dtype=l.dtype))
        if (r.presence_penalty or r.frequency_penalty) and row.out_ids:
            counts = torch.bincount(torch.tensor(row.out_ids), minlength=l.shape[0])[: l.shape[0]].to(l.dtype)
            l = l - r.frequency_penalty * counts - r.presence_penalty * (counts > 0).to(l.dtype)
        if r.temperature and r.temperature > 0:
            p = ((l - l.max()).double() / r.temperature).softmax(-1)
            if r.top_p < 1.0:
                sp, si = p.sort(descending=True)
                keep = sp.cumsum(0) - sp < r.top_p
                p = torch.zeros_like(p).scatter(0, si[keep], sp[keep])
            tok = int(torch.multinomial(p, 1, generator=row.gen)[0])
        else:
            tok = int(l.argmax())
        if raw is not None:
            row.pending.append(self._entry(tok, raw, r.logprobs))
        return tok


@dataclass
class _Row:
    """One choice of one generation request, while it runs."""

    req: GenRequest
    choice: int
    gen: torch.Generator | None  # sampling generator (seeded requests), else None
    out_ids: list[int] = field(default_factory=list)
    sent: str = ""  # text streamed so far
    done: str | None = None  # finish reason
    pending: list[dict] = field(default_factory=list)  # logprob entries not yet sent with their text
    text_len: int = 0  # characters of the answer decoded so far


@dataclass
class _Running:
    """The running generation batch: its rows, their KV cache, attention mask (B, cache length),
    the position of each row's next token (B, 1) and that token (B,), chosen but not yet fed."""

    rows: list[_Row]
    cache: Any
    mask: torch.Tensor
    pos: torch.Tensor
    nxt: torch.Tensor

    def settle(self, engine: Engine) -> None:
        """Hand each running row its chosen token. Finished rows leave the batch, and the cache
        columns no row attends to any more are cut; a cache this cannot edit keeps finished rows
        (fed, never read) until the whole batch ends."""
        for r, tok in zip(self.rows, self.nxt.tolist()):
            if not r.done:
                engine._emit_token(r, tok)
        self.compact(engine)

    def compact(self, engine: Engine) -> None:
        """Cut finished rows out of the batch, and the cache columns no row attends to any more."""
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        kv = engine._editable(self)
        if not keep or len(keep) == len(self.rows) or kv is None:
            return
        idx = torch.tensor(keep)
        mask = self.mask[idx]
        start = int(mask.any(0).long().argmax())  # first column some row still attends to
        dev_idx = idx.to(kv[0][0].device)
        self.kv([[t.index_select(0, dev_idx)[:, :, start:] for t in pair] for pair in kv])
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.pos, self.nxt = mask[:, start:], self.pos[idx], self.nxt[idx]

    def join(self, other: _Running) -> _Running:
        """This batch and `other` as one: both left-padded to the longer cache."""
        L = max(self.mask.shape[1], other.mask.shape[1])
        a, b = self.kv(), other.kv()
        if a is None or b is None or len(a) != len(b) or any(r.done for r in self.rows + other.rows):
            raise LoraError("this model's KV cache cannot take new rows")
        kv = [[torch.cat([_pad_seq(ta, L), _pad_seq(tb, L)], 0) for ta, tb in zip(pa, pb)] for pa, pb in zip(a, b)]
        mask = torch.cat([_pad_seq(self.mask, L, dim=1), _pad_seq(other.mask, L, dim=1)], 0)
        self.kv(kv)  # everything built before anything changes
        self.mask, self.pos = mask, torch.cat([self.pos, other.pos], 0)
        self.nxt, self.rows = torch.cat([self.nxt, other.nxt], 0), self.rows + other.rows
        return self

    def kv(self, new: list | None = None) -> list | None:
        """The cache's [keys, values] per layer (each (B, heads, length, dim)); with `new`, store
        those. None for caches this cannot edit (sliding windows, recurrent states, other classes)."""
        c = self.cache
        layers = getattr(c, "layers", None)
        if layers is not None:  # transformers >= 4.56
            if not all(type(l).__name__ == "DynamicLayer" and getattr(l, "is_initialized", True) for l in layers):
                return None
            if new is None:
                return [[l.keys, l.values] for l in layers]
            for l, (k, v) in zip(layers, new):
                l.keys, l.values = k, v
            return new
        if type(c).__name__ == "DynamicCache" and hasattr(c, "key_cache"):  # older transformers
            if new is None:
                return [[k, v] for k, v in zip(c.key_cache, c.value_cache)]
            c.key_cache[:], c.value_cache[:] = [k for k, _ in new], [v for _, v in new]
            if hasattr(c, "_seen_tokens"):
                c._seen_tokens = new[0][0].shape[-2]
            return new
        return None


def _pad_seq(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    """t left-padded with zeros along `dim` to `length` (masked positions: never attended to)."""
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim)


def _cache_of(out: Any) -> Any:
    """A forward's KV cache: `cache` in newer transformers (`past_key_values` deprecated there)."""
    return out["cache"] if "cache" in out else out.past_key_values


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (every byte-level BPE vocabulary spells its tokens in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)


def _short(text: str, n: int = 80) -> str:
    """A client's string for an error message, cut to n characters (names can be huge)."""
    return repr(text if len(text) <= n else text[:n] + "...")


def _emit(item: Any, event: str, payload: Any) -> None:
    """Deliver an event to a request's client; a client that is gone never stops the worker."""
    try:
        item.emit(event, payload)
    except Exception:  # noqa: BLE001
        log.exception("could not deliver %r to a client", event)
