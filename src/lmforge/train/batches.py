"""Training and evaluation batches sampled from token shards (a directory from `lmforge tokenize`).

A batch is a pure function of (seed, step): the global batch of step `s` is drawn with a
generator seeded by `(seed, s)`, and each process takes its rows. This makes resume exact (the
"data position" is just the step) and makes N processes see the same global batch as one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.errors import UserError
from lmforge.tokenizer.shards import load_split, read_meta

_EVAL_STREAM = 1 << 40  # generator stream for eval batches, far from any training step


class TokenBatches:
    def __init__(self, tokens_dir: str | Path, split: str, block_size: int):
        self.dir = Path(tokens_dir)
        self.meta = read_meta(self.dir)
        if split not in self.meta.get("splits", {}):
            raise UserError(f"{self.dir}: has no {split!r} split; re-run `lmforge tokenize`")
        self.shards = load_split(self.dir, split)
        self.block_size = block_size
        # the shards form one token stream (a document may continue into the next shard);
        # a window may start anywhere that leaves block_size + 1 tokens
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.num_windows = int(self.offsets[-1]) - block_size
        if self.num_windows <= 0:
            raise UserError(
                f"{self.dir}/{split}: only {int(self.offsets[-1])} tokens, fewer than model.block_size+1 = "
                f"{block_size + 1}; add data or lower model.block_size"
            )
        self.split = split

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def _window(self, start: int) -> np.ndarray:
        end = start + self.block_size + 1
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        while start < end:
            local = start - self.offsets[i]
            take = min(end - start, len(self.shards[i]) - local)
            pieces.append(self.shards[i][local:local + take])
            start += take
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _rows(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        starts = rng.integers(0, self.num_windows, size=n)
        xy = np.stack([self._window(int(s)) for s in starts]).astype(np.int64)
        return xy[:, :-1], xy[:, 1:]

    def global_batch(self, seed: int, step: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([seed, step])
        x, y = self._rows(rng, rows)
        return torch.from_numpy(x), torch.from_numpy(y)

    def batch_for(self, seed: int, step: int, batch_size: int, grad_accum: int, rank: int,
                  world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batches of this process for optimizer step `step`."""
        x, y = self.global_batch(seed, step, batch_size * grad_accum * world_size)
        per_rank = batch_size * grad_accum
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, per_rank, batch_size)]

    def eval_batches(self, seed: int, eval_steps: int, batch_size: int, rank: int, world_size: int):
        """Fixed val batches (same every eval, so val losses are comparable across steps)."""
        for i in range(eval_steps):
            yield from self.batch_for(seed, _EVAL_STREAM + i, batch_size, 1, rank, world_size)
