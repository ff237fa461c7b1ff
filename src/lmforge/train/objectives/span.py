"""T5's span corruption: `objective: span`, section `span`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.train.batches import TokenBatches
from lmforge.train.objectives.base import Batch, Objective
from lmforge.train.objectives.tokens import NUM_SENTINELS, find_token, sentinel


@dataclass
class SpanOptions:
    noise_density: float = 0.15  # share of tokens corrupted (T5)
    mean_span_length: float = 3.0

    def check(self, where: str) -> None:
        if not 0 < self.noise_density < 1 or self.mean_span_length < 1:
            raise UserError(f"{where}config key span.noise_density: need 0 < noise_density < 1 and "
                            f"mean_span_length >= 1, got {self.noise_density}, {self.mean_span_length}")


def span_counts(opts: Any, length: int) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of `length` tokens under the `span` options."""
    noise = min(max(round(length * opts.noise_density), 1), length - 1)
    spans = max(round(noise / opts.mean_span_length), 1)
    return noise, spans


def span_lengths(opts: Any, block_size: int) -> tuple[int, int, int]:
    """(raw window, encoder input, decoder target) lengths of span corruption: the longest raw
    window whose corrupted input (kept tokens + one sentinel per span + EOS) and target (sentinels
    + noise + EOS) both fit `block_size`. `lmforge plan` sizes span runs with it too."""
    for length in range(2 * block_size, 1, -1):
        noise, spans = span_counts(opts, length)
        if length - noise + spans + 1 <= block_size and noise + spans + 1 <= block_size:
            if spans > NUM_SENTINELS:
                raise UserError(f"span: {spans} noise spans per example need more than {NUM_SENTINELS} "
                                "sentinels; lower model.block_size or raise span.mean_span_length")
            return length, length - noise + spans + 1, noise + spans + 1
    raise UserError(f"model.block_size={block_size} is too short for span corruption")


class SpanCorruption(Objective):
    """T5's span corruption (Raffel et al. 2020, `random_spans_noise_mask`).

    Of a window of R tokens, round(R * noise_density) are noise, in round(noise /
    mean_span_length) spans at random places; the encoder reads the window with each span
    replaced by one sentinel (`<|extra_id_0|>`, `<|extra_id_1|>`, ...) and an [EOS]; the decoder
    writes each sentinel followed by the tokens it replaced, then [EOS]. R is the longest
    window whose corrupted input fits `model.block_size` (so R > block_size, as in T5: 70
    tokens -> 64 inputs at the defaults); all examples have the same shape.
    """

    name, arch, Options = "span", "encdec", SpanOptions
    extra_tokens = tuple(sentinel(i) for i in range(NUM_SENTINELS))

    @classmethod
    def lengths(cls, cfg: Any, block_size: int) -> tuple[int, int | None]:
        """The encoder reads the corrupted window, the decoder writes sentinels + spans + [EOS]."""
        return span_lengths(cfg.span, block_size)[1:]

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any, models: dict | None = None) -> None:
        super().__init__(cfg, tokenizer, model_config, models)
        self.opts = cfg.span
        self.eos_id = tokenizer.eos_id
        self.pad_id = tokenizer.pad_id
        self.sentinels = np.array([find_token(tokenizer, sentinel(i), (f"<extra_id_{i}>",))
                                   for i in range(NUM_SENTINELS)], dtype=np.int64)
        self.raw_length, self.input_length, self.target_length = span_lengths(self.opts, model_config.block_size)

    def window_length(self, block_size: int) -> int:
        return self.raw_length

    def noise_mask(self, length: int, rng: np.random.Generator) -> np.ndarray:
        """Bool (length,): which tokens are noise; spans alternate non-noise, noise, ..."""
        noise, spans = span_counts(self.opts, length)

        def segment(items: int, parts: int) -> np.ndarray:  # random composition of items into parts >= 1
            first = np.zeros(items, dtype=bool)
            first[1 + rng.permutation(items - 1)[:parts - 1]] = True
            return np.bincount(np.cumsum(first), minlength=parts)

        lengths = np.stack([segment(length - noise, spans), segment(noise, spans)], axis=1).reshape(-1)
        return np.repeat(np.tile([False, True], spans), lengths)

    def make_batch(self, windows: np.ndarray, rng: np.random.Generator, source: TokenBatches) -> Batch:
        inputs, labels = [], []
        for row in windows:
            noise = self.noise_mask(len(row), rng)
            starts = noise & ~np.concatenate([[False], noise[:-1]])  # first token of each span
            k = int(starts.sum())
            # encoder: the window with span i replaced by sentinel i
            inp = np.where(starts, self.sentinels[np.cumsum(starts) - 1], row)[~noise | starts]
            # decoder: sentinel i, then the tokens of span i, for every span
            out = np.insert(row[noise], np.flatnonzero(starts[noise]), self.sentinels[:k])
            inputs.append(np.concatenate([inp, [self.eos_id]]))
            labels.append(np.concatenate([out, [self.eos_id]]))
        return {"input_ids": torch.from_numpy(np.stack(inputs)), "labels": torch.from_numpy(np.stack(labels))}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["input_ids"], batch["labels"])[1]

