"""The HTTP API (FastAPI): OpenAI-compatible completions and chat, classify, adapters, health, metrics.

`model` in a request is an adapter's name (as vLLM and LoRAX do) or the base model's name. Every
refusal is a JSON body in OpenAI's error shape {"error": {"message", "type", "param", "code"}}:
anything the client got wrong is a 4xx, and an unexpected failure is a 500 whose body never
carries an exception's text (the server log has it). The server keeps serving either way.

Trust boundary, in the order a request meets it (`Guard`, a plain ASGI layer in front of FastAPI):
the Host header must be allowed (DNS rebinding), the bearer key must match (`--api-key`; adapter
loads and unloads may need `--admin-key`), and the body is read whole, at most `max_body_bytes`,
within `body_timeout` seconds. Handlers then parse it with strict models (booleans are booleans,
unknown fields are refused: a field that would change the answer is never silently ignored) and
do file, tokenizer and JSON work in worker threads, never on the event loop. Every request is
bounded: prompt characters, prompts x n, tokens in all, time (`request_timeout`), and the queue
(429 when full). A client that goes away cancels its work: its rows leave the batch at the next
step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LoraError
from .engine import ClassifyRequest, Engine, GenRequest, ServeError

log = logging.getLogger("lorakit.serve")
MAX_N = 8
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ADMIN_PATHS = ("/v1/adapters",)


@dataclass
class Limits:
    """What one client may ask of the server, and who may ask (see the module docstring)."""

    api_key: str | None = None  # every endpoint but /health needs `Authorization: Bearer <key>`
    admin_key: str | None = None  # POST/DELETE /v1/adapters need this one (else api_key)
    allowed_hosts: list[str] = field(default_factory=lambda: list(LOOPBACK))  # "*": any Host header
    max_body_bytes: int = 4 << 20
    max_pending_bytes: int = 64 << 20  # bodies still arriving, all connections together
    body_timeout: float = 30.0  # seconds for the whole body to arrive
    max_prompt_chars: int | None = None  # per prompt or message list; None: 32 x context, >= 4096
    max_choices: int = 64  # prompts x n in one request
    max_request_tokens: int = 16384  # (prompt + max_tokens) x n, summed over prompts
    max_echo_logits: int = 1 << 26  # prompt tokens x vocab for echo with logprobs (the full logits)
    request_timeout: float = 600.0  # seconds from arrival to the last byte
    max_path_chars: int = 4096
    max_inputs: int = 256  # texts in one classify request

    def prompt_chars(self, context: int) -> int:
        return self.max_prompt_chars or max(32 * context, 4096)


def allowed_hosts_for(host: str, extra: list[str] | None = None) -> list[str]:
    """The default Host allowlist for a bind address: itself and the loopback names; a wildcard
    bind (0.0.0.0, ::) answers to any name, so it allows any (use --allowed-hosts to narrow it)."""
    if extra:
        return list(extra)
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    return list(dict.fromkeys([host.lower(), *LOOPBACK]))


def _error(status: int, message: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = ("invalid_request_error" if status < 500 and status not in (401, 429)
            else "authentication_error" if status == 401 else "rate_limit_error" if status == 429 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


# ---- the ASGI guard ---------------------------------------------------------------------------
class Guard:
    """Host allowlist, bearer keys and a bounded body, before FastAPI sees a request; and the
    per-route status counts for /metrics."""

    def __init__(self, app: Any, limits: Limits):
        self.app, self.limits, self.state = app, limits, app.state
        self.hosts = {h.lower() for h in limits.allowed_hosts}
        self.pending = 0  # body bytes received by requests not yet handed to the app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: list[int] = []
        t = time.perf_counter()

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, counted_send)
            body, refusal = await self._body(scope, receive)
            if refusal is not None:
                return await refusal(scope, receive, counted_send)
            await self.app(scope, _replay(body, receive), counted_send)
        finally:
            route = scope.get("route")
            self.state.counts[(getattr(route, "path", "other"), status[0] if status else 499)] += 1
            self.state.seconds[0] += time.perf_counter() - t

    def _refusal(self, scope: dict) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if "*" not in self.hosts and _host_name(headers.get("host", "")) not in self.hosts:
            return _error(400, "this server does not answer to that Host header (see --allowed-hosts)", "invalid_host")
        path, method = scope.get("path", ""), scope.get("method", "GET")
        # a page in a browser (cross-site request forgery, DNS rebinding): refused whatever the key
        origin = headers.get("origin")
        foreign = origin is not None and (origin == "null" or (
            "*" not in self.hosts and _host_name(origin.split("://", 1)[-1]) not in self.hosts))
        if foreign or headers.get("sec-fetch-site") == "cross-site":
            return _error(403, "requests from web pages of other sites are refused (Origin / Sec-Fetch-Site)",
                          "cross_origin")
        if path == "/health":
            return None
        admin = self.limits.admin_key and path.startswith(ADMIN_PATHS) and method in ("POST", "DELETE")
        keys = [self.limits.admin_key] if admin else [k for k in (self.limits.api_key, self.limits.admin_key) if k]
        if admin or self.limits.api_key:
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
                what = "the admin key" if admin else "an API key"
                return _error(401, f"this endpoint needs {what}: send 'Authorization: Bearer <key>'", "invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limits.max_body_bytes):
            return _error(413, f"request body over {self.limits.max_body_bytes} bytes", "body_too_large")
        if method in ("POST", "PUT", "PATCH") and headers.get("content-type", "").split(";")[0].strip().lower() != \
                "application/json":  # (a form or text/plain post is what a web page can send without asking)
            return _error(415, "the body must be JSON, sent with 'Content-Type: application/json'", "unsupported_media_type")
        return None

    async def _body(self, scope: dict, receive: Callable) -> tuple[bytes, Response | None]:
        """The whole body, at most max_body_bytes, within body_timeout seconds; bodies still
        arriving hold at most max_pending_bytes in all (beyond: 503), so connections that stall
        mid-body cannot pile up memory."""
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return b"", None
        chunks, size = [], 0
        deadline = time.monotonic() + self.limits.body_timeout
        try:
            while True:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
                except asyncio.TimeoutError:
                    return b"", _error(408, f"the request body did not arrive within {self.limits.body_timeout:g} s",
                                       "body_timeout")
                if message["type"] == "http.disconnect":
                    return b"", Response(status_code=499)
                chunk = message.get("body", b"")
                size += len(chunk)
                self.pending += len(chunk)
                if size > self.limits.max_body_bytes:
                    return b"", _error(413, f"request body over {self.limits.max_body_bytes} bytes", "body_too_large")
                if self.pending > self.limits.max_pending_bytes:
                    return b"", _error(503, "the server is busy receiving other requests; retry shortly", "busy",
                                       headers={"Retry-After": "1"})
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks), None
        finally:
            self.pending -= size


def _host_name(host: str) -> str:
    """The name in a Host header, without the port ('[::1]:8000' -> '::1')."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _replay(body: bytes, receive: Callable) -> Callable:
    """A receive() that hands the app the body already read, then the client's later messages
    (the disconnect that cancels a request)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# ---- request bodies ---------------------------------------------------------------------------
class _Body(BaseModel):
    """Strict: booleans must be booleans, numbers numbers; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = False


