"""BERT's masked LM (+ optional next-sentence prediction): `objective: mlm`, section `mlm`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.train.batches import TokenBatches
from lmforge.train.objectives.base import Batch, Objective
from lmforge.train.objectives.tokens import MASK, MASK_FALLBACKS, find_token, special_ids


@dataclass
class MLMOptions:
    mask_prob: float = 0.15  # share of ordinary tokens chosen (then 80% [MASK] / 10% random / 10% kept)
    nsp: bool = False  # add next-sentence prediction (BERT's second pretraining task)

    def check(self, where: str) -> None:
        if not 0 < self.mask_prob < 1:
            raise UserError(f"{where}config key mlm.mask_prob: must be in (0, 1), got {self.mask_prob}")


class MaskedLM(Objective):
    """BERT's masked LM (+ optional next-sentence prediction), Devlin et al. 2019.

    Each example is `[CLS] A [SEP]` (or `[CLS] A [SEP] B [SEP]` with NSP) cut from the stream.
    `mlm.mask_prob` (0.15) of the ordinary tokens are chosen independently; of those 80% become
    [MASK], 10% a random ordinary token, 10% stay; labels hold the original id at chosen
    positions and -100 elsewhere. With NSP, A and B are split at a random point of one window
    (B follows A, label 0) or, for half of the examples, B is the same-length tail of another
    random window (label 1).
    """

    name, arch, extra_tokens, Options = "mlm", "bert", (MASK,), MLMOptions

    @classmethod
    def configure_model(cls, cfg: Any, model_config: Any) -> None:
        if cfg.mlm.nsp:  # next-sentence prediction trains the NSP head; the run's config.yaml says so too
            model_config.nsp_head = cfg.model.nsp_head = True

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any, models: dict | None = None) -> None:
        super().__init__(cfg, tokenizer, model_config, models)
        self.opts = cfg.mlm
        self.cls_id, self.sep_id = tokenizer.bos_id, tokenizer.eos_id
        self.mask_id = find_token(tokenizer, MASK, MASK_FALLBACKS)
        special = special_ids(tokenizer)
        self.special = np.array(sorted(special), dtype=np.int64)
        self.ordinary = np.array([i for i in range(tokenizer.vocab_size) if i not in special], dtype=np.int64)

    def window_length(self, block_size: int) -> int:
        length = block_size - (3 if self.opts.nsp else 2)
        if length < 4:
            raise UserError(f"model.block_size={block_size} is too short for mlm; use at least {4 + 3}")
        return length

    def make_batch(self, windows: np.ndarray, rng: np.random.Generator, source: TokenBatches) -> Batch:
        rows, n = windows.shape
        token_type = np.zeros((rows, self.model_config.block_size), dtype=np.int64)
        if not self.opts.nsp:
            ids = np.concatenate([np.full((rows, 1), self.cls_id), windows, np.full((rows, 1), self.sep_id)], axis=1)
            nsp = None
        else:
            cut = rng.integers(n // 4, n - n // 4, size=rows, endpoint=True)
            nsp = (rng.random(rows) < 0.5).astype(np.int64)  # 1 = B is random (HF convention)
            others = source.windows(rng, rows)[:, :n]
            ids = np.empty((rows, n + 3), dtype=np.int64)
            for r in range(rows):
                a = windows[r, :cut[r]]
                b = others[r, cut[r]:] if nsp[r] else windows[r, cut[r]:]
                ids[r] = np.concatenate([[self.cls_id], a, [self.sep_id], b, [self.sep_id]])
                token_type[r, len(a) + 2:] = 1
        ids, labels = self.mask_tokens(ids, rng)
        batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                 "token_type_ids": torch.from_numpy(token_type[:, :ids.shape[1]])}
        if nsp is not None:
            batch["next_sentence_label"] = torch.from_numpy(nsp)
        return batch

    def mask_tokens(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """BERT's 80/10/10 corruption of `mask_prob` of the non-special tokens."""
        chosen = (rng.random(ids.shape) < self.opts.mask_prob) & ~np.isin(ids, self.special)
        labels = np.where(chosen, ids, -100)
        action = rng.random(ids.shape)
        random_ids = self.ordinary[rng.integers(0, len(self.ordinary), size=ids.shape)]
        out = np.where(chosen & (action < 0.8), self.mask_id, ids)
        out = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, out)
        return out, labels

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["input_ids"], batch["labels"], token_type_ids=batch["token_type_ids"],
                     next_sentence_label=batch.get("next_sentence_label"))[1]

