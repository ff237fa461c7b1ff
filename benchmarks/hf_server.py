"""The peer of benchmarks/serve_load.py: a plain OpenAI-style chat server over `transformers`' `generate`.

    python benchmarks/hf_server.py --hf runs/demo/hf --port 8001        # after `lmforge convert to-hf`
    curl -N 127.0.0.1:8001/v1/chat/completions -d '{"messages": [{"role": "user", "content": "hi"}],
         "max_tokens": 16, "stream": true, "ignore_eos": true}'

What a straightforward server built on transformers does, with no batching across requests:
the model converted to Hugging Face (`lmforge convert to-hf`) loaded with
`AutoModelForCausalLM`, and every request answered by its own `model.generate` call running in
a thread of its own (a thread per request, started by the request; the requests overlap as a
plain threaded server's do, each doing batch-1 forwards, and torch's intra-op threads are shared
by all of them). Tokens stream back through transformers' `AsyncTextIteratorStreamer` (its
text, decoded as transformers decodes) as server-sent events ending with `data: [DONE]`.
`--max-concurrent N` caps the generate calls running at once (the rest wait; 0 = no cap).

The prompt ids are built with lmforge's own chat template of the checkpoint
(`lmforge.tokenizer.chat.chat_template` on the tokenizer.json next to the weights), the ids
`lmforge serve` builds, so both servers generate from identical inputs. Generation stops at the
template's stop ids and eos (as lmforge's), or after `max_tokens`; `ignore_eos: true` (vLLM's
request field; `min_tokens` too) makes it write exactly `max_tokens` tokens (transformers'
`min_new_tokens`: the stop ids are masked until then), so a benchmark compares equal work.
Request fields read: messages, max_tokens, temperature (0 = greedy), top_p, top_k, stream,
stream_options.include_usage, ignore_eos, min_tokens; `seed` is not honoured (transformers'
sampling draws from torch's global generator, shared by the threads). Routes: /health,
/v1/models, /v1/chat/completions.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AsyncTextIteratorStreamer, StoppingCriteria, StoppingCriteriaList

DEFAULT_MAX_TOKENS = 16


@dataclass
class Peer:
    """The loaded model: transformers' model and tokenizer, lmforge's chat template, the stop ids."""

    model: Any
    hf_tokenizer: Any
    template: Any
    stop_ids: list[int]
    name: str
    context: int


def load_peer(hf_dir: str | Path, *, device: str = "cpu", dtype: str | None = None) -> Peer:
    """The HF dir `lmforge convert to-hf` wrote, loaded with transformers (and lmforge's chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.chat import chat_template

    hf_dir = Path(hf_dir)
    name = dtype or "float32"
    torch_dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(name, name))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype).to(device).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    template = chat_template(Tokenizer.load(hf_dir / "tokenizer.json"))
    stops = set(template.stop_ids) | ({hf_tokenizer.eos_token_id} if hf_tokenizer.eos_token_id is not None else set())
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    return Peer(model, hf_tokenizer, template, sorted(stops), hf_dir.name, context)


class CountingStreamer(AsyncTextIteratorStreamer):
    """transformers' `AsyncTextIteratorStreamer` (prompt skipped) that also counts the generated tokens."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.tokens, self.last_id = 0, None

    def put(self, value) -> None:
        if not self.next_tokens_are_prompt:
            ids = value.reshape(-1).tolist()
            self.tokens += len(ids)
            self.last_id = ids[-1] if ids else self.last_id
        super().put(value)


class Cancelled(StoppingCriteria):
    """Stops generate at the next token once `event` is set (the client went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def generation_kwargs(peer: Peer, body: dict[str, Any], prompt_ids: list[int]) -> dict[str, Any]:
    """`model.generate`'s arguments for one request (batch 1)."""
    max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS)
    min_tokens = max_tokens if body.get("ignore_eos") else int(body.get("min_tokens") or 0)
    temperature = 1.0 if body.get("temperature") is None else float(body["temperature"])
    ids = torch.tensor([prompt_ids], device=peer.model.device)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": max_tokens,
                              "min_new_tokens": min(min_tokens, max_tokens), "eos_token_id": peer.stop_ids,
                              "pad_token_id": peer.hf_tokenizer.pad_token_id or peer.stop_ids[0],
                              "do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=float(body.get("top_p") or 1.0), top_k=int(body.get("top_k") or 0))
    return kwargs