class _Sampling(_Body):
    """The OpenAI sampling fields both generation endpoints take."""

    model: str = Field(max_length=512)
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    n: int | None = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(default=None)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=300)
    user: str | None = Field(default=None, max_length=512)  # for the caller's records: changes nothing


class CompletionBody(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = ""
    name: str | None = Field(default=None, max_length=256)


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None  # for the caller's records: changes nothing
    store: bool | None = None  # lorakit stores nothing either way


class ClassifyBody(_Body):
    model: str = Field(max_length=512)
    input: str | list[str]


class AdapterBody(_Body):
    name: str = Field(max_length=512)
    path: str
    replace: bool = False


def _invalid(e: ValidationError) -> ServeError:
    """A 400 naming each bad field, without echoing the client's (possibly huge) input."""
    parts = []
    for err in e.errors(include_input=False, include_url=False)[:8]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        if err.get("type") == "extra_forbidden":
            parts.append(f"{loc}: not a field lorakit supports (it would be ignored, so it is refused)")
        elif err.get("type") == "json_invalid":
            return ServeError(f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", 400,
                              "invalid_json")
        else:
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return ServeError("invalid request: " + "; ".join(parts), 400, "invalid_request")


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    body = await request.body()
    if not body:
        raise ServeError("the request needs a JSON body", 400, "invalid_json")
    try:
        if len(body) > 1 << 16:  # a large body is parsed off the event loop
            return await _run(request, "cpu", model.model_validate_json, body)
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _invalid(e) from None


async def _run(request: Request, pool: str, fn: Callable, *args: Any) -> Any:
    """fn(*args) in one of the server's small thread pools: "cpu" (tokenizing, parsing) or "io"
    (adapter files); the event loop stays free."""
    return await asyncio.get_running_loop().run_in_executor(request.app.state.pools[pool], fn, *args)


# ---- waiting for the engine -------------------------------------------------------------------
class _Stream:
    """Engine events for one request, delivered into the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, event: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (event, payload))


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Gone(Exception):
    """The client went away (or ran out of time): its requests were cancelled."""


async def _watched(request: Request, engine: Engine, reqs: list, deadline: float, work: Any) -> Any:
    """Await `work`, cancelling `reqs` if the client disconnects first or the deadline passes."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=max(deadline - time.monotonic(), 0),
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        engine.cancel(reqs)
        task.cancel()
        if gone in done:
            raise _Gone()
        engine.metrics["timeouts"] += 1
        raise ServeError("the request ran out of time (--request-timeout); it was cancelled", 504, "timeout")
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()


# ---- routes -----------------------------------------------------------------------------------
def _engine(request: Request) -> Engine:
    return request.app.state.engine


async def health(request: Request) -> dict:
    engine = _engine(request)
    return {"status": "ok", "model": engine.base_name, "task": engine.task, "adapters": len(engine.adapters())}


async def list_models(request: Request) -> dict:
    engine = _engine(request)
    created = int(request.app.state.started)
    data = [{"id": engine.base_name, "object": "model", "created": created, "owned_by": "lorakit",
             "root": engine.base_name, "parent": None}]
    data += [{"id": n, "object": "model", "created": created, "owned_by": "lorakit", "root": n,
              "parent": engine.base_name} for n in engine.adapters()]
    if engine.task == "classify":  # what /v1/classify answers with, per model
        for d in data:
            d["labels"] = engine.labels(d["id"])
    return {"object": "list", "data": data}


async def load_adapter(request: Request) -> dict:
    body = await _parse(request, AdapterBody)
    limits = request.app.state.limits
    if len(body.path) > limits.max_path_chars:
        raise ServeError(f"adapter path: at most {limits.max_path_chars} characters", 400)
    await _run(request, "io", _engine(request).load_adapter, body.name, body.path, body.replace)
    return {"object": "adapter", "id": body.name, "loaded": True}


async def unload_adapter(request: Request) -> dict:
    name = request.path_params["name"]
    _engine(request).unload_adapter(name)
    return {"object": "adapter", "id": name, "deleted": True}


METRICS = [  # (name, help, type, engine.metrics key or callable)
    ("prompt_tokens_total", "Prompt tokens processed.", "counter", "prompt_tokens"),
    ("completion_tokens_total", "Tokens generated.", "counter", "completion_tokens"),
    ("batches_total", "Batches run by the worker.", "counter", "batches"),
    ("batch_rows_total", "Rows in those batches (mean batch size = rows / batches).", "counter", "batch_rows"),
    ("rows_joined_total", "Generation rows that joined a batch already decoding (continuous batching).",
     "counter", "rows_joined"),
    ("requests_cancelled_total", "Requests whose client went away (or that ran out of time) before the end; "
     "their rows left the batch.", "counter", "cancelled"),
    ("requests_rejected_total", "Requests refused with 429 because the waiting queue was full.", "counter", "rejected"),
    ("request_timeouts_total", "Requests cancelled at --request-timeout.", "counter", "timeouts"),
    ("adapter_load_failures_total", "Adapters that could not be brought into a slot (their requests failed alone).",
     "counter", "adapter_load_failures"),
    ("adapter_integrity_failures_total", "Adapter loads refused because the files changed on disk since they "
     "were checked and registered.", "counter", "adapter_integrity_failures"),
]


async def metrics(request: Request) -> PlainTextResponse:
    engine, counts = _engine(request), request.app.state.counts
    m, bank = engine.metrics, engine.bank.stats()
    lines = ["# HELP lorakit_requests_total HTTP requests by route and status code.",
             "# TYPE lorakit_requests_total counter"]
    for (path, code), v in sorted(counts.items()):
        lines.append(f'lorakit_requests_total{{route="{path}",code="{code}"}} {v}')
    rows = [(name, help_, kind, m[key]) for name, help_, kind, key in METRICS] + [
        ("request_seconds_total", "Time spent answering HTTP requests.", "counter",
         round(request.app.state.seconds[0], 6)),
        ("adapters_registered", "Adapters that can be requested.", "gauge", len(engine.adapters())),
        ("adapters_resident", "Adapters in the bank's slots.", "gauge", bank["resident"]),
        ("adapter_loads_total", "Adapters brought into a slot.", "counter", bank["loads"]),
        ("adapter_evictions_total", "Adapters evicted from a slot (LRU).", "counter", bank["evictions"]),
        ("queue_depth", "Requests waiting for the worker.", "gauge", engine.queue_depth()),
        ("rows_running", "Generation rows in the running batch.", "gauge", engine.rows_running()),
    ]
    for name, help_, kind, value in rows:
        lines += [f"# HELP lorakit_{name} {help_}", f"# TYPE lorakit_{name} {kind}", f"lorakit_{name} {value}"]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


async def classify(request: Request) -> Any:
    body = await _parse(request, ClassifyBody)
    engine, limits = _engine(request), request.app.state.limits
    deadline = time.monotonic() + limits.request_timeout
    if engine.task != "classify":
        raise ServeError(f"{engine.base_name} is not a classification model: use /v1/completions", 400)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise ServeError("input is empty", 400)
    if len(texts) > limits.max_inputs:
        raise ServeError(f"input: at most {limits.max_inputs} texts per request", 400)
    cap = limits.prompt_chars(engine.context)
    if any(len(t) > cap for t in texts):
        raise ServeError(f"input: each text at most {cap} characters", 400, "context_length_exceeded")
    lengths = await _run(request, "cpu", lambda: [len(engine.tokenizer(t)["input_ids"]) for t in texts])
    for n in lengths:
        if n > engine.context:
            raise ServeError(f"too many tokens: an input has {n} tokens, the model's context is {engine.context}",
                             400, "context_length_exceeded")
    key = engine.pin(body.model)  # released by the worker once the batch ran
    s = _Stream()
    req = ClassifyRequest(key, texts, s.emit)
    engine.enqueue([req])
    try:
        event, payload = await _watched(request, engine, [req], deadline, s.queue.get())
    except _Gone:
        return Response(status_code=499)
    if event == "error":
        raise payload
    labels = payload["labels"]  # the adapter's own head and class names
    best = [max(range(len(p)), key=p.__getitem__) for p in payload["probs"]]
    data = [{"index": i, "label": labels[b], "label_id": b, "probs": p}
            for i, (b, p) in enumerate(zip(best, payload["probs"]))]
    engine.metrics["prompt_tokens"] += payload["tokens"]
    return {"id": f"cls-{uuid.uuid4().hex[:12]}", "object": "classification", "created": int(time.time()),
            "model": body.model, "data": data,
            "usage": {"prompt_tokens": payload["tokens"], "total_tokens": payload["tokens"]}}


@dataclass
class _Gen:
    """A generation request as the engine will run it, checked against the limits."""

    model: str
    prompts: list[str]
    max_tokens: int | None
    chat: bool
    temperature: float
    top_p: float
    n: int
    stop: list[str]
    stream: bool
    usage_chunk: bool
    seed: int | None
    logprobs: int | None  # alternatives per token; None: no logprobs
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)


