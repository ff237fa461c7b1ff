"""Continuous batching for the server: one thread owns the model and an `Engine`; asyncio code submits.

    scheduler = Scheduler(model, tokenizer, max_batch=16, max_queue=64, metrics=ServeMetrics("m"))
    scheduler.start()                                   # inside the running event loop
    handle = scheduler.submit(GenerationRequest(prompt_ids, SamplingParams(max_new_tokens=64, seed=1),
                                                stops=["\\n\\n"]))   # QueueFull -> 429, Draining -> 503
    async for delta in handle:                          # Delta(text, token_ids, logprobs, finish_reason)
        ...                                             # handle.cancel() when the client goes away
    await scheduler.drain(timeout=30); scheduler.close()

The engine thread loops: take what was submitted (it joins the engine's queue), remove what was
cancelled (its row is free for this step), run one `Engine.step` (queued requests join while rows
are free and are prefilled; every running request gets one token; finished ones leave), and send
each request's new text to the event loop (one `loop.call_soon_threadsafe` per step puts every
Delta into its request's own asyncio.Queue). With nothing to do it sleeps on a condition. Each
request samples with its own `SamplingParams` and seed (its own generator), so its tokens are
those it would get alone (`lmforge.infer.generate.generate` with that seed): batching changes
nothing but the round-off of batched matmuls. A short request never waits for a long one: it joins at the next step.

A request's text goes through its own `TextStream` (never a broken UTF-8 character; stop
strings end it with finish_reason "stop"). A token in `params.stop_ids` ends it with "stop" and
is no text (not in `Delta.token_ids` either); max_new_tokens or a full context end it with
"length". `Handle.completion_tokens` counts every token the model generated (a stop id too).
Two more finish reasons: "cancelled" (the last Delta of a request cancelled by `Handle.cancel`,
or still running at `close`) and "error": an exception in an engine step fails the requests of
that step (logged with its traceback; the engine is rebuilt, queued requests keep their place)
and the thread goes on serving.

The queue bound counts requests not yet running (submitted, waiting for a row); when it is full,
`submit` raises `QueueFull` whose `retry_after` (seconds) is the mean time between request
finishes over the last minute (1 to 60 s). `drain` refuses new requests (`Draining`) and waits for the running and
queued ones. Torch's thread settings are left as they are.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from lmforge.infer.detok import TextStream, token_bytes, token_text
from lmforge.infer.engine import Engine, Event, SamplingParams

__all__ = ["Delta", "Draining", "GenerationRequest", "Handle", "QueueFull", "Scheduler", "TokenLogprob"]

log = logging.getLogger("lmforge.serve.scheduler")


@dataclass
class TokenLogprob:
    """One generated token, for OpenAI logprobs: its text (bytes that are not a whole character
    written as `\\xe4` escapes), log-probability, UTF-8 bytes, and the most likely tokens (text,
    logprob, bytes), best first (empty unless top_logprobs was asked)."""

    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]


@dataclass
class Delta:
    """One piece of one request's output, in order: new final text (may be ""), the token ids it
    came from, their logprobs (when asked), and on the last Delta the finish reason ("stop",
    "length", "cancelled" or "error")."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class GenerationRequest:
    """What to generate: prompt ids, sampling (stop_ids: eos / the chat template's end ids;
    max_new_tokens already capped), stop strings, the adapter's name (None: the base model)."""

    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str] = field(default_factory=list)
    adapter: str | None = None
    request_id: str = ""


