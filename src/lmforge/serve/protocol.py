"""OpenAI's wire format for `lmforge serve`: request bodies in (checked field by field), response
objects and stream chunks out, errors in OpenAI's shape.

Nothing here touches the model or the web framework: `parse_chat`, `parse_completion` and
`parse_embedding` turn a decoded JSON body into a plain request (or raise `APIError` with one
line naming the field), and the `*_response` / `*_chunk` functions build the JSON objects the
official clients read. The server's limits live in `ServeOptions`.
"""

from __future__ import annotations

import base64
import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_TOP_LOGPROBS = 20


@dataclass
class ServeOptions:
    """How `lmforge serve` runs: what it loads, where it listens, and its limits."""

    ckpt: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    model_name: str | None = None  # default: the --ckpt dir's name
    max_batch: int = 16
    max_queue: int = 64
    max_prompt_tokens: int | None = None  # default: the model's context
    max_tokens_limit: int = 1024  # a request's max_tokens above this: 400
    max_body_bytes: int = 1_000_000  # a body above this: 413
    max_n: int = 8
    metrics_prefix: str = "lmforge"
    adapters: dict[str, str] = field(default_factory=dict)  # --adapter NAME=DIR
    embedder: str | None = None  # an encoder checkpoint for /v1/embeddings beside a generative ckpt
    rag: str | None = None  # a RAG index dir (`lmforge rag index`) for POST /v1/rag/query
    device: str = "cpu"
    dtype: str | None = None  # autocast dtype for generation: bf16 / fp16 (None: the weights' own)
    drain_timeout: float = 30.0
    threads: int | None = None  # torch's CPU threads (default: one core fewer than the machine has, at least 1)


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> APIError:
    """A 400 about request field `param`: the message starts with the field's name."""
    return APIError(400, f"{param}: {message}", param=param.split("[")[0].split(".")[0], code=code)


# ---- request bodies -------------------------------------------------------------------------------


def decode_json_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; APIError 400 for bytes that are not UTF-8 JSON objects."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start}); send UTF-8 JSON") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _typename(value: Any) -> str:
    return "null" if value is None else {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
                                         "list": "array", "dict": "object"}.get(type(value).__name__, "?")


