"""Prometheus metrics of the server, under the names vLLM's dashboards read.

    metrics = ServeMetrics("my-model")            # its own CollectorRegistry (several servers per process)
    scheduler = Scheduler(model, tokenizer, metrics=metrics)
    body, content_type = metrics.render()         # GET /metrics

Every series carries the label `model_name`; the prefix is `lmforge` (`lmforge:num_requests_running`)
or, with `prefix="vllm"`, exactly vLLM's names. The scheduler reports (from its engine thread; the
client library is thread-safe): `set_load` whenever the number of running/waiting requests
changes, `on_start` when a request's first token is out (its queue time and prompt tokens),
`on_token` for every generated token (its time to first token or inter-token latency),
`on_finish` when a request ends (its end-to-end latency and finish reason: "stop", "length",
"abort" for a cancelled request, "error"), `on_step` for every engine step (its batch size), and
`on_rejected` when the queue is full.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServeMetrics"]

# vLLM's buckets
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """The server's gauges, counters and histograms in a registry of their own (see the module doc)."""

    def __init__(self, model_name: str, prefix: str = "lmforge") -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def name(short: str) -> str:
            return f"{prefix}:{short}"

        def histogram(short: str, doc: str, buckets) -> Histogram:
            return Histogram(name(short), doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        def counter(short: str, doc: str):
            return Counter(name(short), doc, labels, registry=self.registry).labels(model_name)

        reg = self.registry
        self.running = Gauge(name("num_requests_running"), "Requests in the running batch.", labels,
                             registry=reg).labels(model_name)
        self.waiting = Gauge(name("num_requests_waiting"), "Requests queued, not yet running.", labels,
                             registry=reg).labels(model_name)
        # prometheus_client adds _total to a counter's name
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of the requests that started.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.rejected = counter("num_requests_rejected", "Requests refused because the queue was full.")
        self.success = Counter(name("request_success"), "Requests finished, by finish reason.",
                               [*labels, "finished_reason"], registry=reg)
        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between two tokens of a request.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the end of a request.", E2E_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time from arrival to joining the batch.",
                                    QUEUE_BUCKETS)
        self.batch_size = histogram("batch_size", "Requests in each engine step.", BATCH_BUCKETS)

    # ---- what the scheduler reports ---------------------------------------------------------

    def set_load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def on_rejected(self) -> None:
        self.rejected.inc()

    def on_start(self, queue_time: float, prompt_tokens: int) -> None:
        self.queue_time.observe(max(0.0, queue_time))
        self.prompt_tokens.inc(prompt_tokens)

    def on_token(self, ttft: float | None = None, itl: float | None = None) -> None:
        self.generation_tokens.inc()
        if ttft is not None:
            self.ttft.observe(max(0.0, ttft))
        if itl is not None:
            self.itl.observe(max(0.0, itl))

    def on_finish(self, reason: str, e2e: float) -> None:
        self.success.labels(self.model_name, reason).inc()
        self.e2e.observe(max(0.0, e2e))

    def on_step(self, batch_size: int) -> None:
        self.batch_size.observe(batch_size)

    # ---- exposition ---------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """(Prometheus text exposition, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
