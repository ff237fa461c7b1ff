"""Training and evaluation batches sampled from token shards (a directory from `lmforge tokenize`).

A batch is a pure function of (seed, step): the global batch of step `s` is drawn with a
generator seeded by `(seed, s)`, and each process takes its rows. This makes resume exact (the
"data position" is just the step) and makes N processes see the same global batch as one.
How windows become a batch (shifted targets, masking, span corruption) and how the global
batch is split into per-process micro-batches is the objective's part (`lmforge.train.objectives`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.errors import UserError
from lmforge.tokenizer.shards import load_split, read_meta


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

    def windows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n windows of block_size + 1 consecutive tokens (int64) at random starts drawn from rng."""
        starts = rng.integers(0, self.num_windows, size=n)
        return np.stack([self._window(int(s)) for s in starts]).astype(np.int64)

    def global_batch(self, seed: int, step: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets (rows, block_size) of the whole step, all processes."""
        xy = self.windows(np.random.default_rng([seed, step]), rows)
        return torch.from_numpy(xy[:, :-1]), torch.from_numpy(xy[:, 1:])