def _sampling(body: _Sampling, engine: Engine) -> dict:
    """The sampling fields both endpoints share, checked (stop strings, logit_bias token ids)."""
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(len(s) > 256 for s in stops):
        raise ServeError("stop: at most 4 strings of at most 256 characters", 400)
    bias: dict[int, float] = {}
    for k, v in (body.logit_bias or {}).items():
        if not (k.isascii() and k.isdigit() and len(k) <= 9) or int(k) >= engine.vocab or not -100 <= v <= 100:
            raise ServeError(f"logit_bias: keys are token ids below {engine.vocab}, values in [-100, 100]; "
                             f"got {k[:20]!r}: {v}", 400)
        bias[int(k)] = float(v)
    return dict(temperature=1.0 if body.temperature is None else body.temperature, top_p=body.top_p or 1.0,
                n=body.n or 1, stop=stops, stream=bool(body.stream),
                usage_chunk=bool(body.stream_options and body.stream_options.include_usage), seed=body.seed,
                presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                logit_bias=bias)


async def completions(request: Request) -> Any:
    body = await _parse(request, CompletionBody)
    engine = _engine(request)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise ServeError("prompt is empty", 400)
    if body.suffix:
        raise ServeError("suffix is not supported (no fill-in-the-middle)", 400)
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise ServeError("best_of other than n is not supported (no server-side ranking of choices)", 400)
    gen = _Gen(body.model, prompts, body.max_tokens, False, logprobs=body.logprobs, echo=bool(body.echo),
               **_sampling(body, engine))
    return await _generate(request, gen)


