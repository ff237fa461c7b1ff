"""Search a RAG index: dense (FAISS over the embedder's vectors), BM25 (`bm25s`) or both fused.

- `dense`: the question is embedded with the index's own embedder; the score is the cosine.
- `bm25`: `bm25s.BM25` (Lucene variant, k1 1.5, b 0.75) over the chunk texts, tokenized by
  `bm25_tokens`: lowercased words, and CJK runs (which have no spaces) as single characters plus
  character bigrams; built when first used, in memory (a few seconds for 100k chunks).
- `hybrid`: reciprocal rank fusion, score(d) = sum over the two rankings of 1 / (60 + rank(d))
  (ranks from 1), over each ranking's top `max(4 k, 50)`; ties are broken by the dense ranking.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import UserError
from lmforge.rag.chunking import CJK_CHARS as _CJK
from lmforge.rag.store import Embedder, Store, embedder_for, read_store, weights_sha256

MODES = ("dense", "bm25", "hybrid")
RRF_K = 60
_BM25_TOKEN = re.compile(rf"[{_CJK}]+|[^\W{_CJK}]+")
_CJK_RUN = re.compile(rf"[{_CJK}]+")


@dataclass
class Hit:
    """One retrieved chunk: its id, score (cosine, BM25 or RRF), text and place in its source."""

    chunk_id: int
    score: float
    text: str
    source: str
    start: int
    end: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- BM25 and fusion ---------------------------------------------------------------------------------


def bm25_tokens(text: str) -> list[str]:
    """BM25 terms of `text`: lowercased words; a CJK run becomes its characters and its bigrams."""
    out: list[str] = []
    for match in _BM25_TOKEN.finditer(text.lower()):
        token = match.group()
        if _CJK_RUN.fullmatch(token):
            out += list(token) + [token[i:i + 2] for i in range(len(token) - 1)]
        else:
            out.append(token)
    return out


class BM25:
    """`bm25s.BM25` over a list of texts; `scores(query)` gives every text's score."""

    def __init__(self, texts: Sequence[str]) -> None:
        import bm25s

        self.retriever = bm25s.BM25()
        self.retriever.index([bm25_tokens(t) for t in texts], show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        tokens = [t for t in bm25_tokens(query) if t in self.retriever.vocab_dict]
        if not tokens:
            return np.zeros(self.retriever.scores["num_docs"], dtype=np.float32)
        return np.asarray(self.retriever.get_scores(tokens), dtype=np.float32)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores, best first (ties: lower index first)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))]


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: (id, sum of 1 / (k + rank)) best first, ranks counted from 1; ties keep
    the order in which ids first appear (the first ranking's order first)."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    order = {item: i for i, item in enumerate(dict.fromkeys(x for r in rankings for x in r))}
    return sorted(fused.items(), key=lambda kv: (-kv[1], order[kv[0]]))


# ---- the index ---------------------------------------------------------------------------------------


class RagIndex:
    """An index directory opened for search (`RagIndex.open`); `embedder` is its embedder's path."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.directory = store.directory
        self.config = store.config
        self.embedder: str = store.config["embedder"]
        self._rows = {int(cid): row for row, cid in enumerate(store.table["chunk_id"])}
        self._bm25: BM25 | None = None
        self._model: Embedder | None = None
        self._embedder_path = self.embedder  # or a copy of it with the same weights (`check_embedder`)

    @classmethod
    def open(cls, index_dir: str | Path, *, embedder: str | Path | None = None) -> RagIndex:
        """Open an index (UserError on a missing/corrupt one); `embedder`, if given, must be the
        checkpoint the index was built with (same weights), else a UserError naming both."""
        index = cls(read_store(index_dir))
        if embedder is not None:
            index.check_embedder(embedder)
        return index

    def __len__(self) -> int:
        return len(self._rows)

    def check_embedder(self, embedder: str | Path) -> None:
        """Refuse an embedder with other weights than the index's; one with the same weights elsewhere (a
        moved or copied checkpoint) is the one the questions are embedded with."""
        from lmforge.train.checkpoint import resolve_checkpoint

        path = resolve_checkpoint(embedder)
        if weights_sha256(path) != self.config["embedder_sha256"]:
            raise UserError(f"--embedder {embedder} is not the embedder {self.embedder} that {self.directory} was "
                            "built with (other weights); query with that one, or rebuild the index with yours")
        self._embedder_path = str(path.resolve())

    @property
    def model(self) -> Embedder:
        if self._model is None:
            path = self._embedder_path
            if not Path(path).exists():
                raise UserError(f"{self.directory}: its embedder {path} is gone; pass --embedder with a copy of it, "
                                "or rebuild the index")
            model = embedder_for(path)
            if model.sha256 != self.config["embedder_sha256"]:
                raise UserError(f"{self.directory} was built with other weights than {path} now holds; "
                                "rebuild the index")
            self._model = model
        return self._model

    def chunk(self, chunk_id: int, score: float = 0.0) -> Hit:
        row, table = self._rows[int(chunk_id)], self.store.table
        return Hit(int(chunk_id), float(score), table["text"][row], table["source"][row], int(table["start"][row]),
                   int(table["end"][row]))

    def search(self, question: str, k: int = 5, *, mode: str = "dense") -> list[Hit]:
        return self.search_many([question], k, mode=mode)[0]

    def search_many(self, questions: list[str], k: int = 10, *, mode: str = "dense") -> list[list[Hit]]:
        """The top-k chunks for each question (best first)."""
        if mode not in MODES:
            raise UserError(f"unknown search mode {mode!r}; use one of {', '.join(MODES)}")
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        if mode == "dense":
            return [[self.chunk(c, s) for c, s in row] for row in self.dense(questions, k)]
        if mode == "bm25":
            return [[self.chunk(c, s) for c, s in self.bm25(q, k)] for q in questions]
        depth = max(4 * k, 50)
        dense = self.dense(questions, depth)
        out = []
        for question, row in zip(questions, dense):
            fused = rrf([[c for c, _ in row], [c for c, _ in self.bm25(question, depth)]])
            out.append([self.chunk(c, s) for c, s in fused[:k]])
        return out

    def dense(self, questions: list[str], k: int) -> list[list[tuple[int, float]]]:
        """(chunk id, cosine) of the top-k chunks per question, from the FAISS structure."""
        if not questions:
            return []
        vectors = self.model(questions)
        scores, ids = self.store.index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(self)))
        return [[(int(i), float(s)) for i, s in zip(id_row, score_row) if i >= 0]
                for id_row, score_row in zip(ids, scores)]

    def bm25(self, question: str, k: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score) of the top-k chunks; chunks that share no term with the question are left out."""
        if self._bm25 is None:
            self._bm25 = BM25(self.store.table["text"])
        scores = self._bm25.scores(question)
        ids = self.store.table["chunk_id"]
        return [(int(ids[i]), float(scores[i])) for i in top_k(scores, k) if scores[i] > 0]
