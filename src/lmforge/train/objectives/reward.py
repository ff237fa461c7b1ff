"""Reward model: `objective: reward` on preference pairs (`data.file`).

The base causal LM gets a scalar head (`model.num_labels=1`: `GPT.score`, freshly initialized,
declared in `new_heads` so the base checkpoint may lack it); a conversation's reward is the
head's output at its last token (`lmforge.posttrain.reward`). The loss is Bradley–Terry's
(InstructGPT; trl's `RewardTrainer`): the chosen reply should out-score the rejected one,

    loss = -log sigmoid(r(prompt + chosen) - r(prompt + rejected))

averaged over the pairs. Each step reports `pref_acc` (the share of pairs ranked right) and
`margin` (the mean r_chosen - r_rejected) in metrics.jsonl.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.posttrain.reward import last_scores, plain_for_head
from lmforge.train.objectives.base import Batch
from lmforge.train.objectives.preference import PairObjective, both_sides


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """-log sigmoid(r_chosen - r_rejected) per pair, in fp32."""
    return -F.logsigmoid(chosen.float() - rejected.float())


class RewardModel(PairObjective):
    """Bradley–Terry reward-model training on preference pairs (see the module doc)."""

    name = "reward"
    new_heads = ("score.weight",)
    uses_all_parameters = False  # the LM head takes no part (an untied one gets no gradient)

    @classmethod
    def configure_model(cls, cfg: Any, model_config: Any) -> None:
        """One scalar score per position; the run's config.yaml says so too."""
        model_config.num_labels = cfg.model.num_labels = 1

    def pair_rewards(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """(rewards of the chosen conversations (B,), of the rejected (B,)), from one pass over the 2B rows."""
        ids, _, lengths = both_sides(batch)
        scores = plain_for_head(model, "objective reward").scores(ids)
        return last_scores(scores, lengths)[:, 0].float().chunk(2)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        chosen, rejected = self.pair_rewards(model, batch)
        self.record(model, pref_acc=(chosen > rejected).float(), margin=chosen - rejected)
        return bradley_terry_loss(chosen, rejected).mean()
