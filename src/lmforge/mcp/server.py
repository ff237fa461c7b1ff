"""`lmforge mcp`: a Model Context Protocol server over one checkpoint, on the official `mcp` SDK.

    server = create_server(MCPOptions(ckpt="runs/demo/model", index="runs/rag"))
    run_mcp(options)           # stdio (an MCP host launches it) or streamable HTTP at http://HOST:PORT/mcp

Tools (`lmforge.mcp.tools`): generate, chat, embed, search, evaluate; resources: the model card
(`lmforge://model/config`, `.../summary`, `.../report`) and the index's (`lmforge://index/summary`,
`lmforge://index/config`), each only when its file exists. A call with bad arguments (missing,
mistyped, out of range) answers a one-line tool error naming the argument (`is_error=True`); the
server keeps serving. Over stdio, stdout carries the protocol only: every log line and progress bar
goes to stderr (the SDK also points file descriptor 1 at stderr while it serves).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.mcpserver.resources import FileResource
from pydantic import ValidationError

from lmforge import __version__
from lmforge.errors import UserError
from lmforge.mcp.backend import MCPBackend, MCPOptions, run_dir_of
from lmforge.mcp.tools import register_tools

__all__ = ["LmforgeMCPServer", "MCPOptions", "create_server", "one_line", "run_mcp"]

INSTRUCTIONS = ("A local language model trained with lmforge. generate continues text, chat answers a conversation "
                "in the model's chat template, embed returns sentence vectors, search finds passages in a document "
                "index, evaluate runs `lmforge eval` on a task file. The model card is in the lmforge://model/ "
                "resources.")


def one_line(tool: str, error: ValidationError) -> str:
    """A pydantic validation error as one line naming each bad argument: 'generate: prompt: Field required'."""
    parts = []
    for e in error.errors():
        where = ".".join(str(part) for part in e["loc"]) or "arguments"
        got = "" if e["type"] == "missing" else f" (got {e['input']!r:.60})"
        parts.append(f"{where}: {e['msg']}{got}")
    return f"{tool}: " + "; ".join(parts)


class LmforgeMCPServer(MCPServer):
    """MCPServer whose tool errors are one line, "TOOL: ARGUMENT: what is wrong" (the SDK's argument
    errors are pydantic's multi-line report);
    `backend` and `tool_names` say what it serves."""

    backend: MCPBackend
    tool_names: list[str]

    async def call_tool(self, name: str, arguments: dict[str, Any], context=None):
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as e:
            if isinstance(e, UnexpectedToolError):  # a crash: the SDK's generic message, the traceback in the log
                raise
            if isinstance(e.__cause__, ValidationError):
                raise ToolError(one_line(name, e.__cause__)) from None
            if isinstance(e.__cause__, ToolError):  # the tool's own one-line message, without the SDK's prefix
                raise ToolError(f"{name}: {e.__cause__}") from None
            raise


def create_server(options: MCPOptions, *, model=None, tokenizer=None) -> LmforgeMCPServer:
    """The server with its tools and resources; the checkpoint (and index, encoder) loaded now."""
    backend = MCPBackend.load(options, model=model, tokenizer=tokenizer)
    server = LmforgeMCPServer("lmforge", title=f"lmforge: {backend.name}", instructions=INSTRUCTIONS,
                              version=__version__, log_level="WARNING")
    server.backend = backend
    server.tool_names = register_tools(server, backend)
    add_resources(server, backend)
    return server


def model_card_files(backend: MCPBackend) -> dict[str, Path]:
    """Resource name -> file: the checkpoint's config.json, and summary.json / report.md of the checkpoint
    dir or else of its run (a run's checkpoints/best belongs to RUN, which holds them)."""
    ckpt, run = backend.path.resolve(), run_dir_of(backend.path)
    files = {"config": ckpt / "config.json"}
    for name, file in (("summary", "summary.json"), ("report", "report.md")):
        found = next((d / file for d in (ckpt, run) if (d / file).is_file()), None)
        if found is not None:
            files[name] = found
    return files


def add_resources(server: MCPServer, backend: MCPBackend) -> None:
    mime = {".json": "application/json", ".md": "text/markdown"}
    described = {"config": "the model's architecture (config.json)", "summary": "the run's summary.json (metrics, "
                 "config, inputs)", "report": "the run's report (report.md)"}
    for name, path in model_card_files(backend).items():
        server.add_resource(FileResource(uri=f"lmforge://model/{name}", name=f"model-{name}", path=path,
                                         description=described[name], mime_type=mime[path.suffix]))
    if backend.options.index:
        index = Path(backend.options.index).resolve()
        for name, file in (("summary", "summary.json"), ("config", "rag_config.json")):
            if (index / file).is_file():
                server.add_resource(FileResource(uri=f"lmforge://index/{name}", name=f"index-{name}",
                                                 path=index / file, description=f"the RAG index's {file}",
                                                 mime_type="application/json"))


def run_mcp(options: MCPOptions) -> None:
    """Serve until the host closes stdin (stdio) or until Ctrl-C / SIGTERM (http)."""
    if options.transport not in ("stdio", "http"):
        raise UserError(f"--transport {options.transport}: use stdio or http")
    server = create_server(options)
    names = server.tool_names
    if options.transport == "stdio":
        print(f"lmforge mcp: {server.backend.name} over stdio; tools: {', '.join(names)}", file=sys.stderr, flush=True)
        server.run("stdio")
        return
    serve_http(server, options, names)


def serve_http(server: LmforgeMCPServer, options: MCPOptions, names: list[str]) -> None:
    """Streamable HTTP at /mcp on a socket bound first (a busy port is a one-line error; port 0 picks one)."""
    from lmforge.serve.server import is_loopback, listen_socket

    sock = listen_socket(options.host, options.port)
    host, port = sock.getsockname()[:2]
    app = server.streamable_http_app(host=options.host)
    print(f"lmforge mcp: {server.backend.name} at http://{host}:{port}/mcp; tools: {', '.join(names)}",
          file=sys.stderr, flush=True)
    if not is_loopback(options.host):
        print(f"warning: listening on {options.host}, reachable from other machines; MCP has no key here and "
              "evaluate reads files on this machine", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    try:
        QuietExitServer(config).run(sockets=[sock])
    finally:
        sock.close()


class QuietExitServer(uvicorn.Server):
    """uvicorn.Server that ends with exit code 0 on SIGTERM / Ctrl-C: uvicorn's own handler shuts down
    and then raises the signal again (exit code -15, or a KeyboardInterrupt)."""

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop now
        self.should_exit = True
