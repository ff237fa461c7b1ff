"""Odds-Ratio Preference Optimization: `objective: orpo`, section `orpo`, on preference pairs.

ORPO (Hong et al. 2024; trl's `ORPOTrainer`) needs no reference model: it adds to the chosen
reply's language-modelling loss a term that raises the odds of the chosen reply over the rejected
one,

    loss = NLL(chosen reply) - weight * log sigmoid(log odds(c) - log odds(r)),
    log odds(y) = log p(y) - log(1 - p(y)),  log p(y) = mean log-probability of y's tokens

(the NLL is the mean over the chosen replies' tokens, the end-of-turn token included; the
prompt's tokens carry no loss). Each step reports `pref_acc` (pairs whose chosen reply has the
higher mean log-probability), `margin` (the mean log odds ratio) and `nll` in metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.train.objectives.base import Batch
from lmforge.train.objectives.preference import PairObjective, both_sides, reply_logps


@dataclass
class ORPOOptions:
    weight: float = 0.1  # lambda: weight of the odds-ratio term (trl's beta, the paper's lambda)

    def check(self, where: str) -> None:
        if not self.weight >= 0:
            raise UserError(f"{where}config key orpo.weight: must be >= 0, got {self.weight}")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor) -> tuple[Tensor, Tensor]:
    """(log sigmoid(log odds ratio) per pair, the log odds ratio) from mean reply log-probs, in fp32."""
    c, r = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return F.logsigmoid(log_odds), log_odds


def orpo_loss(nll: Tensor, chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, weight: float) -> Tensor:
    """NLL of the chosen replies minus weight * the mean log sigmoid of the log odds ratio."""
    ratio, _ = odds_ratio(chosen_mean_logps, rejected_mean_logps)
    return nll - weight * ratio.mean()


class ORPO(PairObjective):
    """ORPO: SFT on the chosen reply plus an odds-ratio preference term (see the module doc)."""

    name, Options = "orpo", ORPOOptions

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        ids, mask, _ = both_sides(batch)
        sums, counts = reply_logps(model(ids)[0], ids, mask)
        means = sums / counts.clamp(min=1)
        (chosen_sum, _), (chosen_count, _) = sums.chunk(2), counts.chunk(2)
        nll = -chosen_sum.sum() / chosen_count.sum().clamp(min=1)
        chosen, rejected = means.chunk(2)
        _, log_odds = odds_ratio(chosen.detach(), rejected.detach())
        self.record(model, pref_acc=(chosen > rejected).float(), margin=log_odds, nll=nll)
        return orpo_loss(nll, chosen, rejected, self.cfg.orpo.weight)
