"""Shared helpers for the preference / reward / classify tests: a tiny chat tokenizer, pair files,
a tiny config and model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from train_helpers import WORDS, write_corpus

from lmforge.config import load_config
from lmforge.models import GPT, ModelConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train.objectives import padded_vocab

GOOD = ("love", "good", "rise")  # the chosen replies: same length as the rejected ones, so length says nothing
BAD = ("dead", "lord", "king")


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest (and the machine is shared); use with
    `pytestmark = pytest.mark.usefixtures("one_thread")` after importing it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chat_tokenizer(tmp: Path) -> Tokenizer:
    """A char tokenizer with lmforge's chat tokens, trained on the test corpus."""
    from lmforge.tokenizer.train import train_tokenizer

    if not (tmp / "tok" / "tokenizer.json").is_file():
        train_tokenizer(write_corpus(tmp / "corpus", docs=4), tmp / "tok", kind="char", vocab_size=None)
    return Tokenizer.load(tmp / "tok" / "tokenizer.json")


def write_pairs(path: Path, n: int = 48, seed: int = 0) -> Path:
    """n pairs: a prompt of random words, chosen one of GOOD, rejected one of BAD (learnable)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
            f.write(json.dumps({"prompt": prompt, "chosen": rng.choice(GOOD), "rejected": rng.choice(BAD)}) + "\n")
    return path


def pair_config(objective: str, data: Path, *overrides: str):
    return load_config(None, [f"objective={objective}", f"data.file={data}", "model.n_layer=2", "model.n_head=2",
                              "model.n_embd=32", "model.block_size=48", "train.batch_size=8", "train.seed=0",
                              *overrides])


def tiny_gpt(tokenizer: Tokenizer, num_labels: int = 0, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=padded_vocab(tokenizer.vocab_size), n_layer=2, n_head=2, n_embd=32,
                           block_size=48, num_labels=num_labels))


def save_base(tmp: Path, tokenizer: Tokenizer, seed: int = 0, arch: str = "gpt") -> Path:
    """A tiny randomly initialized checkpoint dir (a base for `lmforge align`)."""
    from lmforge.models import BERT
    from lmforge.train import checkpoint as ckpt

    if arch == "gpt":
        model = tiny_gpt(tokenizer, seed=seed)
    else:
        model = BERT(ModelConfig(arch="bert", vocab_size=padded_vocab(tokenizer.vocab_size), n_layer=2, n_head=2,
                                 n_embd=32, block_size=48, norm_position="post"))
    path = tmp / f"base-{arch}-{seed}"
    ckpt.save_checkpoint(path, model.state_dict(), model.config.to_dict(), Path(tokenizer.source), None,
                         drop=ckpt.tied_aliases(model))
    return path
