"""Rewards of a reward model: a GPT with a scalar head (`model.num_labels=1`, trained by
`objective: reward`), whose reward for a sequence is its score at the sequence's last token.

`sequence_rewards` is what PPO (`lmforge.posttrain.ppo`) and the post-training evaluation call;
`last_scores` is the same read-out on a padded batch, shared with the reward objective.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.models import eval_mode, has_capability, unwrap


def last_scores(scores: Tensor, lengths: Tensor) -> Tensor:
    """(B, num_labels) from per-position scores (B, T, num_labels): each row's score at its last
    real token (position lengths-1; right padding after it never changes it, attention is causal)."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores[rows, lengths.to(scores.device) - 1]


def right_pad(ids_list: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """(ids (B, T) padded on the right with pad_id, lengths (B,)) of token-id lists."""
    lengths = torch.tensor([len(ids) for ids in ids_list], dtype=torch.long)
    ids = torch.full((len(ids_list), int(lengths.max()) if len(ids_list) else 0), pad_id, dtype=torch.long)
    for row, seq in enumerate(ids_list):
        ids[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return ids, lengths


def check_reward_model(model: nn.Module) -> None:
    """A one-line UserError unless `model` has a scalar score head (a reward model)."""
    if not has_capability(model, "score") or unwrap(model).config.num_labels != 1:
        raise UserError("the model is not a reward model (it needs a scalar score head, model.num_labels=1); "
                        "train one with `lmforge align configs/reward.yaml --base DIR --data PAIRS --out DIR`")


@torch.no_grad()
def sequence_rewards(model: nn.Module, ids_list: Sequence[Sequence[int]], batch_size: int = 16) -> Tensor:
    """The reward (float32, shape (N,), on the model's device) of each token sequence: the score
    head's output at its last token, in eval mode (no dropout).

    Sequences are batched by length (right-padded, so padding never changes a score); one longer
    than the model's block_size is scored on its last block_size tokens.
    """
    check_reward_model(model)
    plain = unwrap(model)
    if any(len(ids) == 0 for ids in ids_list):
        raise ValueError("sequence_rewards: an empty token sequence has no last token to score")
    block = plain.config.block_size
    device = next(plain.parameters()).device
    order = sorted(range(len(ids_list)), key=lambda i: len(ids_list[i]))
    rewards = torch.empty(len(ids_list), dtype=torch.float32, device=device)
    with eval_mode(plain):
        for start in range(0, len(order), batch_size):
            picks = order[start:start + batch_size]
            ids, lengths = right_pad([list(ids_list[i])[-block:] for i in picks])
            scores = plain.scores(ids.to(device))
            rewards[torch.tensor(picks, device=device)] = last_scores(scores, lengths)[:, 0].float()
    return rewards


def plain_for_head(model: nn.Module, what: str) -> nn.Module:
    """The plain model inside a torch.compile wrapper, for a head method (`scores`, `classify`)
    called outside `forward`. DDP and FSDP2 run their hooks only through `forward`, so such a
    call would skip the gradient all-reduce (DDP) or the parameter all-gather (FSDP2): refused."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    m: nn.Module | None = model
    while m is not None:
        if isinstance(m, (DistributedDataParallel, FSDPModule)):
            raise UserError(f"{what} runs on one process for now (its head is called outside forward, which DDP "
                            "and FSDP2 hook); set train.parallel=none")
        m = next((x for x in (getattr(m, "_orig_mod", None), getattr(m, "module", None)) if isinstance(x, nn.Module)),
                 None)
    return unwrap(model)
