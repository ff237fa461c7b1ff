"""AdamW with the usual parameter groups, and the learning-rate schedule (linear warmup, cosine decay)."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only the weight matrices of Linear layers.

    Norm gains, biases and embeddings are excluded: decaying them pulls activations toward zero
    (norms) or penalizes rare tokens' vectors (embeddings) without a regularizing benefit.
    A tied lm_head shares the embedding matrix, so it is not decayed either.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay, no_decay = [], []
    for p in model.parameters():  # named_parameters dedups tied weights; so does parameters()
        if not p.requires_grad:
            continue
        if id(p) in linear_weights and id(p) not in embeddings and p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device_type: str) -> torch.optim.AdamW:
    # The fused kernel is one launch for all parameters on CUDA; on CPU it is one pass per
    # parameter instead of foreach's several (measured on 2 cores: nano ~7%, small ~1% faster).
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=1e-8,
                             fused=fused or None)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to `min_lr`."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
