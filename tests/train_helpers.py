"""Shared helpers for the training tests: a tiny corpus, its token dir, a tiny config."""

from __future__ import annotations

import random
from pathlib import Path

from lmforge.config import load_config

WORDS = ("the king my lord shall speak of love and death upon this night good sir "
         "i pray thee tell me what thou art for now the sun doth rise").split()


def write_corpus(root: Path, docs: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        lines = []
        for _ in range(40):
            speaker = rng.choice(["KING", "LEAR", "ROMEO", "JULIET"])
            lines.append(f"{speaker}:\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + ".\n")
        (root / f"doc{d:02d}.txt").write_text("\n".join(lines))
    return root


def make_token_dir(tmp: Path, kind: str = "char") -> Path:
    from lmforge.tokenizer.shards import tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer

    corpus = write_corpus(tmp / "corpus")
    train_tokenizer(corpus, tmp / "tok", kind=kind, vocab_size=None if kind == "char" else 300)
    tokenize_corpus(tmp / "tok", corpus, tmp / "tokens", val_fraction=0.15)
    return tmp / "tokens"


def tiny_config(tokens: Path, *overrides: str):
    base = [
        f"data.tokens={tokens}", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "model.block_size=32", "train.batch_size=4", "train.max_steps=40", "train.warmup_steps=5",
        "train.lr=3e-3", "train.min_lr=3e-4", "train.eval_every=10", "train.eval_steps=2",
        "train.precision=fp32", "train.threads=1",
    ]
    return load_config(None, base + list(overrides))


def trained_run(root: Path, *overrides: str) -> Path:
    """A tiny GPT pretrained on a char token dir under `root` (the run records its token dir): `root/run`."""
    from lmforge.train.loop import pretrain

    pretrain(tiny_config(make_token_dir(root), *overrides), root / "run")
    return root / "run"


def perturbed_checkpoint(path: Path, config: dict, tokenizer_file: Path | None = None):
    """A model built from `config` with its weights perturbed off the init (so greedy tokens vary),
    saved as a checkpoint dir at `path`: (model in eval mode, path)."""
    import torch

    from lmforge.models import ModelConfig, build_model
    from lmforge.train.checkpoint import save_checkpoint, tied_aliases

    torch.manual_seed(0)
    model_config = ModelConfig(**config)
    model = build_model(model_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint(path, model.state_dict(), model_config.to_dict(), tokenizer_file, None, drop=tied_aliases(model))
    return model.eval(), path