async def chat_completions(request: Request) -> Any:
    body = await _parse(request, ChatBody)
    engine = _engine(request)
    for name in ("tools", "functions", "function_call", "parallel_tool_calls"):
        if getattr(body, name) is not None:
            raise ServeError(f"{name} is not supported (no tool calling)", 400)
    if body.tool_choice not in (None, "none"):
        raise ServeError("tool_choice is not supported (no tool calling)", 400)
    if body.response_format is not None and body.response_format != {"type": "text"}:
        raise ServeError("response_format: only {\"type\": \"text\"} is supported", 400)
    if body.top_logprobs is not None and not body.logprobs:
        raise ServeError("top_logprobs needs logprobs: true", 400)
    limits = request.app.state.limits
    chars = sum(len(_text(m.content)) for m in body.messages)
    if chars > limits.prompt_chars(engine.context):
        raise ServeError(f"messages: at most {limits.prompt_chars(engine.context)} characters in all", 400,
                         "context_length_exceeded")
    messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
    prompt = await _run(request, "cpu", chat_prompt, engine.tokenizer, messages)
    mt = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    gen = _Gen(body.model, [prompt], mt, True, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
               **_sampling(body, engine))
    return await _generate(request, gen)


def _text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts (text only)
        return "".join(p.text for p in content)
    return content or ""


