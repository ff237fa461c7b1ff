"""`lmforge mcp`: the model as a Model Context Protocol server (official `mcp` SDK), for MCP hosts
(Claude Desktop, Cursor, VS Code, ...): tools generate, chat, embed, search, evaluate and the model
card as resources. See docs/RAG.md ("MCP server").

    from lmforge.mcp import MCPOptions, create_server
    server = create_server(MCPOptions(ckpt="runs/demo/model"))   # an mcp.server.MCPServer
"""

from lmforge.mcp.backend import MCPBackend, MCPOptions
from lmforge.mcp.server import LmforgeMCPServer, create_server, run_mcp

__all__ = ["LmforgeMCPServer", "MCPBackend", "MCPOptions", "create_server", "run_mcp"]
