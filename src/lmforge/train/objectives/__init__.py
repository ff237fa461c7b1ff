"""Training objectives: how a batch is cut from the data and what loss the model minimizes.

    objective: clm          next-token prediction (GPT)                      base.CausalLM
    objective: mlm          masked LM, optionally + next-sentence prediction  mlm.MaskedLM
    objective: span         T5 span corruption                               span.SpanCorruption
    objective: seq2seq      source -> target pairs from a JSONL file         seq2seq.Seq2Seq
    objective: contrastive  SimCSE sentence embeddings (BERT)                contrastive.Contrastive
    objective: sft          supervised fine-tuning on chat/instruction JSONL  sft.SFT
    objective: reward       reward model (scalar head) on preference pairs    reward.RewardModel
    objective: dpo          direct preference optimization (frozen reference) dpo.DPO
    objective: orpo         odds-ratio preference optimization (no reference) orpo.ORPO
    objective: classify     sequence classification (BERT or GPT) on JSONL    classify.Classify
    objective: distill      next-token prediction from a frozen teacher's     distill.Distill
                            soft targets (knowledge distillation)

Each objective is one class that owns its config section, checks, batch shapes, FLOPs and
memory factors (see `base.Objective`). Adding one: write the class (with its `Options`
dataclass if it has settings) in a module here and add it to `OBJECTIVES`; the config key
`objective`, the `cfg.<name>` section, `lmforge plan` and the training loop pick it up.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmforge.train.objectives.base import EVAL_STREAM, Batch, CausalLM, Objective
from lmforge.train.objectives.classify import Classify, ClassifyOptions
from lmforge.train.objectives.contrastive import Contrastive, ContrastiveOptions
from lmforge.train.objectives.distill import Distill, DistillOptions
from lmforge.train.objectives.dpo import DPO, DPOOptions
from lmforge.train.objectives.mlm import MaskedLM, MLMOptions
from lmforge.train.objectives.orpo import ORPO, ORPOOptions
from lmforge.train.objectives.ppo import PPO, PPOOptions
from lmforge.train.objectives.reward import RewardModel
from lmforge.train.objectives.seq2seq import PairSource, Seq2Seq
from lmforge.train.objectives.sft import SFT, SFTOptions
from lmforge.train.objectives.span import SpanCorruption, SpanOptions, span_counts, span_lengths
from lmforge.train.objectives.tokens import (
    MASK,
    MASK_FALLBACKS,
    NUM_SENTINELS,
    find_token,
    padded_vocab,
    sentinel,
    special_ids,
    token_fallbacks,
    with_tokens,
)

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (CausalLM, MaskedLM, SpanCorruption, Contrastive, Seq2Seq, PPO, SFT,
                              RewardModel, DPO, ORPO, Classify)
}
OBJECTIVES[Distill.name] = Distill


def objective_class(name: str) -> type[Objective]:
    """The objective registered as `name` (the config loader has already checked it exists)."""
    return OBJECTIVES[name]


def objective_for(cfg: Any, tokenizer: Any, model_config: Any,
                  models: dict[str, nn.Module] | None = None) -> Objective:
    """The objective `cfg.objective` names, checked against the model (`Objective.check`);
    `models`: the extra models it reads (`Objective.needs_models`, e.g. DPO's reference)."""
    cls = OBJECTIVES[cfg.objective]
    cls.check(model_config)
    return cls(cfg, tokenizer, model_config, models)


__all__ = [
    "SFT", "SFTOptions",
    "EVAL_STREAM", "MASK", "MASK_FALLBACKS", "NUM_SENTINELS", "OBJECTIVES", "Batch", "CausalLM", "Contrastive",
    "ContrastiveOptions", "MLMOptions", "MaskedLM", "Objective", "PPO", "PPOOptions", "PairSource", "Seq2Seq",
    "SpanCorruption", "SpanOptions", "find_token", "objective_class", "objective_for", "padded_vocab", "sentinel",
    "span_counts", "span_lengths", "special_ids", "token_fallbacks", "with_tokens",
    "DPO", "Classify", "ClassifyOptions", "DPOOptions", "ORPO", "ORPOOptions", "RewardModel",
    "Distill", "DistillOptions",
]