def _offsets(engine: Engine, prompts: list[str], encoded: list[list[int]]) -> list[list[int]]:
    """Where each prompt token starts in its prompt's text (fast tokenizers know; else by the
    lengths of the tokens decoded one by one)."""
    out = []
    for p, ids in zip(prompts, encoded):
        try:
            spans = engine.tokenizer(p, return_offsets_mapping=True)["offset_mapping"]
            if len(spans) != len(ids):
                raise ValueError
            out.append([start for start, _ in spans])
        except (NotImplementedError, ValueError, KeyError, TypeError):
            starts, pos = [], 0
            for t in ids:
                starts.append(pos)
                pos += len(engine.tokenizer.decode([t]))
            out.append(starts)
    return out


def _tokenize(engine: Engine, prompts: list[str], chat: bool) -> list[list[int]]:
    return [engine.tokenizer(p, add_special_tokens=not chat)["input_ids"] for p in prompts]


async def _generate(request: Request, g: _Gen) -> Any:
    engine, limits = _engine(request), request.app.state.limits
    deadline = time.monotonic() + limits.request_timeout
    if engine.task != "generate":
        raise ServeError(f"{engine.base_name} is not a causal language model: use /v1/classify", 400)
    cap = limits.prompt_chars(engine.context)
    if len(g.prompts) * g.n > limits.max_choices:
        raise ServeError(f"prompts x n is {len(g.prompts)} x {g.n}; at most {limits.max_choices} per request", 400)
    if any(len(p) > cap for p in g.prompts):
        raise ServeError(f"prompt: at most {cap} characters", 400, "context_length_exceeded")
    encoded = await _run(request, "cpu", _tokenize, engine, g.prompts, g.chat)
    if any(not e for e in encoded):
        raise ServeError("the prompt is empty (no tokens)", 400)
    max_tokens = g.max_tokens
    if max_tokens is None:
        max_tokens = max(1, min(256, engine.context - max(len(e) for e in encoded)))
    for e in encoded:
        engine.check_length(len(e), max_tokens)
    total = sum(len(e) + max_tokens for e in encoded) * g.n
    if total > limits.max_request_tokens:
        raise ServeError(f"too many tokens in one request: (prompt + max_tokens) x n summed over prompts is {total}, "
                         f"the limit is {limits.max_request_tokens}", 400, "context_length_exceeded")
    prompt_lp = g.echo and g.logprobs is not None
    if prompt_lp and max(len(e) for e in encoded) * engine.vocab > limits.max_echo_logits:
        raise ServeError(f"echo with logprobs: at most {limits.max_echo_logits // engine.vocab} prompt tokens here", 400)
    keys = [engine.pin(g.model) for _ in g.prompts]  # the worker releases each when done
    s = _Stream()
    reqs = [GenRequest(keys[i], ids, max_tokens, g.temperature, g.top_p, g.stop, g.n, g.seed,
                       emit=lambda e, p, i=i: s.emit(e, (i, p)), logprobs=g.logprobs, prompt_logprobs=prompt_lp,
                       presence_penalty=g.presence_penalty, frequency_penalty=g.frequency_penalty,
                       logit_bias=g.logit_bias)
            for i, ids in enumerate(encoded)]
    engine.enqueue(reqs)
    engine.metrics["prompt_tokens"] += sum(len(e) for e in encoded) * g.n
    try:
        offsets = await _run(request, "cpu", _offsets, engine, g.prompts, encoded) if prompt_lp else None
        answer = _Answer(g, encoded, engine, offsets)
        if g.stream:  # the first event before the 200: an adapter that fails to load is a real status
            first = await _watched(request, engine, reqs, deadline, s.queue.get())
            event, (_, payload) = first
            if event == "error":
                raise payload
            answer.early.append(first)
            return StreamingResponse(_sse(answer, s, engine, reqs, deadline), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        await _watched(request, engine, reqs, deadline, answer.collect(s))
    except _Gone:
        return Response(status_code=499)
    except BaseException:  # the request failed: its other prompts' rows stop decoding too
        engine.cancel(reqs)
        raise
    return answer.body()


class _Answer:
    """The choices of one generation request, built from the engine's events."""

    def __init__(self, g: _Gen, encoded: list[list[int]], engine: Engine, prompt_offsets: list[list[int]] | None = None):
        self.g, self.engine, self.n = g, engine, len(encoded) * g.n
        self.prompt_offsets = prompt_offsets or [[] for _ in encoded]
        self.id = f"{'chatcmpl' if g.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.texts = [g.prompts[i // g.n] if g.echo else "" for i in range(self.n)]
        self.reasons = ["length"] * self.n
        self.entries: list[list[dict]] = [[] for _ in range(self.n)]
        self.prompt_entries: dict[int, list[dict]] = {}
        self.usage = {"prompt_tokens": sum(len(e) for e in encoded) * g.n, "completion_tokens": 0}
        self.finished = 0
        self.early: list[tuple[str, Any]] = []  # events taken off the queue before the stream began

    def with_offsets(self, pi: int, entries: list[dict]) -> list[dict]:
        """The prompt's token entries with where each token starts in the prompt's text."""
        for e, start in zip(entries, self.prompt_offsets[pi]):
            e["offset"], e["prompt"] = start, True
        return entries

    async def next_event(self, s: _Stream) -> tuple[str, Any]:
        return self.early.pop(0) if self.early else await s.queue.get()

    async def events(self, s: _Stream) -> AsyncIterator[tuple[str, int, Any]]:
        """(event, choice index, payload) until every choice finished; an error raises."""
        while self.finished < self.n:
            event, (pi, payload) = await self.next_event(s)
            if event == "error":
                raise payload
            if event == "prompt_logprobs":
                self.prompt_entries[pi] = self.with_offsets(pi, payload)
                continue
            idx = pi * self.g.n + payload[0]
            if event == "finish":
                self.finished += 1
                self.reasons[idx] = payload[1]
                self.usage["completion_tokens"] += payload[2]
            yield event, idx, payload

    async def collect(self, s: _Stream) -> None:
        async for event, idx, payload in self.events(s):
            if event == "delta":
                self.texts[idx] += payload[1]
                self.entries[idx] += payload[2] or []

    def logprobs(self, idx: int, entries: list[dict], offset: int = 0, with_prompt: bool = False) -> Any:
        if self.g.logprobs is None:
            return None
        if with_prompt and self.g.echo:
            entries = self.prompt_entries.get(idx // self.g.n, []) + entries
        if self.g.chat:
            return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
                                 "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, v, b in e["top"]]}
                                for e in entries]}
        # text_offset: where each token starts in the choice's text (after the echoed prompt)
        shift = len(self.g.prompts[idx // self.g.n]) if self.g.echo else 0
        offsets = [e["offset"] + (0 if e.get("prompt") else shift) if "offset" in e else None for e in entries]
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t: v for t, v, _ in e["top"]} if e["logprob"] is not None else None for e in entries],
                "text_offset": offsets}

    def body(self) -> dict:
        choices = []
        for i in range(self.n):
            c: dict[str, Any] = {"index": i, "finish_reason": self.reasons[i],
                                 "logprobs": self.logprobs(i, self.entries[i], with_prompt=True)}
            c.update({"message": {"role": "assistant", "content": self.texts[i]}} if self.g.chat else {"text": self.texts[i]})
            choices.append(c)
        usage = dict(self.usage, total_tokens=self.usage["prompt_tokens"] + self.usage["completion_tokens"])
        return {"id": self.id, "object": "chat.completion" if self.g.chat else "text_completion",
                "created": self.created, "model": self.g.model, "choices": choices, "usage": usage}

    def chunk(self, idx: int, text: str | None, reason: str | None, entries: list[dict] | None = None,
              first: bool = False, offset: int = 0) -> str:
        if self.g.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            c = {"index": idx, "delta": delta, "finish_reason": reason,
                 "logprobs": self.logprobs(idx, entries) if entries else None}
        else:
            c = {"index": idx, "text": text or "", "finish_reason": reason,
                 "logprobs": self.logprobs(idx, entries, offset, with_prompt=first) if (entries or first) else None}
        return _event({"id": self.id, "object": "chat.completion.chunk" if self.g.chat else "text_completion",
                       "created": self.created, "model": self.g.model, "choices": [c]})

    def usage_chunk(self) -> str:
        usage = dict(self.usage, total_tokens=self.usage["prompt_tokens"] + self.usage["completion_tokens"])
        return _event({"id": self.id, "object": "chat.completion.chunk" if self.g.chat else "text_completion",
                       "created": self.created, "model": self.g.model, "choices": [], "usage": usage})


