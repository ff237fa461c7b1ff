"""The `lmforge serve` web app: OpenAI's API over one checkpoint (FastAPI).

    app = create_app(ServeOptions(ckpt="runs/chat"))            # loads the model at startup
    app = create_app(options, model=model, tokenizer=tokenizer)  # tests: an already loaded model

Routes: `POST /v1/chat/completions` (the checkpoint's chat template), `POST /v1/completions`,
`POST /v1/embeddings` (an encoder checkpoint, or `--embedder` beside a generative one),
`POST /v1/rag/query` (with `--rag DIR`: retrieval from a RAG index and an answer citing it; `serve.rag`),
`GET /v1/models`, `GET /health` (503 until the model has loaded, and while draining), `GET /metrics`
(Prometheus), and the chat page at `/` and `/static/...`. Generation goes through one
`Scheduler` (continuous batching; it owns the model in its own thread); a request's `n` choices
are n scheduler requests with seeds seed, seed+1, ...

Every /v1 route needs `Authorization: Bearer KEY` when the server has a key (compared in constant
time); the page, /health and /metrics do not. Errors are OpenAI's JSON error shape. A body is
read at most `max_body_bytes` far (Content-Length is checked first; a chunked body is counted as
it arrives). One JSON log line per request on the `lmforge.serve` logger.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles

from lmforge.errors import UserError
from lmforge.infer.engine import SamplingParams
from lmforge.models import has_capability
from lmforge.serve import protocol as p
from lmforge.serve.protocol import APIError, ServeOptions

__all__ = ["APIError", "Backend", "ServeOptions", "create_app"]

logger = logging.getLogger("lmforge.serve")
STATIC = Path(__file__).parent / "static"
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": None, "float32": None}


def autocast_dtype(name: str | None):
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: use one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name]) if DTYPES[name] else None


def eos_id_of(tokenizer) -> int | None:
    try:
        return tokenizer.eos_id
    except (UserError, AttributeError):
        return None


class Backend:
    """What the routes serve: the model, its chat template, the scheduler, the embedder, the metrics,
    and the server's state (ready, draining, requests in flight)."""

    def __init__(self, options: ServeOptions, model=None, tokenizer=None) -> None:
        from lmforge.serve.metrics import ServeMetrics

        self.options, self.model, self.tokenizer = options, model, tokenizer
        self.name = options.model_name or Path(options.ckpt).resolve().name or "model"
        self.metrics = ServeMetrics(self.name, prefix=options.metrics_prefix)
        self.template = None
        self.template_error: str | None = None
        self.embedder: tuple[Any, Any, int, str] | None = None  # model, tokenizer, max length, name
        self.embed_lock = threading.Lock()
        self.adapters = None
        self.rag = None  # serve.rag.RagService with --rag
        self.scheduler = None
        self.ready = self.draining = False
        self.load_error: str | None = None
        self.on_load_error = None  # called (in the loop) when loading fails: run_server stops the server
        self.active = 0  # HTTP requests in flight
        self.created = int(time.time())

    # ---- loading and stopping ------------------------------------------------------------------------

    def load(self) -> None:
        """Load the checkpoint(s) (blocking; safetensors only: `load_pretrained`), the chat template,
        the embedder and the adapters."""
        from lmforge.infer.embed import max_seq_length
        from lmforge.tokenizer.chat import chat_template
        from lmforge.train.checkpoint import load_pretrained, resolve_checkpoint

        opts = self.options
        if self.model is None:
            self.model, self.tokenizer = load_pretrained(resolve_checkpoint(opts.ckpt), opts.device)
        if has_capability(self.model, "generate"):
            try:
                self.template = chat_template(self.tokenizer)
            except UserError as e:  # completions still work
                self.template_error = str(e)
        elif has_capability(self.model, "embed"):
            path = Path(opts.ckpt)
            limit = max_seq_length(resolve_checkpoint(path), self.model.config) if path.exists() \
                else self.model.config.block_size
            self.embedder = (self.model, self.tokenizer, limit, self.name)
        else:
            raise UserError(f"{opts.ckpt}: a {type(self.model).__name__} neither generates text nor embeds it")
        if opts.embedder:
            self.embedder = self.load_embedder(opts.embedder)
        if opts.adapters:
            self.load_adapters(opts.adapters)
        if opts.rag:
            from lmforge.serve.rag import RagService

            self.rag = RagService.open(opts.rag)

    def load_embedder(self, ckpt: str) -> tuple[Any, Any, int, str]:
        from lmforge.infer.embed import max_seq_length
        from lmforge.train.checkpoint import load_pretrained, resolve_checkpoint

        path = resolve_checkpoint(ckpt)
        model, tokenizer = load_pretrained(path, self.options.device)
        if not has_capability(model, "embed"):
            raise UserError(f"--embedder {ckpt}: a {type(model).__name__} has no sentence embeddings; "
                            "pass an encoder (model.arch bert) checkpoint")
        return model, tokenizer, max_seq_length(path, model.config), Path(ckpt).resolve().name

    def load_adapters(self, adapters: dict[str, str]) -> None:
        from lmforge.adapters.multi import serve_adapters

        if not has_capability(self.model, "generate"):
            raise UserError("--adapter: adapters need a generative base checkpoint")
        clash = [n for n in adapters if n in (self.name, self.embedder and self.embedder[3])]
        if clash:
            raise UserError(f"--adapter {clash[0]}=...: the name is the base model's; pick another name")
        self.adapters = serve_adapters(self.model, adapters)

    async def start(self) -> None:
        """Load (in a worker thread), then start the scheduler in this loop; ready after that."""
        try:
            await asyncio.to_thread(self.load)
            if has_capability(self.model, "generate"):
                from lmforge.serve.scheduler import Scheduler

                self.scheduler = Scheduler(self.model, self.tokenizer, max_batch=self.options.max_batch,
                                           max_queue=self.options.max_queue, metrics=self.metrics,
                                           autocast_dtype=autocast_dtype(self.options.dtype), adapters=self.adapters)
                self.scheduler.start()
        except Exception as e:  # noqa: BLE001 - reported on /health and by run_server
            self.load_error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            logger.error(json.dumps({"event": "load_failed", "error": self.load_error}))
            if self.on_load_error is not None:
                self.on_load_error()
            return
        self.ready = True
        logger.info(json.dumps({"event": "ready", "model": self.name, "names": self.names()}))

    async def drain(self, timeout: float | None = None) -> None:
        """Refuse new /v1 requests (503); let running and queued ones finish and their responses
        go out (at most `timeout` seconds)."""
        self.draining = True
        deadline = time.monotonic() + (timeout if timeout is not None else self.options.drain_timeout)
        if self.scheduler is not None:
            with contextlib.suppress(TimeoutError):
                await self.scheduler.drain(max(0.0, deadline - time.monotonic()))
        while self.active > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    # ---- what a request asks for ----------------------------------------------------------------------

    def names(self) -> list[str]:
        names = [self.name] if self.model is not None and has_capability(self.model, "generate") else []
        names += list(self.adapters.names) if self.adapters is not None else []
        if self.embedder is not None and self.embedder[3] not in names:
            names.append(self.embedder[3])
        return names

    def generator_for(self, model: str | None) -> str | None:
        """The adapter a generation request's `model` names (None: the base model); 404 if unknown."""
        if self.scheduler is None:
            raise APIError(400, f"model: {self.name} is an embedding model; it serves /v1/embeddings only",
                           param="model", code="model_not_supported")
        if model is None or model == self.name:
            return None
        if self.adapters is not None and model in self.adapters:
            return model
        if self.embedder is not None and model == self.embedder[3]:
            raise APIError(400, f"model: {model} is an embedding model; use /v1/embeddings", param="model",
                           code="model_not_supported")
        raise APIError(404, f"model: {model!r} does not exist here; GET /v1/models lists {self.names()}",
                       param="model", code="model_not_found")

    def prompt_room(self, prompt_ids: list[int], field: str) -> int:
        """How many tokens fit after the prompt (400 when the prompt is over the limit)."""
        block = self.model.config.block_size
        limit = min(self.options.max_prompt_tokens or block, block)
        if len(prompt_ids) > limit:
            what = "the model's context" if limit == block else "this server's --max-prompt-tokens"
            raise APIError(400, f"{field}: the prompt is {len(prompt_ids)} tokens, over the limit of {limit} "
                           f"({what}); shorten it", param=field, code="context_length_exceeded")
        if has_capability(self.model, "encoder_decoder"):
            return block - 1
        return block - len(prompt_ids) + 1  # the engine's last token fills the context

    def submit(self, prompts: list[list[int]], spec: p.Sampling, stop_ids: set[int], adapter: str | None,
               top_logprobs: int | None, request_id: str, field: str) -> list:
        """One scheduler request per prompt and choice (seeds seed, seed+1, ...); 429 when the queue
        is full, 503 when draining (nothing stays submitted then)."""
        from lmforge.serve.scheduler import Draining, GenerationRequest, QueueFull

        rooms = [self.prompt_room(ids, field) for ids in prompts]
        stop_ids = set() if spec.ignore_eos else stop_ids
        handles = []
        try:
            for ids, room in zip(prompts, rooms):
                for i in range(spec.n):
                    params = SamplingParams(
                        max_new_tokens=min(spec.max_tokens or self.options.max_tokens_limit, room),
                        temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                        seed=None if spec.seed is None else spec.seed + i, stop_ids=frozenset(stop_ids),
                        logprobs=top_logprobs is not None, top_logprobs=top_logprobs or 0)
                    request = GenerationRequest(ids, params, list(spec.stops), adapter, f"{request_id}-{len(handles)}")
                    handles.append(self.scheduler.submit(request))
        except QueueFull as e:
            cancel_all(handles)
            wait = max(1, math.ceil(getattr(e, "retry_after", 1) or 1))
            raise APIError(429, f"the server is busy (its queue of {self.options.max_queue} waiting requests is "
                           f"full); retry after {wait} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(wait)}) from None
        except Draining:
            cancel_all(handles)
            raise unavailable("the server is shutting down") from None
        return handles


def cancel_all(handles) -> None:
    for handle in handles:
        if handle.finish_reason is None:
            handle.cancel()


def unavailable(why: str) -> APIError:
    return APIError(503, f"{why}; retry later", type="service_unavailable", code="service_unavailable",
                    headers={"Retry-After": "1"})


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def backend_of(request: Request) -> Backend:
    return request.app.state.backend


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, read at most `limit` bytes far: 413 above it (by Content-Length
    before reading, and by counting while reading a body of unstated length)."""
    length = request.headers.get("content-length")
    too_big = f"request body is over this server's limit of {limit:,} bytes (--max-body-bytes)"
    if length is not None:
        if not length.isdigit():
            raise APIError(400, f"Content-Length header {length[:40]!r} is not a number")
        if int(length) > limit:
            raise APIError(413, f"request body of {int(length):,} bytes is over this server's limit of "
                           f"{limit:,} bytes (--max-body-bytes)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, too_big, code="request_too_large")
        chunks.append(chunk)
    return p.decode_json_body(b"".join(chunks))


# ---- middleware -------------------------------------------------------------------------------------------


class Gate:
    """Every /v1 request: the API key (when set; constant-time), then 503 while loading or draining.
    Also counts requests in flight and writes one JSON log line per request when its response ends."""

    def __init__(self, app, backend: Backend) -> None:
        self.app, self.backend = app, backend
        key = backend.options.api_key
        self.key = key.encode() if key else None

    def refusal(self, scope) -> APIError | None:
        if not scope["path"].startswith("/v1") or scope["method"] == "OPTIONS":
            return None
        if self.key is not None:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not (hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer"):
                message = "missing API key" if not given else "invalid API key"
                return APIError(401, f"Authorization: {message}; send 'Authorization: Bearer KEY' with the "
                                "server's --api-key", type="invalid_request_error", code="invalid_api_key")
        if self.backend.draining:
            return unavailable("the server is shutting down")
        if not self.backend.ready:
            return unavailable("the model is still loading" if self.backend.load_error is None
                               else f"the model failed to load ({self.backend.load_error})")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        log = scope.setdefault("lmforge.log", {})
        start, status = time.monotonic(), [0]

        async def send_logged(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.backend.active += 1
        try:
            error = self.refusal(scope)
            if error is not None:
                log["error"] = error.message
                return await error_response(error)(scope, receive, send_logged)
            await self.app(scope, receive, send_logged)
        finally:
            self.backend.active -= 1
            if scope["path"].startswith("/v1"):
                record = {"id": log.pop("id", None), "route": scope["path"], "status": status[0] or 499, **log,
                          "e2e_s": round(time.monotonic() - start, 4)}
                logger.info(json.dumps(record, ensure_ascii=False))


# ---- the app ----------------------------------------------------------------------------------------------


def create_app(options: ServeOptions, *, model=None, tokenizer=None) -> FastAPI:
    """The server's app. Without `model` it loads `options.ckpt` in the background at startup (/health
    answers 503 until then); with one (and its tokenizer) it is ready as soon as it starts."""
    backend = Backend(options, model, tokenizer)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = None
        if model is not None:
            await backend.start()
        else:
            task = asyncio.create_task(backend.start())
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
            if not backend.draining and backend.scheduler is not None:
                await backend.drain(options.drain_timeout)
            backend.close()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    app.add_middleware(Gate, backend=backend)
    if options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    add_error_handlers(app)
    add_routes(app)
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        request.scope.setdefault("lmforge.log", {})["error"] = error.message
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"{request.method} {request.url.path}: no such route; see /v1/models, /v1/chat/completions"
        else:
            message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(APIError(error.status_code, message, code=str(error.status_code),
                                       headers=dict(error.headers or {})))


def add_routes(app: FastAPI) -> None:
    from lmforge.serve.rag import add_rag_route

    add_generation_routes(app)
    add_embedding_route(app)
    add_rag_route(app)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        backend = backend_of(request)
        if backend.ready and not backend.draining:
            return JSONResponse({"status": "ok", "model": backend.name})
        status = "draining" if backend.draining else "error" if backend.load_error else "loading"
        body = {"status": status, **({"error": backend.load_error} if backend.load_error else {})}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        content, content_type = backend_of(request).metrics.render()
        return Response(content, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        backend = backend_of(request)
        return JSONResponse(p.models_response(backend.names(), backend.created))

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        index = STATIC / "index.html"
        if not index.is_file():
            raise StarletteHTTPException(404)
        return FileResponse(index, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
                                            "Content-Security-Policy": "frame-ancestors 'none'",
                                            "X-Frame-Options": "DENY"})  # no framing (clickjacking)

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")


async def event_stream(chunks: AsyncIterator[str], handles, request: Request) -> AsyncIterator[str]:
    """The SSE body; whatever ends it early (the client gone included) cancels unfinished handles."""
    finished = False
    try:
        async for chunk in chunks:
            yield chunk
        finished = True
    finally:
        if not finished:
            note(request, error="client disconnected", completion_tokens=sum(h.completion_tokens for h in handles))
        cancel_all(handles)


def sse_response(chunks: AsyncIterator[str], handles, request: Request) -> StreamingResponse:
    return StreamingResponse(event_stream(chunks, handles, request), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- generation ---------------------------------------------------------------------------------------------


def note(request: Request, **fields) -> None:
    """Fields for the request's log line."""
    request.scope.setdefault("lmforge.log", {}).update(fields)