def check_request(peer: Peer, body: Any) -> list[int]:
    """The prompt ids of a chat request; ValueError (-> 400) for a request the peer cannot serve."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise ValueError("'messages' must be a non-empty list")
    prompt_ids = peer.template.encode(body["messages"], add_generation_prompt=True)
    max_tokens = int(body.get("max_tokens") or DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    if peer.context and len(prompt_ids) + max_tokens > peer.context:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceed the context "
                         f"({peer.context} tokens)")
    return prompt_ids


class Generation:
    """One request's `model.generate`, in a thread of its own; `stream` yields its text pieces."""

    def __init__(self, peer: Peer, kwargs: dict[str, Any], gate: threading.Semaphore | None) -> None:
        self.peer, self.gate, self.error = peer, gate, None
        self.cancelled = threading.Event()
        self.streamer = CountingStreamer(peer.hf_tokenizer)
        kwargs = {**kwargs, "streamer": self.streamer,
                  "stopping_criteria": StoppingCriteriaList([Cancelled(self.cancelled)])}
        self.thread = threading.Thread(target=self._run, args=(kwargs,), daemon=True)
        self.thread.start()

    def _run(self, kwargs: dict[str, Any]) -> None:
        try:
            if self.gate is not None:
                self.gate.acquire()
            try:
                with torch.inference_mode():
                    self.peer.model.generate(**kwargs)
            finally:
                if self.gate is not None:
                    self.gate.release()
        except Exception as e:  # noqa: BLE001 - reported to the client as a server error
            self.error = f"{type(e).__name__}: {e}"
            self.streamer.end()

    @property
    def finish_reason(self) -> str:
        return "stop" if self.streamer.last_id in self.peer.stop_ids else "length"


def chunk(rid: str, model: str, delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


async def sse_events(gen: Generation, rid: str, prompt_tokens: int, include_usage: bool):
    """The server-sent events of one streamed reply."""
    try:
        yield chunk(rid, gen.peer.name, {"role": "assistant", "content": ""})
        async for text in gen.streamer:
            if text:
                yield chunk(rid, gen.peer.name, {"content": text})
        if gen.error:
            yield f"data: {json.dumps({'error': {'message': gen.error, 'type': 'server_error'}})}\n\n"
            return
        yield chunk(rid, gen.peer.name, {}, gen.finish_reason)
        if include_usage:
            n = gen.streamer.tokens
            yield chunk(rid, gen.peer.name, {}, usage={"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                       "total_tokens": prompt_tokens + n})
        yield "data: [DONE]\n\n"
    finally:
        gen.cancelled.set()  # a no-op when generate has ended; else the client went away


def create_app(peer: Peer, *, max_concurrent: int = 0):
    """The FastAPI app: /health, /v1/models, /v1/chat/completions (streamed or not)."""
    app = FastAPI(title="hf peer")
    gate = threading.Semaphore(max_concurrent) if max_concurrent > 0 else None

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": peer.name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": peer.name, "object": "model", "owned_by": "hf-peer"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = json.loads(await request.body())
            prompt_ids = check_request(peer, body)
            kwargs = generation_kwargs(peer, body, prompt_ids)
        except (ValueError, TypeError) as e:
            return error(400, str(e))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = Generation(peer, kwargs, gate)
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(sse_events(gen, rid, len(prompt_ids), usage), media_type="text/event-stream")
        return await complete(gen, rid, len(prompt_ids))

    async def complete(gen: Generation, rid: str, prompt_tokens: int):
        text = "".join([piece async for piece in gen.streamer])
        if gen.error:
            return error(500, gen.error)
        n = gen.streamer.tokens
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": peer.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": gen.finish_reason}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}}

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="an HF model dir (`lmforge convert to-hf CKPT DIR`)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="weights' dtype: float32 (default), bfloat16 (bf16), float16 (fp16)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--max-concurrent", type=int, default=0, help="generate calls at once (0: no cap)")
    args = p.parse_args(argv)
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    peer = load_peer(args.hf, device=args.device, dtype=args.dtype)
    uvicorn.run(create_app(peer, max_concurrent=args.max_concurrent), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