def _event(data: dict) -> str:
    return "data: " + json.dumps(data) + "\n\n"


async def _sse(answer: _Answer, s: _Stream, engine: Engine, reqs: list, deadline: float) -> AsyncIterator[str]:
    """The stream of one request. If the client goes away, Starlette cancels this generator and
    `finally` cancels the requests: their rows leave the batch at the next step."""
    g, finished = answer.g, False
    sent = [len(t) for t in answer.texts]  # characters already sent per choice (echoed prompts count)
    try:
        if g.chat:
            for i in range(answer.n):
                yield answer.chunk(i, "", None, first=True)
        elif g.echo:
            if g.logprobs is not None:  # the prompt's logprobs come before any generated token
                while len(answer.prompt_entries) < len(g.prompts):
                    event, (pi, payload) = await asyncio.wait_for(answer.next_event(s),
                                                                  max(deadline - time.monotonic(), 0))
                    if event == "error":
                        raise payload
                    if event != "prompt_logprobs":  # not expected first; keep it for the loop below
                        answer.early.insert(0, (event, (pi, payload)))
                        break
                    answer.prompt_entries[pi] = answer.with_offsets(pi, payload)
            for i in range(answer.n):
                yield answer.chunk(i, answer.texts[i], None, [], first=True)
        events = answer.events(s).__aiter__()
        while True:
            try:
                event, idx, payload = await asyncio.wait_for(events.__anext__(), max(deadline - time.monotonic(), 0))
            except StopAsyncIteration:
                break
            if event == "delta":
                yield answer.chunk(idx, payload[1], None, payload[2], offset=sent[idx])
                sent[idx] += len(payload[1])
            elif event == "finish":
                yield answer.chunk(idx, None if g.chat else "", payload[1])
        if g.usage_chunk:
            yield answer.usage_chunk()
        finished = True
    except asyncio.TimeoutError:
        engine.metrics["timeouts"] += 1
        yield _event({"error": {"message": "the request ran out of time (--request-timeout); it was cancelled",
                                "type": "server_error", "code": "timeout"}})
    except ServeError as e:  # the stream has started: report in-band
        yield _event({"error": {"message": str(e), "type": "invalid_request_error" if e.status < 500 else "server_error",
                                "code": e.code}})
    except Exception:  # noqa: BLE001 - never an exception's text to the client
        log.exception("generation failed")
        yield _event({"error": {"message": "internal server error (see the server log)", "type": "server_error"}})
    finally:
        if not finished:
            engine.cancel(reqs)
    yield "data: [DONE]\n\n"


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template, or a plain "role: content" transcript when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


