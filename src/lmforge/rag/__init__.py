"""Retrieval-augmented generation: chunk documents, embed them, index them with FAISS, retrieve
(dense, BM25, hybrid) and answer with a local model citing the chunks (docs/RAG.md).

    from lmforge.rag import build_index, RagIndex, answer_question
    build_index(["corpus/"], "runs/minilm", "runs/rag")
    index = RagIndex.open("runs/rag")
    hits = index.search("who killed Polonius?", k=5, mode="hybrid")
    result = answer_question(index, "who killed Polonius?", "runs/chat")
"""

from lmforge.rag.answer import answer_question
from lmforge.rag.chunking import Chunk, chunk_text, split_sentences
from lmforge.rag.retrieve import BM25, MODES, Hit, RagIndex, bm25_tokens, rrf
from lmforge.rag.store import INDEX_TYPES, add_documents, build_index, delete_source, reindex

__all__ = ["BM25", "INDEX_TYPES", "MODES", "Chunk", "Hit", "RagIndex", "add_documents", "answer_question",
           "bm25_tokens", "build_index", "chunk_text", "delete_source", "reindex", "rrf", "split_sentences"]