def get_int(body: dict, name: str, default: int | None, low: int | None = None, high: int | None = None,
            hint: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"must be an integer, got {_typename(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"between {low} and {high}"
        raise bad(name, f"must be {span}, got {value}{hint}")
    return value


def get_number(body: dict, name: str, default: float | None, low: float, high: float,
               low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"must be a number, got {_typename(value) if not isinstance(value, float) else value}")
    if value > high or value < low or (low_open and value == low):
        raise bad(name, f"must be {'above' if low_open else 'at least'} {low} and at most {high}, got {value}")
    return float(value)


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, got {_typename(value)}")
    return value


def get_model(body: dict) -> str | None:
    value = body.get("model")
    if value is not None and not isinstance(value, str):
        raise bad("model", f"must be a string, got {_typename(value)}")
    return value


@dataclass
class Sampling:
    """The generation fields shared by chat and completions (max_tokens None: as much as fits)."""

    max_tokens: int | None
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stops: list[str]
    n: int
    ignore_eos: bool = False  # vLLM's extension: only max_tokens (and stop strings) end a reply


def parse_sampling(body: dict, options: ServeOptions) -> Sampling:
    limit = options.max_tokens_limit
    hint = f" (this server's limit, --max-tokens {limit})"
    max_tokens = get_int(body, "max_tokens", None, 1, limit, hint)
    if body.get("max_completion_tokens") is not None:
        max_tokens = get_int(body, "max_completion_tokens", None, 1, limit, hint)
    top_k = get_int(body, "top_k", None, -1)
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOPS:
            raise bad("stop", f"at most {MAX_STOPS} stop strings, got {len(stop)}")
        stops = list(stop)
    else:
        raise bad("stop", f"must be a string or an array of strings, got {_typename(stop)}")
    return Sampling(max_tokens=max_tokens, temperature=get_number(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=get_number(body, "top_p", None, 0.0, 1.0, low_open=True),
                    top_k=top_k if top_k and top_k > 0 else None,
                    seed=get_int(body, "seed", None, -(2 ** 63), 2 ** 63 - 1),
                    stops=[s for s in stops if s], n=get_int(body, "n", 1, 1, options.max_n,
                                                             f" (this server's limit, max_n {options.max_n})"),
                    ignore_eos=get_bool(body, "ignore_eos"))


def stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage)."""
    stream = get_bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise bad("stream_options", f"must be an object, got {_typename(options)}")
    if not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    return stream, get_bool(options, "include_usage")


def message_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or an array of {"type": "text", "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{i}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are "
                          "supported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{where}.content", f"must be a string or an array of text parts, got {_typename(content)}")


def parse_messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "missing; send an array of {\"role\", \"content\"} objects")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty array of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"must be an object, got {_typename(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"unknown role {role!r}; use system, user or assistant")
        out.append({"role": ROLES[role], "content": message_text(m.get("content"), where)})
    return out


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict[str, str]]
    sampling: Sampling
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs; 0..20: the chosen token's, and this many best


def parse_chat(body: dict, options: ServeOptions) -> ChatRequest:
    messages = parse_messages(body)
    logprobs = get_bool(body, "logprobs")
    top = get_int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("top_logprobs", "needs logprobs: true")
    stream, include_usage = stream_flags(body)
    return ChatRequest(get_model(body), messages, parse_sampling(body, options), stream, include_usage,
                       (top or 0) if logprobs else None)


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]  # text, or token ids
    sampling: Sampling
    stream: bool
    include_usage: bool
    top_logprobs: int | None


def parse_prompts(body: dict) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "missing; send a string (or an array of strings)")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [list(prompt)]
    else:
        raise bad("prompt", "must be a string, a non-empty array of strings, or an array of token ids")
    if any(not p for p in prompts):
        raise bad("prompt", "is empty; send at least one character")
    return prompts


def parse_completion(body: dict, options: ServeOptions) -> CompletionRequest:
    prompts = parse_prompts(body)
    if get_bool(body, "echo"):
        raise bad("echo", "is not supported; the prompt is not repeated in the output")
    if body.get("suffix") is not None:
        raise bad("suffix", "is not supported (no fill-in-the-middle)")
    top = get_int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    stream, include_usage = stream_flags(body)
    sampling = parse_sampling(body, options)
    if len(prompts) * sampling.n > options.max_n:
        raise bad("prompt", f"{len(prompts)} prompts x n={sampling.n} is over this server's limit of "
                  f"{options.max_n} choices per request")
    return CompletionRequest(get_model(body), prompts, sampling, stream, include_usage, top)


@dataclass
class EmbeddingRequest:
    model: str | None
    texts: list[str]
    base64: bool


def parse_embedding(body: dict) -> EmbeddingRequest:
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad("input", "must be a string or a non-empty array of strings (token arrays are not supported)")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad("encoding_format", f"must be 'float' or 'base64', got {encoding!r}")
    if body.get("dimensions") is not None:
        raise bad("dimensions", "is not supported; the vectors have the model's width")
    return EmbeddingRequest(get_model(body), texts, encoding == "base64")


# ---- responses --------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(tokens: Sequence[Any]) -> dict[str, Any]:
    """OpenAI chat `logprobs` from TokenLogprob-like objects (token, logprob, bytes, top)."""
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes),
                         "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(b)} for s, lp, b in t.top]}
                        for t in tokens]}


def completion_logprobs(tokens: Sequence[Any], offset: int = 0) -> dict[str, Any]:
    """OpenAI (legacy) completions `logprobs`; text offsets start at `offset` characters."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{s: lp for s, lp, _ in t.top} for t in tokens], "text_offset": offsets}


def envelope(kind: str, request_id: str, model: str, created: int | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": created or int(time.time()), "model": model}


def chat_response(request_id: str, model: str, choices: list[dict], prompt_tokens: int,
                  completion_tokens: int) -> dict[str, Any]:
    """A chat.completion; each choice {"text", "finish_reason", "logprobs" (a chat_logprobs or None)}."""
    return {**envelope("chat.completion", request_id, model),
            "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": c.get("logprobs"), "finish_reason": c["finish_reason"]}
                        for i, c in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(request_id: str, model: str, created: int, index: int, delta: dict, *,
               finish_reason: str | None = None, logprobs: dict | None = None,
               with_usage: bool = False) -> dict[str, Any]:
    chunk = {**envelope("chat.completion.chunk", request_id, model, created),
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def completion_response(request_id: str, model: str, choices: list[dict], prompt_tokens: int,
                        completion_tokens: int) -> dict[str, Any]:
    return {**envelope("text_completion", request_id, model),
            "choices": [{"index": i, "text": c["text"], "logprobs": c.get("logprobs"),
                         "finish_reason": c["finish_reason"]} for i, c in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(request_id: str, model: str, created: int, index: int, text: str, *,
                     finish_reason: str | None = None, logprobs: dict | None = None,
                     with_usage: bool = False) -> dict[str, Any]:
    chunk = {**envelope("text_completion", request_id, model, created),
             "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(kind: str, request_id: str, model: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: usage, and no choices."""
    return {**envelope(kind, request_id, model, created), "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict | str) -> str:
    """One server-sent event: `data: {...}` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def embeddings_response(model: str, vectors: np.ndarray, as_base64: bool, prompt_tokens: int) -> dict[str, Any]:
    def encode(v: np.ndarray) -> list[float] | str:
        return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if as_base64 else v.tolist()

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def models_response(names: Sequence[str], created: int) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "lmforge"} for name in names]}
