"""`lmforge chat --url URL`: the `lmforge chat` conversation against a running `lmforge serve` (or any
OpenAI-compatible server), replies streamed as they are generated.

Standard library only (urllib): `GET /v1/models` once at the start (waiting while the server still
loads its model; an unreachable server or a rejected key is a `UserError`, exit code 2), then one
`POST /v1/chat/completions` with `stream: true` per turn, read as server-sent events (`data: {json}`
lines, `data: [DONE]` at the end). The REPL is `lmforge.infer.chat.chat_loop`'s: `/reset` clears the
history, `/quit` or end of input leaves. An error during a turn prints one line
(`error: HTTP 400: ...`) and the conversation goes on without that message; Ctrl-C during a reply
stops it (the connection closes, the server frees the slot) and keeps what came so far.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from lmforge.errors import UserError

__all__ = ["RemoteError", "api_base", "chat_remote", "list_models", "stream_chat"]


class RemoteError(Exception):
    """The server answered an error (its HTTP status and OpenAI-shaped message) or could not be reached."""


def api_base(url: str) -> str:
    """The API root of a server URL: `http://host:8000`, `http://host:8000/` and `http://host:8000/v1`
    all give `http://host:8000/v1`."""
    base = url.strip().rstrip("/")
    if "://" not in base:
        raise UserError(f"--url {url!r} is not a URL; give one like http://127.0.0.1:8000")
    return base if base.endswith("/v1") else base + "/v1"


def _request(url: str, api_key: str | None, body: dict | None = None) -> urllib.request.Request:
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    return urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")


def _open(request: urllib.request.Request, timeout: float):
    """urlopen, with HTTP errors and network failures as one-line RemoteErrors."""
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (the user's own server URL)
    except urllib.error.HTTPError as e:
        raise RemoteError(f"HTTP {e.code}: {_error_message(e)}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RemoteError(f"cannot reach {request.full_url}: {reason}") from None


def _error_message(e: urllib.error.HTTPError) -> str:
    raw = e.read().decode("utf-8", "replace")
    try:
        error = json.loads(raw).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return " ".join(str(message or raw or e.reason).split())


def list_models(url: str, api_key: str | None = None, timeout: float = 30.0) -> list[str]:
    """The model names the server lists (GET /v1/models)."""
    with _open(_request(api_base(url) + "/models", api_key), timeout) as response:
        return [m["id"] for m in json.load(response).get("data", [])]


def stream_chat(url: str, body: dict[str, Any], api_key: str | None = None,
                timeout: float = 600.0) -> Iterator[str]:
    """POST /v1/chat/completions with stream: true; yield the reply's text pieces as they arrive.
    Closing the iterator closes the connection (the server then frees the request's slot)."""
    response = _open(_request(api_base(url) + "/chat/completions", api_key, {**body, "stream": True}), timeout)
    with response:
        for raw in response:
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if event.get("error"):
                error = event["error"]
                raise RemoteError("error: " + (error.get("message") if isinstance(error, dict) else str(error)))
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece


def chat_remote(url: str, *, api_key: str | None = None, model: str | None = None, system: str | None = None,
                fewshot: list[dict[str, str]] | None = None, stdin: TextIO | None = None,
                stdout: TextIO | None = None, stderr: TextIO | None = None,
                max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = None,
                top_p: float | None = None, seed: int | None = None) -> None:
    """`chat_loop` against the server at `url`: read user lines, stream each reply, keep the history.

    The sampling arguments are `chat_loop`'s (`lmforge chat`'s flags), sent as the request's
    max_tokens, temperature, top_k, top_p and seed. `system` and the `fewshot` example exchanges
    (`load_fewshot_messages`) open every request's messages, and stay after /reset. UserError when
    the server cannot be reached or refuses the key (checked once, before the first line is read)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    names = _server_models(url, api_key)
    if model is not None and model not in names:
        raise UserError(f"chat --url {url}: the server has no model {model!r}; it serves {', '.join(names)}")
    sampling = {"max_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "seed": seed, "model": model or (names[0] if names else None)}
    sampling = {k: v for k, v in sampling.items() if v is not None}
    write = _writer(stdout)
    opening = ([{"role": "system", "content": system}] if system else []) + list(fewshot or [])
    history = list(opening)
    interactive = stdin.isatty()
    while True:
        if interactive:
            write("you> ")
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            write("\n")
            break
        if not line or line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            history = list(opening)
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        reply = _one_reply(url, {**sampling, "messages": history}, api_key, write, stderr)
        if reply is None:
            history.pop()  # the turn failed: the conversation goes on without it
        else:
            history.append({"role": "assistant", "content": reply})


def _server_models(url: str, api_key: str | None, wait: float = 120.0) -> list[str]:
    """list_models, waiting while the server loads its model (503); UserError if it cannot be used."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return list_models(url, api_key)
        except RemoteError as e:
            if "HTTP 503" in str(e) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            hint = ("pass --api-key KEY (or set LMFORGE_API_KEY)" if "HTTP 401" in str(e)
                    else "is `lmforge serve` running there?")
            raise UserError(f"chat --url {url}: {e}; {hint}") from None


def _writer(stdout: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()
    return write


def _one_reply(url: str, body: dict, api_key: str | None, write: Callable[[str], None],
               stderr: TextIO) -> str | None:
    """Stream one reply to stdout; its text, or None after printing the error line."""
    pieces: list[str] = []
    write("model> ")
    stream = stream_chat(url, body, api_key)
    try:
        for piece in stream:
            pieces.append(piece)
            write(piece)
    except RemoteError as e:
        write("\n")
        print(f"error: {e}", file=stderr, flush=True)
        return None
    except KeyboardInterrupt:  # stop this reply, keep the conversation
        stream.close()
        write(" [stopped]")
    write("\n")
    return "".join(pieces)
