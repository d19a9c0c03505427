"""The HTTP API (FastAPI): OpenAI-compatible completions and chat, classify, adapters, health, metrics.

`model` in a request is an adapter's name (as vLLM and LoRAX do) or the base model's name. Every
refusal is a 4xx JSON body {"error": {"message", "type", "code"}}, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LoraError
from .engine import ClassifyRequest, Control, Engine, GenRequest, ServeError

MAX_N = 8


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Sampling(_Req):
    """The OpenAI sampling fields both generation endpoints take."""

    model: str
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    n: int | None = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool | None = False
    seed: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=0)


class ChatMessage(_Req):
    role: str
    content: str | list[dict[str, Any]] | None = ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)


class ClassifyBody(_Req):
    model: str
    input: str | list[str]


class AdapterBody(_Req):
    name: str
    path: str
    replace: bool = False


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def _text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


class _Stream:
    """Engine events for one request, delivered into the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, event: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (event, payload))

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        while True:
            yield await self.queue.get()


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="lorakit serve", version="0.1")
    app.state.engine = engine
    counts: Counter[tuple[str, int]] = Counter()
    started = time.time()

    @app.middleware("http")
    async def count(request: Request, call_next):
        t = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "other")
        counts[(path, response.status_code)] += 1
        engine.metrics["request_seconds_sum"] += time.perf_counter() - t
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return _error(400, f"malformed JSON body: {errs[0].get('ctx', {}).get('error', errs[0].get('msg'))}", "invalid_json")
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in errs)
        return _error(400, f"invalid request: {msg}", "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError):
        return _error(exc.status, str(exc), exc.code)

    @app.exception_handler(LoraError)
    async def lora_error(request: Request, exc: LoraError):
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return _error(500, f"{type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.base_name, "task": engine.task, "adapters": len(engine.adapters())}

    @app.get("/v1/models")
    async def models():
        created = int(started)
        data = [{"id": engine.base_name, "object": "model", "created": created, "owned_by": "lorakit", "root": engine.base_name, "parent": None}]
        data += [{"id": n, "object": "model", "created": created, "owned_by": "lorakit", "root": n, "parent": engine.base_name}
                 for n in engine.adapters()]
        if engine.task == "classify":  # what /v1/classify answers with, per model
            for d in data:
                d["labels"] = engine.labels(d["id"])
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load(body: AdapterBody):
        ctl = engine.load_adapter(body.name, body.path, body.replace)
        s = _Stream()
        engine.submit(Control(ctl.fn, s.emit))
        event, payload = await s.queue.get()
        if event == "error":
            if isinstance(payload, ServeError):
                raise payload
            if isinstance(payload, LoraError):
                return _error(400, f"adapter {body.name!r} was not loaded (any previous version keeps serving): {payload}",
                              "adapter_load_failed")
            raise payload
        return {"object": "adapter", "id": body.name, "loaded": True}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        engine.unload_adapter(name)
        return {"object": "adapter", "id": name, "deleted": True}

    @app.get("/metrics")
    async def metrics():
        m, bank = engine.metrics, engine.bank.stats()
        lines = ["# HELP lorakit_requests_total HTTP requests by route and status code.",
                 "# TYPE lorakit_requests_total counter"]
        for (path, code), v in sorted(counts.items()):
            lines.append(f'lorakit_requests_total{{route="{path}",code="{code}"}} {v}')
        for name, help_, kind, value in [
            ("prompt_tokens_total", "Prompt tokens processed.", "counter", m["prompt_tokens"]),
            ("completion_tokens_total", "Tokens generated.", "counter", m["completion_tokens"]),
            ("batches_total", "Batches run by the worker.", "counter", m["batches"]),
            ("batch_rows_total", "Rows in those batches (mean batch size = rows / batches).", "counter", m["batch_rows"]),
            ("rows_joined_total", "Generation rows that joined a batch already decoding (continuous batching).",
             "counter", m["rows_joined"]),
            ("request_seconds_total", "Time spent answering HTTP requests.", "counter", round(m["request_seconds_sum"], 6)),
            ("adapters_registered", "Adapters that can be requested.", "gauge", len(engine.adapters())),
            ("adapters_resident", "Adapters in the bank's slots.", "gauge", bank["resident"]),
            ("adapter_loads_total", "Adapters brought into a slot.", "counter", bank["loads"]),
            ("adapter_evictions_total", "Adapters evicted from a slot (LRU).", "counter", bank["evictions"]),
            ("queue_depth", "Work items waiting for the worker.", "gauge", engine._q.qsize() + len(engine._backlog)),
        ]:
            lines += [f"# HELP lorakit_{name} {help_}", f"# TYPE lorakit_{name} {kind}", f"lorakit_{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody):
        if engine.task != "classify":
            raise ServeError(f"{engine.base_name} is not a classification model: use /v1/completions", 400)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise ServeError("input is empty", 400)
        for t in texts:
            n = len(engine.tokenizer(t)["input_ids"])
            if n > engine.context:
                raise ServeError(f"too many tokens: an input has {n} tokens, the model's context is {engine.context}",
                                 400, "context_length_exceeded")
        key = engine.pin(body.model)  # released by the worker once the batch ran
        s = _Stream()
        engine.submit(ClassifyRequest(key, texts, s.emit))
        event, payload = await s.queue.get()
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

    async def _generate(model: str, prompts: list[str], max_tokens: int | None, temperature: float | None,
                        top_p: float | None, n: int, stop, stream: bool, seed: int | None, chat: bool):
        if engine.task != "generate":
            raise ServeError(f"{engine.base_name} is not a causal language model: use /v1/classify", 400)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        encoded = [engine.tokenizer(p, add_special_tokens=not chat)["input_ids"] for p in prompts]
        if any(not e for e in encoded):
            raise ServeError("the prompt is empty (no tokens)", 400)
        if max_tokens is None:
            max_tokens = max(1, min(256, engine.context - max(len(e) for e in encoded)))
        for e in encoded:
            engine.check_length(len(e), max_tokens)
        keys = [engine.pin(model) for _ in prompts]  # the worker releases each when done
        s = _Stream()
        temp = 1.0 if temperature is None else temperature
        for i, ids in enumerate(encoded):
            engine.metrics["prompt_tokens"] += len(ids) * n
            req = GenRequest(keys[i], ids, max_tokens, temp, top_p or 1.0, stops, n, seed,
                             emit=lambda e, p, i=i: s.emit(e, (i, p)))
            engine.submit(req)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        total_choices = len(prompts) * n
        usage = {"prompt_tokens": sum(len(e) for e in encoded) * n, "completion_tokens": 0}

        async def events():
            finished = 0
            while finished < total_choices:
                event, (pi, payload) = await s.queue.get()
                if event == "error":
                    raise payload
                if event == "finish":
                    finished += 1
                    usage["completion_tokens"] += payload[2]
                yield event, pi * n + payload[0], payload

        obj = "chat.completion" if chat else "text_completion"
        if not stream:
            texts = [""] * total_choices
            reasons = ["length"] * total_choices
            async for event, idx, payload in events():
                if event == "delta":
                    texts[idx] += payload[1]
                elif event == "finish":
                    reasons[idx] = payload[1]
            choices = []
            for i in range(total_choices):
                c = {"index": i, "finish_reason": reasons[i], "logprobs": None}
                c.update({"message": {"role": "assistant", "content": texts[i]}} if chat else {"text": texts[i]})
                choices.append(c)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage}

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(idx: int, text: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                c = {"index": idx, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                c = {"index": idx, "text": text or "", "finish_reason": reason, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": created, "model": model,
                                          "choices": [c]}) + "\n\n"

        async def sse():
            if chat:
                for i in range(total_choices):
                    yield chunk(i, "", None, first=True)
            try:
                async for event, idx, payload in events():
                    if event == "delta":
                        yield chunk(idx, payload[1], None)
                    elif event == "finish":
                        yield chunk(idx, None if chat else "", payload[1])
            except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
                yield "data: " + json.dumps({"error": {"message": str(e), "type": "server_error"}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise ServeError("prompt is empty", 400)
        return await _generate(body.model, prompts, body.max_tokens, body.temperature, body.top_p, body.n or 1,
                               body.stop, bool(body.stream), body.seed, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        prompt = chat_prompt(engine.tokenizer, messages)
        mt = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _generate(body.model, [prompt], mt, body.temperature, body.top_p, body.n or 1,
                               body.stop, bool(body.stream), body.seed, chat=True)

    return app


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template, or a plain "role: content" transcript when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
