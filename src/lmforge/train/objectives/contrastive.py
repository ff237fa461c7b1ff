"""SimCSE sentence embeddings: `objective: contrastive`, section `contrastive`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.train.batches import TokenBatches
from lmforge.train.objectives.base import EVAL_STREAM, Batch, Objective


@dataclass
class ContrastiveOptions:
    temperature: float = 0.05  # SimCSE's

    def check(self, where: str) -> None:
        if self.temperature <= 0:
            raise UserError(f"{where}config key contrastive.temperature: must be > 0, got {self.temperature}")


class Contrastive(Objective):
    """SimCSE (Gao et al. 2021), unsupervised: a text and itself under another dropout mask are
    a positive pair, every other text in the batch is a negative.

    loss = cross_entropy(cos(z1_i, z2_j) / temperature, target j = i), with z the encoder's
    mean-pooled sentence vectors (`model(..., return_embeddings=True)`). Dropout is the only
    augmentation, so `model.dropout` must be > 0. The val loss uses the same two dropout views
    under a fixed seed per eval batch, so it is comparable across evals.
    """

    name, arch, Options = "contrastive", "bert", ContrastiveOptions
    output = "embeddings"  # mean-pooled sentence vectors: the MLM head never runs
    uses_all_parameters = False  # the MLM head (and heads) take no part in the sentence vectors
    views = 2  # both dropout views of each example through the encoder

    @classmethod
    def check(cls, model_config: Any) -> None:
        super().check(model_config)
        if model_config.dropout <= 0:
            raise UserError("objective contrastive: model.dropout must be > 0 (dropout makes the two views "
                            "of each text differ); try model.dropout=0.1")

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any, models: dict | None = None) -> None:
        super().__init__(cfg, tokenizer, model_config, models)
        self.temperature = cfg.contrastive.temperature
        self.cls_id, self.sep_id = tokenizer.bos_id, tokenizer.eos_id

    def window_length(self, block_size: int) -> int:
        return block_size - 2

    @classmethod
    def model_flops(cls, model: nn.Module, seq_len: int, decoder_len: int | None) -> float:
        """Both views through the encoder; the MLM head never runs."""
        return cls.views * float(model.flops_per_token(seq_len, mlm_head=False))

    def make_batch(self, windows: np.ndarray, rng: np.random.Generator, source: TokenBatches) -> Batch:
        rows = len(windows)
        ids = np.concatenate([np.full((rows, 1), self.cls_id), windows, np.full((rows, 1), self.sep_id)], axis=1)
        return {"input_ids": torch.from_numpy(ids)}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        ids = batch["input_ids"]
        # one forward over both views (2B rows): dropout draws independent masks for each copy
        z = model(torch.cat([ids, ids]), None, return_embeddings=True)[0].float()
        z = F.normalize(z, dim=-1)
        z1, z2 = z[: len(ids)], z[len(ids):]
        logits = z1 @ z2.T / self.temperature
        return F.cross_entropy(logits, torch.arange(len(ids), device=logits.device))

    def eval_loss(self, model: nn.Module, batch: Batch, index: int) -> Tensor:
        was_training = model.training
        model.train()  # the views differ only through dropout
        devices = [batch["input_ids"].device] if batch["input_ids"].is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(EVAL_STREAM + index)
            loss = self.loss(model, batch)
        model.train(was_training)
        return loss

