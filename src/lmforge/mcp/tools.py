"""`lmforge mcp`'s tools: typed signatures and pydantic results, so the SDK publishes an inputSchema
and an outputSchema for each, and validates arguments before a tool runs.

Only the tools the loaded components can serve are registered (see `register_tools`): a client's
tools/list shows what works. A call that still cannot be served (chat without a chat template, a
task file that does not exist) answers a one-line tool error. The tools are sync functions: the
SDK runs them in worker threads, and `MCPBackend` serializes what shares a model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from lmforge.errors import UserError
from lmforge.mcp.backend import MCPBackend

__all__ = ["ChatMessage", "ChatResult", "EmbedResult", "EvaluateResult", "GenerateResult", "SearchHit",
           "SearchResult", "TaskMetrics", "register_tools"]

MAX_TOKENS = 4096
MAX_TEXTS = 256

MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS, description="most new tokens to write")]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="sampling temperature (0: greedy)")]
TopP = Annotated[float | None, Field(gt=0.0, le=1.0, description="nucleus sampling mass (null: off)")]
Seed = Annotated[int | None, Field(description="sampling seed: the same seed gives the same text (null: random)")]
Stop = Annotated[list[str] | None, Field(max_length=4, description="strings that end the text (not included)")]


class GenerateResult(BaseModel):
    text: str = Field(description="the continuation (without the prompt and the stop string or token)")
    tokens: int = Field(description="new tokens generated (a stop token included)")
    finish_reason: Literal["stop", "length"] = Field(description="stop: eos or a stop string; length: max_tokens")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatResult(BaseModel):
    reply: str = Field(description="the assistant's reply")
    tokens: int = Field(description="new tokens generated (the end-of-turn token included)")
    finish_reason: Literal["stop", "length"]


class EmbedResult(BaseModel):
    vectors: list[list[float]] = Field(description="one L2-normalized sentence vector per text, in order")
    dim: int
    model: str = Field(description="the encoder checkpoint")


class SearchHit(BaseModel):
    chunk_id: int
    score: float
    text: str
    source: str = Field(description="the document the chunk comes from")
    start: int = Field(description="character offset of the chunk in its source")
    end: int


class SearchResult(BaseModel):
    query: str
    mode: Literal["dense", "bm25", "hybrid"]
    hits: list[SearchHit]


class TaskMetrics(BaseModel):
    task: str
    kind: str = Field(description="task kind: perplexity, generation, multiple_choice, qa, binary, ...")
    split: str
    task_file: str | None = None
    metrics: dict[str, Any] = Field(description="the metrics `lmforge eval` reports for the task")


class EvaluateResult(BaseModel):
    checkpoint: str
    tasks: list[TaskMetrics]


def call(fn, *args, **kwargs):
    """Run a backend operation; its one-line UserError becomes the tool's error."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        raise ToolError(str(e)) from None


def register_tools(server: MCPServer, backend: MCPBackend) -> list[str]:
    """Add the tools `backend` can serve to `server`; their names. generate, chat: a generative
    checkpoint; embed: an encoder (--embedder, the index's embedder, or an encoder --ckpt); search:
    --index; evaluate: always (`lmforge eval` takes any checkpoint)."""
    if backend.generative:
        add_generation_tools(server, backend)
    if backend.embedder is not None:
        add_embed_tool(server, backend)
    if backend.index is not None:
        add_search_tool(server, backend)
    add_evaluate_tool(server, backend)
    return ((["generate", "chat"] if backend.generative else []) + (["embed"] if backend.embedder else [])
            + (["search"] if backend.index is not None else []) + ["evaluate"])


def add_generation_tools(server: MCPServer, backend: MCPBackend) -> None:
    @server.tool(title="Generate text")
    def generate(prompt: Annotated[str, Field(description="the text to continue")], max_tokens: MaxTokens = 128,
                 temperature: Temperature = 0.8, top_p: TopP = None, seed: Seed = None,
                 stop: Stop = None) -> GenerateResult:
        """Continue a prompt with the served language model (plain text completion, no chat template)."""
        return GenerateResult(**call(backend.generate, prompt, max_tokens=max_tokens, temperature=temperature,
                                     top_p=top_p, seed=seed, stop=stop or ()))

    @server.tool(title="Chat")
    def chat(messages: Annotated[list[ChatMessage], Field(min_length=1, description="the conversation so far")],
             max_tokens: MaxTokens = 128, temperature: Temperature = 0.8, top_p: TopP = None, seed: Seed = None,
             stop: Stop = None) -> ChatResult:
        """The model's next assistant reply to a conversation, in the checkpoint's chat template."""
        turns = [m.model_dump() for m in messages]
        return ChatResult(**call(backend.chat, turns, max_tokens=max_tokens, temperature=temperature,
                                 top_p=top_p, seed=seed, stop=stop or ()))


def add_embed_tool(server: MCPServer, backend: MCPBackend) -> None:
    @server.tool(title="Embed texts")
    def embed(texts: Annotated[list[str], Field(min_length=1, max_length=MAX_TEXTS,
                                                description="texts to embed")]) -> EmbedResult:
        """Sentence vectors (mean-pooled, L2-normalized; cosine similarity = dot product) from the encoder."""
        return EmbedResult(**call(backend.embed, texts))


def add_search_tool(server: MCPServer, backend: MCPBackend) -> None:
    @server.tool(title="Search the document index")
    def search(query: Annotated[str, Field(min_length=1, description="a question or keywords")],
               k: Annotated[int, Field(ge=1, le=100, description="how many hits")] = 5,
               mode: Annotated[Literal["dense", "bm25", "hybrid"],
                               Field(description="dense vectors, BM25 keywords, or both fused (RRF)")] = "hybrid",
               ) -> SearchResult:
        """The passages of the RAG index closest to the query, with their source document and offsets."""
        return SearchResult(**call(backend.search, query, k, mode))


def add_evaluate_tool(server: MCPServer, backend: MCPBackend) -> None:
    @server.tool(title="Evaluate the model on a task")
    def evaluate(task: Annotated[str, Field(min_length=1, description="path of a JSONL task file (or a dir of them) "
                                                                     "on the server's machine (docs/EVAL.md)")],
                 limit: Annotated[int | None, Field(ge=1, description="score only the first N items")] = None,
                 fewshot: Annotated[int, Field(ge=0, le=64, description="solved examples from the task's train "
                                               "pool before each item (`lmforge eval --fewshot K`)")] = 0,
                 cot: Annotated[bool, Field(description="chain-of-thought cue; generation answers parsed after "
                                            "the marker (`lmforge eval --cot`)")] = False,
                 ) -> EvaluateResult:
        """`lmforge eval` of the served checkpoint on a task: the metrics it reports (accuracy, perplexity, ...)."""
        return EvaluateResult(**call(backend.evaluate, task, limit, fewshot=fewshot, cot=cot))