# ---- the app ----------------------------------------------------------------------------------
async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return _error(exc.status, str(exc), exc.code, headers)


async def _lora_error(request: Request, exc: LoraError) -> JSONResponse:
    return _error(400, str(exc))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal server error (see the server log)", "internal_error")


ROUTES = [
    ("/health", "GET", health), ("/v1/models", "GET", list_models), ("/metrics", "GET", metrics),
    ("/v1/adapters", "POST", load_adapter), ("/v1/adapters/{name}", "DELETE", unload_adapter),
    ("/v1/classify", "POST", classify), ("/v1/completions", "POST", completions),
    ("/v1/chat/completions", "POST", chat_completions),
]


def create_app(engine: Engine, limits: Limits | None = None) -> Any:
    """The ASGI app: FastAPI routes behind the Guard."""
    limits = limits or Limits()
    app = FastAPI(title="lorakit serve", version="0.1")
    app.state.engine, app.state.limits, app.state.started = engine, limits, time.time()
    app.state.counts, app.state.seconds = Counter(), [0.0]
    app.state.pools = {"cpu": ThreadPoolExecutor(2, thread_name_prefix="lorakit-cpu"),
                       "io": ThreadPoolExecutor(2, thread_name_prefix="lorakit-io")}
    for path, method, fn in ROUTES:
        app.add_api_route(path, fn, methods=[method])
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(LoraError, _lora_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    return Guard(app, limits)  # its .state is the app's: the engine is app.state.engine
