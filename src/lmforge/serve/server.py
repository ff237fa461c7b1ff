"""`lmforge serve`: the app of `lmforge.serve.app` under uvicorn, and a shutdown that drains.

    run_server(ServeOptions(ckpt="runs/chat", port=8000))

The socket is bound before anything loads (a busy port is a one-line error; `--port 0` picks a
free one and the line on stderr says which); the model then loads in the background while
/health answers 503. SIGTERM (and a first Ctrl-C) drains: /v1 requests get 503 at once, the
running and queued generations finish and their responses go out (at most `drain_timeout`
seconds), then the server closes and the process exits 0. A second signal stops at once.
uvicorn's own handler would close the listening socket first (new clients refused, not told
503) and re-raise the signal after shutdown (exit code -15), so `DrainingServer` replaces it.
Checkpoints load through `load_pretrained`: safetensors only, never pickle.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from lmforge.errors import UserError
from lmforge.serve.protocol import ServeOptions

__all__ = ["DrainingServer", "ServeOptions", "check_options", "listen_socket", "run_server"]

logger = logging.getLogger("lmforge.serve")


def check_options(options: ServeOptions) -> None:
    """One-line UserErrors for settings that cannot work, before anything is bound or loaded."""
    from lmforge.train.checkpoint import resolve_checkpoint

    resolve_checkpoint(options.ckpt)
    if options.embedder:
        resolve_checkpoint(options.embedder)
    if options.rag and not (Path(options.rag) / "rag_config.json").is_file():
        raise UserError(f"--rag {options.rag}: not a RAG index (no rag_config.json); build one with "
                        "`lmforge rag index`")
    for name, value in (("--max-batch", options.max_batch), ("--max-queue", options.max_queue),
                        ("--max-tokens", options.max_tokens_limit), ("--max-body-bytes", options.max_body_bytes),
                        ("--max-n", options.max_n), ("--max-prompt-tokens", options.max_prompt_tokens or 1)):
        if value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
    if not 0 <= options.port <= 65535:
        raise UserError(f"--port {options.port}: must be between 0 and 65535")
    if options.api_key is not None and not options.api_key.strip():
        raise UserError("--api-key is empty; give a key, or leave it out (and LMFORGE_API_KEY unset) for no key")
    for name, directory in options.adapters.items():
        if not name or not Path(directory).exists():
            raise UserError(f"--adapter {name}={directory}: give NAME=DIR with an existing adapter dir")


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for host:port (uvicorn listens on it); a one-line UserError if it is taken."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a name such as localhost
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); pick another port, "
                        "or stop the server that has it") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def setup_logging() -> None:
    """The request log (JSON lines, logger `lmforge.serve`) on stderr."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def make_server(options: ServeOptions):
    """(uvicorn server, backend): the app (loading in the background) under a DrainingServer."""
    from lmforge.serve.app import create_app

    app = create_app(options)
    config = uvicorn.Config(app, http="h11", ws="none", lifespan="on", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=max(1, int(options.drain_timeout)))
    server = DrainingServer(config, app.state.backend)
    return server, app.state.backend


def run_server(options: ServeOptions) -> None:
    """Serve until SIGTERM / Ctrl-C (then drain and return: exit code 0); a checkpoint that fails
    to load ends it with that one-line UserError."""
    check_options(options)
    setup_logging()
    share_the_cpu(options.threads)
    sock = listen_socket(options.host, options.port)
    server, backend = make_server(options)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"lmforge serve: {backend.name} on {url} (OpenAI API at {url}/v1; loading, GET /health says when it is "
          "ready)", file=sys.stderr, flush=True)
    if not is_loopback(host):
        print(f"warning: listening on {host}, reachable from other machines"
              + ("" if options.api_key else " WITHOUT an API key (--api-key or LMFORGE_API_KEY)"),
              file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        backend.close()
    if backend.load_error is not None:
        raise UserError(backend.load_error)


def share_the_cpu(threads: int | None) -> None:
    """Split the CPU between the engine thread and the event loop: torch gets `threads` (default:
    the cores minus one, at least 1), and the interpreter's switch interval drops from 5 ms to
    0.5 ms. The two threads share the GIL; with the default interval the engine thread, back from
    a torch op, could wait up to 5 ms for the event loop to hand it back. Measured on the demo
    model (2-core AMD EPYC, 16 streaming clients): 708 -> 928 tokens/s (docs/BENCHMARKS.md)."""
    import os

    import torch

    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: give a positive number of threads")
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) - 1))
    sys.setswitchinterval(0.0005)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM / SIGINT drains the backend first (see the module doc)."""

    def __init__(self, config: uvicorn.Config, backend) -> None:
        super().__init__(config)
        self.backend = backend
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_started = False
        self.drain_task: asyncio.Task | None = None
        backend.on_load_error = self.stop

    def stop(self) -> None:
        self.should_exit = True

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:  # in the main thread, between bytecodes of the loop
        if self.loop is None or self.drain_started or self.should_exit:
            self.should_exit = self.force_exit = True  # a second signal: stop now
            return
        self.drain_started = True
        self.loop.call_soon_threadsafe(self.begin_drain, signal.Signals(sig).name)

    def begin_drain(self, name: str) -> None:
        print(f"lmforge serve: {name}: draining ({self.backend.active} requests in flight; new ones get 503)",
              file=sys.stderr, flush=True)
        self.drain_task = asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        try:
            await self.backend.drain(self.backend.options.drain_timeout)
        finally:
            print("lmforge serve: drained; exiting", file=sys.stderr, flush=True)
            self.should_exit = True
