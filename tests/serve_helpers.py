"""Tiny checkpoints and a live `lmforge serve` process for the serving tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from train_helpers import write_corpus


def make_tokenizer(root: Path):
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.train import train_tokenizer

    if not (root / "tok" / "tokenizer.json").exists():
        train_tokenizer(write_corpus(root / "corpus", docs=4), root / "tok", kind="char")
    return Tokenizer.load(root / "tok")


def make_gpt_ckpt(root: Path, block_size: int = 64, n_embd: int = 32, seed: int = 0) -> Path:
    """A random tiny GPT with lmforge's char tokenizer (chat role tokens included), saved as a checkpoint.

    Its output layer is zero on byte and control tokens and larger on the corpus' characters, so it
    writes readable characters (and never ends a reply itself: every reply runs to max_tokens)."""
    import torch

    from lmforge.models import GPT, ModelConfig
    from lmforge.train.checkpoint import save_checkpoint, tied_aliases

    tokenizer = make_tokenizer(root)
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=n_embd,
                            block_size=block_size, dropout=0.0))
    readable = torch.tensor([not tokenizer.id_to_token(i).startswith(("<0x", "<|")) for i in
                             range(tokenizer.vocab_size)])
    with torch.no_grad():
        model.lm_head.weight[~readable] = 0.0
        model.lm_head.weight[readable] *= 4.0
    path = root / "tiny-gpt"
    save_checkpoint(path, model.state_dict(), model.config.to_dict(), root / "tok" / "tokenizer.json", None,
                    drop=tied_aliases(model))
    return path


def make_bert_ckpt(root: Path, seed: int = 0) -> Path:
    """A random tiny BERT (an encoder: /v1/embeddings) with the same char tokenizer."""
    import torch

    from lmforge.models import BERT, ModelConfig
    from lmforge.train.checkpoint import save_checkpoint, tied_aliases

    tokenizer = make_tokenizer(root)
    torch.manual_seed(seed)
    config = ModelConfig(arch="bert", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16,
                         block_size=32, norm_position="post")
    model = BERT(config)
    path = root / "tiny-bert"
    save_checkpoint(path, model.state_dict(), config.to_dict(), root / "tok" / "tokenizer.json", None,
                    drop=tied_aliases(model))
    return path


class Server:
    """A `lmforge serve` subprocess on 127.0.0.1 (a free port chosen by the server itself).

    It runs torch on one thread: on a machine busier than its cores (the test machine), two OpenMP
    threads that wait for each other made every token about 10x slower."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 60.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lmforge", "serve", "--port", "0", *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.lines: list[str] = []
        self.url = None
        got_url = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.lines.append(line.rstrip("\n"))
                match = re.search(r"on (http://127\.0\.0\.1:\d+) ", line)
                if match and self.url is None:
                    self.url = match.group(1)
                    got_url.set()
            got_url.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        if not got_url.wait(timeout) or self.url is None:
            self.stop()
            raise RuntimeError("lmforge serve did not start:\n" + "\n".join(self.lines))
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("lmforge serve exited:\n" + "\n".join(self.lines))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError("lmforge serve never became ready:\n" + "\n".join(self.lines))

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log_records(self) -> list[dict]:
        """The JSON request log lines so far."""
        records = []
        for line in list(self.lines):
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
        return records

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.reader.join(5)
        return code


@contextlib.contextmanager
def running_server(args: list[str], env: dict[str, str] | None = None) -> Iterator[Server]:
    server = Server(args, env)
    try:
        yield server
    finally:
        server.stop()