async def merge(handles) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, Delta) from all handles as they come; ends when every handle has ended."""
    if len(handles) == 1:
        async for delta in handles[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle) -> None:
        try:
            async for delta in handle:
                queue.put_nowait((i, delta))
            queue.put_nowait((i, None))
        except Exception as e:  # noqa: BLE001 - raised again by the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        ended = 0
        while ended < len(handles):
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                ended += 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


class ChatFormat:
    """Chunks and the final object of /v1/chat/completions."""

    kind = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, logprobs: bool, include_usage: bool) -> None:
        self.id, self.model, self.logprobs, self.usage = request_id, model, logprobs, include_usage
        self.created = int(time.time())

    def chunk(self, index: int, delta: dict, **kw) -> dict:
        return p.chat_chunk(self.id, self.model, self.created, index, delta, with_usage=self.usage, **kw)

    def start(self, index: int) -> dict | None:
        return self.chunk(index, {"role": "assistant", "content": ""})

    def piece(self, index: int, delta) -> dict | None:
        if not delta.text and not delta.logprobs:
            return None
        logprobs = p.chat_logprobs(delta.logprobs) if self.logprobs and delta.logprobs else None
        return self.chunk(index, {"content": delta.text}, logprobs=logprobs)

    def end(self, index: int, reason: str) -> dict:
        return self.chunk(index, {}, finish_reason=reason)

    def response(self, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
        for c in choices:
            c["logprobs"] = p.chat_logprobs(c["tokens"]) if self.logprobs else None
        return p.chat_response(self.id, self.model, choices, prompt_tokens, completion_tokens)


class CompletionFormat(ChatFormat):
    """Chunks and the final object of /v1/completions."""

    kind = "text_completion"

    def __init__(self, request_id: str, model: str, logprobs: bool, include_usage: bool) -> None:
        super().__init__(request_id, model, logprobs, include_usage)
        self.offsets: dict[int, int] = {}

    def chunk(self, index: int, text: str, **kw) -> dict:
        return p.completion_chunk(self.id, self.model, self.created, index, text, with_usage=self.usage, **kw)

    def start(self, index: int) -> dict | None:
        return None

    def piece(self, index: int, delta) -> dict | None:
        if not delta.text and not delta.logprobs:
            return None
        logprobs = None
        if self.logprobs and delta.logprobs:
            logprobs = p.completion_logprobs(delta.logprobs, self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + sum(len(t.token) for t in delta.logprobs)
        return self.chunk(index, delta.text, logprobs=logprobs)

    def end(self, index: int, reason: str) -> dict:
        return self.chunk(index, "", finish_reason=reason)

    def response(self, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
        for c in choices:
            c["logprobs"] = p.completion_logprobs(c["tokens"]) if self.logprobs else None
        return p.completion_response(self.id, self.model, choices, prompt_tokens, completion_tokens)


def note_usage(request: Request, handles, reasons: list) -> int:
    """Log the completion tokens, first-token latency and finish reasons; the completion tokens."""
    completion = sum(h.completion_tokens for h in handles)
    firsts = [h.first_token_at - h.queued_at for h in handles if h.first_token_at is not None]
    note(request, completion_tokens=completion, ttft_s=round(min(firsts), 4) if firsts else None,
         finish_reason=reasons[0] if len(set(reasons)) == 1 else reasons)
    return completion


async def stream_chunks(fmt: ChatFormat, handles, prompt_tokens: int, request: Request) -> AsyncIterator[str]:
    """The SSE events of a streamed request: each choice's pieces, its finish, usage if asked, [DONE]."""
    for i in range(len(handles)):
        first = fmt.start(i)
        if first is not None:
            yield p.sse(first)
    reasons: list = [None] * len(handles)
    try:
        async for i, delta in merge(handles):
            chunk = fmt.piece(i, delta)
            if chunk is not None:
                yield p.sse(chunk)
            if delta.finish_reason is not None:
                reasons[i] = delta.finish_reason
                yield p.sse(fmt.end(i, delta.finish_reason))
    except Exception as e:  # noqa: BLE001 - the stream has begun: the error goes in the stream
        logger.exception("generation failed")
        note(request, error=f"{type(e).__name__}: {e}")
        yield p.sse(APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error").body())
        return
    completion = note_usage(request, handles, reasons)
    if fmt.usage:
        yield p.sse(p.usage_chunk(fmt.kind, fmt.id, fmt.model, fmt.created, prompt_tokens, completion))
    yield p.sse("[DONE]")


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(handles, request: Request) -> list[dict] | None:
    """Every choice's {"text", "tokens" (logprobs), "finish_reason"}; None if the client left first
    (its requests are cancelled then)."""
    choices = [{"text": "", "tokens": [], "finish_reason": None} for _ in handles]

    async def gather() -> None:
        async for i, delta in merge(handles):
            choices[i]["text"] += delta.text
            choices[i]["tokens"] += delta.logprobs or []
            choices[i]["finish_reason"] = delta.finish_reason or choices[i]["finish_reason"]

    work, gone = asyncio.create_task(gather()), asyncio.create_task(until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, gone):
            task.cancel()
        cancel_all(handles)
    if not work.done() or work.cancelled():
        note(request, error="client disconnected")
        return None
    work.result()  # a generation error: 500
    return choices


async def generate(request: Request, fmt: ChatFormat, handles, prompt_tokens: int, stream: bool) -> Response:
    if stream:
        return sse_response(stream_chunks(fmt, handles, prompt_tokens, request), handles, request)
    choices = await collect(handles, request)
    if choices is None:
        return Response(status_code=499)
    completion = note_usage(request, handles, [c["finish_reason"] for c in choices])
    return JSONResponse(fmt.response(choices, prompt_tokens, completion))


def chat_prompt(backend: Backend, messages: list[dict[str, str]]) -> list[int]:
    if backend.template is None:
        raise APIError(400, f"messages: {backend.name} has no chat template ({backend.template_error}); "
                       "use /v1/completions", param="messages")
    try:
        return list(backend.template.encode(messages, add_generation_prompt=True))
    except Exception as e:  # noqa: BLE001 - the chat template refused these messages
        raise p.bad("messages", f"the chat template refused them: {e}") from None


def completion_prompts(backend: Backend, prompts: list) -> list[list[int]]:
    from lmforge.infer.generate import encode_source

    vocab = backend.model.config.vocab_size
    out = []
    for prompt in prompts:
        if isinstance(prompt, list):
            if not all(0 <= t < vocab for t in prompt):
                raise p.bad("prompt", f"token ids must be in 0..{vocab - 1}")
            out.append(prompt)
        elif has_capability(backend.model, "encoder_decoder"):
            out.append(encode_source(backend.tokenizer, prompt))
        else:
            out.append(backend.tokenizer.encode(prompt))
    return out


def add_generation_routes(app: FastAPI) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        backend = backend_of(request)
        chat = p.parse_chat(await read_json(request, backend.options.max_body_bytes), backend.options)
        adapter = backend.generator_for(chat.model)
        ids = chat_prompt(backend, chat.messages)
        request_id = p.new_id("chatcmpl")
        model = chat.model or backend.name
        note(request, id=request_id, model=model, prompt_tokens=len(ids))
        handles = backend.submit([ids], chat.sampling, backend.template.stop_ids, adapter, chat.top_logprobs,
                                 request_id, "messages")
        fmt = ChatFormat(request_id, model, chat.top_logprobs is not None, chat.include_usage)
        return await generate(request, fmt, handles, len(ids), chat.stream)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        backend = backend_of(request)
        req = p.parse_completion(await read_json(request, backend.options.max_body_bytes), backend.options)
        adapter = backend.generator_for(req.model)
        prompts = completion_prompts(backend, req.prompts)
        request_id = p.new_id("cmpl")
        model = req.model or backend.name
        prompt_tokens = sum(len(ids) for ids in prompts)
        note(request, id=request_id, model=model, prompt_tokens=prompt_tokens)
        eos = eos_id_of(backend.tokenizer)
        handles = backend.submit(prompts, req.sampling, {eos} if eos is not None else set(), adapter,
                                 req.top_logprobs, request_id, "prompt")
        fmt = CompletionFormat(request_id, model, req.top_logprobs is not None, req.include_usage)
        return await generate(request, fmt, handles, prompt_tokens, req.stream)


# ---- embeddings ---------------------------------------------------------------------------------------------


def embed(backend: Backend, texts: list[str]):
    """(vectors, prompt tokens) of `texts` from the embedder (blocking; one at a time)."""
    from lmforge.infer.embed import embed_texts

    model, tokenizer, max_length, _ = backend.embedder
    with backend.embed_lock:
        tokens = sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"])
        return embed_texts(model, tokenizer, texts, max_length=max_length), tokens


def add_embedding_route(app: FastAPI) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        backend = backend_of(request)
        req = p.parse_embedding(await read_json(request, backend.options.max_body_bytes))
        if backend.embedder is None:
            raise APIError(400, "model: this server has no embedding model; start it with --embedder CKPT "
                           "(an encoder checkpoint)", param="model", code="model_not_supported")
        name = backend.embedder[3]
        if req.model is not None and req.model != name:
            if req.model in backend.names():
                raise APIError(400, f"model: {req.model} generates text; embeddings come from {name}",
                               param="model", code="model_not_supported")
            raise APIError(404, f"model: {req.model!r} does not exist here; GET /v1/models lists {backend.names()}",
                           param="model", code="model_not_found")
        note(request, id=p.new_id("embd"), model=name)
        try:
            vectors, tokens = await asyncio.to_thread(embed, backend, req.texts)
        except UserError as e:
            raise p.bad("input", str(e)) from None
        note(request, prompt_tokens=tokens)
        return JSONResponse(p.embeddings_response(name, vectors, req.base64, tokens))
