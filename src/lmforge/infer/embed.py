"""Sentence embeddings from an encoder checkpoint: texts in, one vector per text out.

    lmforge embed --ckpt runs/minilm --input texts.txt --out vectors.npy

A text becomes `[CLS] tokens [SEP]`, cut to the model's max sequence length; the encoder's last
hidden states are averaged over the real (non-padding) tokens and L2-normalized. That is what
sentence-transformers does for all-MiniLM-L6-v2 (Transformer -> mean Pooling -> Normalize), so
a converted sentence-transformers model gives the same vectors here as there. The max length
is the sentence-transformers `max_seq_length` when the checkpoint came from such a model
(`sentence_bert_config.json`, kept by `lmforge convert from-hf`), else the model's context.

Texts are batched longest-first (little padding per batch) and returned in input order; the
padding mask keeps a text's vector independent of what it was batched with.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge.data.readers import iter_jsonl_objects
from lmforge.errors import UserError
from lmforge.fsutil import atomic_write_bytes, atomic_write_text
from lmforge.models import eval_mode, has_capability

SENTENCE_CONFIG = "sentence_bert_config.json"  # sentence-transformers' name for max_seq_length & co


def max_seq_length(ckpt: Path, config: Any) -> int:
    """The checkpoint's sentence-transformers max_seq_length (capped by the context), else the context."""
    file = Path(ckpt) / SENTENCE_CONFIG
    if file.is_file():
        try:
            value = json.loads(file.read_text()).get("max_seq_length")
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{file}: invalid JSON object; fix or delete it") from None
        if value is not None:
            if not isinstance(value, int) or value < 2:
                raise UserError(f"{file}: max_seq_length must be an integer >= 2, got {value!r}")
            return min(value, config.block_size)
    return config.block_size


def embed_texts(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, max_length: int,
                batch_size: int = 32, normalize: bool = True, progress: bool = False) -> np.ndarray:
    """(len(texts), n_embd) float32 sentence vectors, in the order of `texts`.

    The model needs `embed(input_ids, attention_mask)` (BERT); texts are wrapped, cut and padded
    by the tokenizer (`Tokenizer.__call__` and `pad`: [CLS] and [SEP] count in max_length). Runs
    on the model's device, without gradients.
    """
    if not has_capability(model, "embed"):
        raise UserError(f"{type(model).__name__} models have no sentence embeddings; use an encoder "
                        "(model.arch bert) checkpoint")
    if max_length < 2:
        raise UserError(f"max length {max_length} leaves no room for a token besides [CLS] and [SEP]")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if tokenizer.num_special_tokens_to_add() == 0:
        raise UserError(f"{tokenizer.source} adds no [CLS]/[SEP] to a text; use the tokenizer the encoder was "
                        "trained with (lmforge's) or converted with (an HF BERT's)")
    device = next(model.parameters()).device
    rows = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]  # [CLS] text [SEP]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = np.zeros((len(rows), model.config.n_embd), dtype=np.float32)
    with eval_mode(model):
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc="embed", unit="batch",
                              disable=not progress, leave=False):
                batch = order[start:start + batch_size]
                padded = tokenizer.pad([rows[i] for i in batch], return_tensors="pt")
                vectors = model.embed(padded["input_ids"].to(device),
                                      attention_mask=padded["attention_mask"].to(device)).float()
                if normalize:
                    vectors = F.normalize(vectors, dim=-1)
                out[batch] = vectors.cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# Files


def read_texts(path: str | Path) -> list[str]:
    """Texts from a .jsonl file (a "text" field per line), any other file (one text per
    non-empty line), or "-" (stdin, one per line)."""
    if str(path) == "-":
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a text file (one text per line) or a .jsonl file")
    if path.suffix != ".jsonl":
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return [line for line in lines if line.strip()]
    texts = []
    for number, record in iter_jsonl_objects(path):
        if not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{number}: expected an object with a string \"text\" field")
        texts.append(record["text"])
    return texts


def write_vectors(vectors: np.ndarray, texts: Sequence[str], out: str | Path | None) -> None:
    """`.npy` (an (N, d) float32 array), else JSON lines {"index", "text", "embedding"} (stdout
    when out is None or "-"). Files are written atomically."""
    if out is not None and str(out) != "-" and Path(out).suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        atomic_write_bytes(out, buffer.getvalue())
        return
    lines = "".join(json.dumps({"index": i, "text": t, "embedding": v.tolist()}, ensure_ascii=False) + "\n"
                    for i, (t, v) in enumerate(zip(texts, vectors)))
    if out is None or str(out) == "-":
        sys.stdout.write(lines)
    else:
        atomic_write_text(out, lines)


def embed_command(ckpt: str | Path, texts: Sequence[str], out: str | Path | None, *, batch_size: int = 32,
                  max_length: int | None = None, device: str = "cpu", normalize: bool = True) -> dict[str, Any]:
    """`lmforge embed`: load a checkpoint, embed `texts`, write them; returns a few numbers."""
    from lmforge.train.checkpoint import load_pretrained, resolve_checkpoint

    if out is not None and str(out) != "-" and Path(out).suffix not in (".npy", ".jsonl"):
        raise UserError(f"--out {out}: write vectors to FILE.npy (an N x dim array) or FILE.jsonl (JSON lines), "
                        f"or leave --out out for JSON lines on stdout")
    t0 = time.perf_counter()
    path = resolve_checkpoint(ckpt)
    model, tokenizer = load_pretrained(path, device)
    limit = max_seq_length(path, model.config)
    if max_length is not None:
        if max_length > model.config.block_size:
            raise UserError(f"--max-length {max_length} is longer than the model's context "
                            f"{model.config.block_size}; use at most that")
        limit = max_length
    vectors = embed_texts(model, tokenizer, texts, max_length=limit, batch_size=batch_size,
                          normalize=normalize, progress=True)
    write_vectors(vectors, texts, out)
    return {"texts": len(texts), "dim": int(vectors.shape[1]), "max_length": limit,
            "seconds": time.perf_counter() - t0}
