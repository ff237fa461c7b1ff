"""Serving: `lmforge serve`, an OpenAI-compatible HTTP server over continuous batching.

- `lmforge.serve.scheduler`: `Scheduler` (one engine thread batches every request), `GenerationRequest`,
  `Handle` (async iterator of `Delta`s, `cancel()`), `TokenLogprob`, `QueueFull`, `Draining`.
- `lmforge.serve.metrics`: `ServeMetrics` (Prometheus, vLLM's metric names).
- `lmforge.serve.protocol`, `lmforge.serve.app`, `lmforge.serve.server`: the HTTP API and the command.

Nothing is imported here: each module loads its heavy dependencies (torch, FastAPI) only when used.
"""
