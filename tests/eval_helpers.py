"""Shared helpers for the eval tests: a tokenizer trained in the test, a tiny random GPT, task files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.models import GPT, ModelConfig
from lmforge.tokenizer import Tokenizer


def make_checkpoint(root: Path, block_size: int = 48, seed: int = 0) -> tuple[Path, GPT, Tokenizer]:
    """A checkpoint dir (random tiny GPT + a BPE tokenizer trained here); returns (dir, model, tokenizer)."""
    from train_helpers import write_corpus

    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.train.checkpoint import save_checkpoint, tied_aliases

    corpus = write_corpus(root / "corpus", docs=8)
    train_tokenizer(corpus, root / "tok", kind="bpe", vocab_size=300)
    tokenizer = Tokenizer.load(root / "tok")
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=320, n_layer=2, n_head=2, n_embd=32, block_size=block_size)
    model = GPT(config).eval()
    ckpt = save_checkpoint(root / "ckpt", model.state_dict(), config.to_dict(), root / "tok" / "tokenizer.json", None,
                           drop=tied_aliases(model))
    return ckpt, model, tokenizer


def direct_logprob(model: GPT, ids: list[int], n_continuation: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) over the last n_continuation tokens: one unpadded forward pass."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    logprobs = F.log_softmax(logits[0].double(), dim=-1)
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(len(ids) - n_continuation, len(ids)))


def write_task(path: Path, items: list[dict], header: dict | None = None, raw_lines: list[str] | None = None) -> Path:
    lines = ([json.dumps({"task": header})] if header is not None else []) + [json.dumps(i) for i in items]
    lines += raw_lines or []
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