class QueueFull(Exception):
    """The queue of requests not yet running is full; try again in `retry_after` seconds (429)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the server is busy (queue full); retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class Draining(Exception):
    """The server is shutting down and takes no new requests (503)."""


class Handle:
    """A submitted request: iterate it (`async for delta in handle`) for its Deltas, which end
    with the one that has a finish_reason. Times are `time.monotonic()`; the counts and times are
    final once the last Delta has arrived."""

    def __init__(self, request_id: str, prompt_tokens: int, scheduler: Scheduler) -> None:
        self.request_id, self.prompt_tokens, self.completion_tokens = request_id, prompt_tokens, 0
        self.queued_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.finish_reason: str | None = None
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()
        self._scheduler = scheduler
        self._job: _Job | None = None
        self._done = False  # the last Delta was taken

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[Delta]:
        while not self._done:
            delta = await self._queue.get()
            self._done = delta.finish_reason is not None
            yield delta

    def cancel(self) -> None:
        """The client is gone: the request leaves the batch at the next engine step (no-op once finished)."""
        self._scheduler.cancel(self)


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    handle: Handle
    stream: TextStream
    engine_id: int | None = None
    last_token_at: float = 0.0
    cancelled: bool = False
    done: bool = False


class Scheduler:
    """Continuous batching over one model for asyncio callers (see the module doc)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 16, max_queue: int = 64,
                 metrics: Any = None, autocast_dtype: Any = None, adapters: Any = None) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model, self.tokenizer, self.metrics, self.adapters = model, tokenizer, metrics, adapters
        self.max_batch, self.max_queue, self.autocast_dtype = max_batch, max_queue, autocast_dtype
        self.engine = self._new_engine()
        token_bytes(tokenizer)  # the tokenizer's token -> bytes table, made once here rather than in a request
        self._cond = threading.Condition()
        self._incoming: deque[_Job] = deque()
        self._cancels: list[_Job] = []
        self._live: set[_Job] = set()  # submitted, not finished
        self._jobs: dict[int, _Job] = {}  # by engine id (engine thread only)
        self._running = 0
        self._finishes: deque[float] = deque(maxlen=256)  # when requests finished (retry_after)
        self._outbox: list[tuple[asyncio.Queue, Delta]] = []  # Deltas for the event loop (engine thread)
        self._ids = itertools.count(1)
        self._draining = self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _new_engine(self) -> Engine:
        hook = self.adapters.set_rows if self.adapters is not None else None
        return Engine(self.model, self.max_batch, autocast_dtype=self.autocast_dtype, before_forward=hook)

    # ---- the event loop's side ----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Started, and neither draining nor closed."""
        return self._thread is not None and self._thread.is_alive() and not (self._draining or self._closing)

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._live) - self._running

    def start(self) -> None:
        """Start the engine thread; call from inside the running event loop (Deltas go to it)."""
        if self._thread is not None:
            raise RuntimeError("the scheduler is already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, name="lmforge-engine", daemon=True)
        self._thread.start()
        self._report_load()

    def submit(self, request: GenerationRequest) -> Handle:
        """Queue a request (event-loop thread); its Handle. Draining while draining or closed,
        QueueFull when max_queue requests already wait, ValueError for an empty prompt, one longer
        than the context, or an adapter the scheduler does not have."""
        self._check(request)
        with self._cond:
            if self._draining or self._closing or self._thread is None:
                raise Draining("the server is shutting down" if self._thread else "the scheduler is not started")
            if len(self._live) - self._running >= self.max_queue:
                if self.metrics is not None:
                    self.metrics.on_rejected()
                raise QueueFull(self._retry_after())
            request_id = request.request_id or f"req-{next(self._ids)}"
            handle = Handle(request_id, len(request.prompt_ids), self)
            job = _Job(request, handle, TextStream(self.tokenizer, request.stops))
            self._live.add(job)
            self._incoming.append(job)
            handle._job = job
            self._cond.notify()
        self._report_load()
        return handle

    def _check(self, request: GenerationRequest) -> None:
        block_size = self.engine.block_size
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        if len(request.prompt_ids) > block_size:
            raise ValueError(f"the prompt has {len(request.prompt_ids)} tokens; the context holds {block_size}")
        if request.adapter is not None and (self.adapters is None or request.adapter not in self.adapters):
            raise ValueError(f"no adapter named {request.adapter!r}")

    def _retry_after(self) -> float:
        """Seconds until a queued request is likely to start: the mean time between request finishes
        over the last minute (1 s with no history; at most 60 s)."""
        now = time.monotonic()
        recent = [t for t in self._finishes if now - t <= 60.0]
        if not recent:
            return 1.0
        return min(60.0, max(1.0, (now - recent[0]) / len(recent)))

    def cancel(self, handle: Handle) -> None:
        """`handle.cancel()`: the request leaves at the next engine step (its last Delta: "cancelled")."""
        job = handle._job
        with self._cond:
            if job is None or job.done or job.cancelled:
                return
            job.cancelled = True
            self._cancels.append(job)
            self._cond.notify()

    async def drain(self, timeout: float | None = None) -> None:
        """Take no new requests (Draining); wait until the running and queued ones have finished.
        After `timeout` seconds the rest are cancelled."""
        with self._cond:
            self._draining = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._live:
            if deadline is not None and time.monotonic() >= deadline:
                for job in list(self._live):
                    job.handle.cancel()
                deadline = None
            await asyncio.sleep(0.01)

    def close(self) -> None:
        """Stop the engine thread (after `drain`, or at once: requests still live end "cancelled")."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # ---- the engine thread ---------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while True:
                work = self._wait_for_work()
                if work is None:
                    break
                new, cancels = work
                self._admit(new)
                self._drop(cancels)
                if self.engine.has_work:
                    self._step()
                self._flush()
        except Exception:  # a bug outside a step: nothing can be served any more; say so, end every request
            log.exception("the engine thread stopped")
        finally:
            with self._cond:
                self._closing = True
                left = list(self._live)
            for job in left:
                self._finish(job, Delta("", [], None, "cancelled"))
            self._flush()

    def _wait_for_work(self) -> tuple[list[_Job], list[_Job]] | None:
        with self._cond:
            while not (self._incoming or self._cancels or self._closing or self.engine.has_work):
                self._cond.wait()
            if self._closing:
                return None
            new, cancels = list(self._incoming), self._cancels
            self._incoming.clear()
            self._cancels = []
        return new, cancels

    def _admit(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if job.cancelled:
                self._finish(job, Delta("", [], None, "cancelled"))
                continue
            request = job.request
            try:
                job.engine_id = self.engine.add(request.prompt_ids, request.params, tag=request.adapter)
            except Exception:
                log.exception("request %s could not join the engine", job.handle.request_id)
                self._finish(job, Delta("", [], None, "error"))
                continue
            self._jobs[job.engine_id] = job

    def _drop(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if job.done:
                continue
            if job.engine_id is not None:
                self.engine.remove(job.engine_id)
                self._jobs.pop(job.engine_id, None)
            self._finish(job, Delta("", [], None, "cancelled"))

    def _step(self) -> None:
        started = time.monotonic()
        try:
            events = self.engine.step()
        except Exception as exc:
            self._recover(exc)
            return
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.on_step(len(events))
        for event in events:
            job = self._jobs.get(event.request_id)
            if job is None or job.done:
                continue
            try:
                self._deliver(job, event, started, now)
            except Exception:
                log.exception("request %s failed", job.handle.request_id)
                if self.engine.is_active(event.request_id):
                    self.engine.remove(event.request_id)
                self._jobs.pop(event.request_id, None)
                self._finish(job, Delta("", [], None, "error"))
        self._report_load()

    def _recover(self, exc: Exception) -> None:
        """A step failed: its requests (the running rows) end with "error"; a fresh engine takes
        the queued ones in their order (same seeds, so the same tokens)."""
        log.error("an engine step failed; its %d requests end with an error", len(self.engine.running),
                  exc_info=exc)
        failed = [self._jobs.pop(r.id) for r in self.engine.running if r.id in self._jobs]
        queued = [self._jobs.pop(r.id) for r in self.engine.waiting if r.id in self._jobs]
        for job in failed:
            self._finish(job, Delta("", [], None, "error"))
        self.engine = self._new_engine()
        self._admit(queued)

    def _deliver(self, job: _Job, event: Event, started: float, now: float) -> None:
        """One token of one request: metrics, its text, a Delta (the last one if it ended)."""
        handle, params = job.handle, job.request.params
        if handle.first_token_at is None:
            handle.first_token_at = now
            with self._cond:
                self._running += 1
            if self.metrics is not None:
                self.metrics.on_start(started - handle.queued_at, handle.prompt_tokens)
                self.metrics.on_token(ttft=now - handle.queued_at)
        elif self.metrics is not None:
            self.metrics.on_token(itl=now - job.last_token_at)
        job.last_token_at = now
        handle.completion_tokens += 1
        is_stop_id = event.finished and event.reason == "stop" and event.token_id in params.stop_ids
        text, ids, logprobs = "", [], None
        if not is_stop_id:
            text, ids = job.stream.push(event.token_id), [event.token_id]
            logprobs = [self._logprob(event)] if params.logprobs else None
        reason = None
        if job.stream.stopped:
            reason = "stop"
            if not event.finished:
                self.engine.remove(event.request_id)
        elif event.finished:
            reason = event.reason
            text += job.stream.finish()
        if reason is None:
            self._post(job, Delta(text, ids, logprobs))
        else:
            self._jobs.pop(event.request_id, None)
            self._finish(job, Delta(text, ids, logprobs, reason))

    def _logprob(self, event: Event) -> TokenLogprob:
        text, raw = token_text(self.tokenizer, event.token_id)
        top = []
        for token_id, logprob in event.top_logprobs or ():
            top_text, top_raw = token_text(self.tokenizer, token_id)
            top.append((top_text, logprob, list(top_raw)))
        return TokenLogprob(text, event.logprob, list(raw), top)

    def _finish(self, job: _Job, delta: Delta) -> None:
        handle = job.handle
        handle.finished_at = time.monotonic()
        handle.finish_reason = delta.finish_reason
        with self._cond:
            job.done = True
            self._live.discard(job)
            if handle.first_token_at is not None:
                self._running -= 1
            self._finishes.append(handle.finished_at)
        if self.metrics is not None:
            reason = "abort" if delta.finish_reason == "cancelled" else delta.finish_reason
            self.metrics.on_finish(reason, handle.finished_at - handle.queued_at)
        self._post(job, delta)
        self._report_load()

    def _post(self, job: _Job, delta: Delta) -> None:
        self._outbox.append((job.handle._queue, delta))

    def _flush(self) -> None:
        """Send the Deltas gathered since the last flush to the event loop: one wake-up per step."""
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        try:
            self._loop.call_soon_threadsafe(_deliver_all, batch)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _report_load(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(self.running, self.waiting)


def _deliver_all(batch: list[tuple[asyncio.Queue, Delta]]) -> None:
    """On the event loop: each Delta into its request's queue."""
    for queue, delta in batch:
        queue.put_nowait(delta)
