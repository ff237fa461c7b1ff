"""What `lmforge mcp`'s tools do, without the protocol: one loaded checkpoint (plus an optional
encoder and RAG index) and plain-dict operations on it.

    backend = MCPBackend.load(MCPOptions(ckpt="runs/demo/model", index="runs/rag"))
    backend.generate("ROMEO:", max_tokens=20, temperature=0.0)   # {"text", "tokens", "finish_reason"}

Everything is loaded once, here at start (a checkpoint that does not load is a one-line UserError
before any protocol starts). Tools run in worker threads (the SDK runs sync tools off its event
loop), so each component has a lock: one generation at a time on the model, one embedding batch at
a time on the encoder, one search at a time on the index. Bad input is a one-line UserError, which
the server answers as a tool error.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.models import has_capability

__all__ = ["MCPBackend", "MCPOptions", "run_dir_of"]


@dataclass
class MCPOptions:
    """How `lmforge mcp` runs: what it loads and where it listens (http only)."""

    ckpt: str
    index: str | None = None  # a RAG index dir (`lmforge rag index`): the search tool
    embedder: str | None = None  # an encoder checkpoint for the embed tool (default: the index's, or an encoder ckpt)
    transport: str = "stdio"  # stdio | http (streamable HTTP at /mcp)
    host: str = "127.0.0.1"
    port: int = 8765
    device: str = "cpu"
    dtype: str | None = None  # autocast dtype for generation (bf16 / fp16; None: the weights' own)


def run_dir_of(ckpt: Path) -> Path:
    """The training run a checkpoint dir belongs to (RUN/checkpoints/NAME -> RUN), else the dir itself."""
    ckpt = Path(ckpt).resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


class MCPBackend:
    """The served checkpoint, its chat template, the encoder and the index, each behind a lock."""

    def __init__(self, options: MCPOptions, model, tokenizer, path: Path) -> None:
        self.options, self.model, self.tokenizer, self.path = options, model, tokenizer, path
        self.name = Path(options.ckpt).resolve().name or "model"
        self.model_lock, self.embed_lock, self.index_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self.eval_lock = threading.Lock()
        self.template, self.template_error = None, None
        self.embedder: tuple[Any, Any, int, str] | None = None  # model, tokenizer, max length, checkpoint
        self.index = None
        self.autocast = None

    @classmethod
    def load(cls, options: MCPOptions, *, model=None, tokenizer=None) -> MCPBackend:
        """Load `options.ckpt` (or take an already loaded model and tokenizer), its chat template, the
        index and the encoder."""
        from lmforge.serve.app import autocast_dtype
        from lmforge.train.checkpoint import load_pretrained, resolve_checkpoint

        path = resolve_checkpoint(options.ckpt)
        if model is None:
            model, tokenizer = load_pretrained(path, options.device)
        backend = cls(options, model, tokenizer, path)
        backend.autocast = autocast_dtype(options.dtype)
        if backend.generative:
            from lmforge.tokenizer.chat import chat_template

            try:
                backend.template = chat_template(tokenizer)
            except UserError as e:  # generate still works; chat answers this as its error
                backend.template_error = str(e)
        if options.index:
            from lmforge.rag import RagIndex

            backend.index = RagIndex.open(options.index)
        backend.embedder = backend.load_embedder()
        return backend

    @property
    def generative(self) -> bool:
        return has_capability(self.model, "generate")

    def load_embedder(self) -> tuple[Any, Any, int, str] | None:
        """The encoder for `embed`: --embedder, else the index's embedder (the one its dense search uses,
        loaded now and checked against the index), else the checkpoint if it is an encoder."""
        from lmforge.infer.embed import max_seq_length
        from lmforge.train.checkpoint import load_pretrained, resolve_checkpoint

        source = self.options.embedder
        if source is None and self.index is not None:
            index_embedder = self.index.model
            return index_embedder.model, index_embedder.tokenizer, index_embedder.max_length, index_embedder.path
        if source is None:
            if not has_capability(self.model, "embed"):
                return None
            return self.model, self.tokenizer, max_seq_length(self.path, self.model.config), str(self.path)
        path = resolve_checkpoint(source)
        model, tokenizer = load_pretrained(path, self.options.device)
        if not has_capability(model, "embed"):
            raise UserError(f"--embedder {source}: a {type(model).__name__} has no sentence embeddings; pass an "
                            "encoder (model.arch bert) checkpoint")
        return model, tokenizer, max_seq_length(path, model.config), str(path)

    # ---- generation ---------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids (an encoder-decoder's source ids); a UserError if it does not fit the context."""
        from lmforge.infer.generate import encode_source, is_encoder_decoder

        seq2seq = is_encoder_decoder(self.model)
        ids = encode_source(self.tokenizer, prompt) if seq2seq else self.tokenizer.encode(prompt)
        return self.check_fits(ids, "prompt", seq2seq)

    def check_fits(self, ids: list[int], field: str, seq2seq: bool = False) -> list[int]:
        block = self.model.config.block_size
        limit = block if seq2seq else block - 1
        if not ids:
            raise UserError(f"{field}: empty; give some text")
        if len(ids) > limit:
            raise UserError(f"{field}: {len(ids)} tokens, over the model's context of {limit}; shorten it")
        return ids

    def complete(self, ids: list[int], *, max_tokens: int, temperature: float, top_p: float | None,
                 seed: int | None, stop: Sequence[str] = (), stop_ids: set[int] | None = None) -> dict[str, Any]:
        """Continue `ids`: {"text", "tokens" (new tokens, the stop token included), "finish_reason"
        ("stop": eos, a stop id or string; "length": max_tokens)}. The text is `generate_text`'s."""
        import contextlib

        from lmforge.infer.detok import TextStream
        from lmforge.infer.generate import generate

        eos = getattr(self.tokenizer, "eos_id", None)
        stops = set(stop_ids or ()) | ({eos} if eos is not None else set())
        detok, count, reason = TextStream(self.tokenizer, [s for s in stop if s]), 0, "length"
        with self.model_lock:
            tokens = generate(self.model, ids, max_tokens, temperature, None, top_p, seed, stops,
                              autocast_dtype=self.autocast)
            with contextlib.closing(tokens):
                for token_id in tokens:
                    count += 1
                    if token_id in stops:
                        reason = "stop"
                        break
                    detok.push(token_id)
                    if detok.stopped:
                        reason = "stop"
                        break
        detok.finish()
        return {"text": detok.text, "tokens": count, "finish_reason": reason}

    def generate(self, prompt: str, **sampling) -> dict[str, Any]:
        self.require_generative("generate")
        return self.complete(self.prompt_ids(prompt), **sampling)

    def chat(self, messages: Sequence[dict[str, str]], **sampling) -> dict[str, Any]:
        """The assistant's reply to `messages` with the checkpoint's chat template (`chat_reply`'s text)."""
        self.require_generative("chat")
        if self.template is None:
            raise UserError(f"chat: {self.name} has no chat template ({self.template_error}); use generate")
        if not messages:
            raise UserError("messages: empty; give at least one {role, content} message")
        try:
            ids = list(self.template.encode(list(messages), add_generation_prompt=True))
        except (UserError, ValueError) as e:
            raise UserError(f"messages: the chat template refused them: {e}") from None
        self.check_fits(ids, "messages")
        out = self.complete(ids, stop_ids=set(self.template.stop_ids), **sampling)
        return {"reply": out.pop("text"), **out}

    def require_generative(self, tool: str) -> None:
        if not self.generative:
            raise UserError(f"{tool}: {self.name} is a {type(self.model).__name__} (an encoder); "
                            "it does not write text")

    # ---- embeddings and search ------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> dict[str, Any]:
        """{"vectors" (L2-normalized, `embed_texts`'), "dim", "model"}."""
        from lmforge.infer.embed import embed_texts

        if self.embedder is None:
            raise UserError("embed: this server has no encoder; start it with --embedder CKPT or --index DIR")
        if not texts:
            raise UserError("texts: empty; give at least one text")
        model, tokenizer, max_length, source = self.embedder
        with self.embed_lock:
            vectors = embed_texts(model, tokenizer, list(texts), max_length=max_length)
        return {"vectors": vectors.tolist(), "dim": int(vectors.shape[1]), "model": source}

    def search(self, query: str, k: int, mode: str) -> dict[str, Any]:
        """The index's top-k hits for `query` ({"hits": [{chunk_id, score, text, source, start, end}]})."""
        from dataclasses import asdict

        if self.index is None:
            raise UserError("search: this server has no index; start it with --index DIR")
        if not query.strip():
            raise UserError("query: empty; give a question or keywords")
        with self.index_lock:
            hits = self.index.search(query, k, mode=mode)
        return {"query": query, "mode": mode, "hits": [asdict(h) for h in hits]}

    # ---- evaluation ---------------------------------------------------------------------------------------

    def evaluate(self, task: str, limit: int | None, seed: int = 0, *, fewshot: int = 0,
                 cot: bool = False) -> dict[str, Any]:
        """`lmforge eval` of the served checkpoint on `task` (a task file, a dir of them, or a token dir):
        its results without the per-item predictions. Its output files go to a temporary dir, removed after."""
        from lmforge.eval import evaluate

        if not Path(task).exists():
            raise UserError(f"task: {task} does not exist on the server's machine; pass a .jsonl task file path")
        with self.eval_lock, tempfile.TemporaryDirectory(prefix="lmforge-mcp-eval-") as tmp:
            result = evaluate(self.path, [task], Path(tmp) / "eval", limit=limit, seed=seed,
                              device=self.options.device, progress=False, fewshot=fewshot, cot=cot)
        return {"checkpoint": result["checkpoint"],
                "tasks": [{"task": r["task"], "kind": r["kind"], "split": r["split"], "task_file": r.get("task_file"),
                           "metrics": r["metrics"]} for r in result["tasks"]]}
