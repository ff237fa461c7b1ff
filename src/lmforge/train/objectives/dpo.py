"""Direct Preference Optimization: `objective: dpo`, section `dpo`, on preference pairs (`data.file`).

DPO (Rafailov et al. 2023; trl's `DPOTrainer`, loss_type "sigmoid") trains the policy to raise
the chosen reply's log-probability relative to a frozen reference more than the rejected one's:

    loss = -log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))])

with log pi(y) the summed log-probability of a reply's tokens after its prompt. The implicit
rewards beta * (log pi - log ref) give `pref_acc` (the share of pairs whose chosen reward is the
higher) and `margin` (their mean difference) in metrics.jsonl.

The reference is the base model. With an adapter that leaves the base weights alone (lora,
qlora, prefix, prompt) it is the policy itself with its adapters disabled
(`lmforge.adapters.adapters_disabled`): one base serves as both. Full (and freeze) fine-tuning
changes the base weights, so the run needs a frozen copy, `models={"reference": ...}` (what
`lmforge align` passes). `dpo.reference`:

- `precompute` (default): each pair's reference log-probs are computed once and read from a
  table: with a copy, every pair's before the policy is built (the copy is then released: moved
  to the meta device), so nothing of the reference stays in memory while training; with the
  adapter-disabled policy, each pair's the first time a batch holds it.
- `live`: the reference runs on each batch (no_grad): one more forward per step, and a copy
  stays in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmforge.errors import UserError
from lmforge.models import eval_mode, unwrap
from lmforge.train.objectives.base import Batch
from lmforge.train.objectives.preference import (
    SPLIT_CODES,
    PairObjective,
    PreferenceSource,
    both_sides,
    pair_batch,
    reply_logps,
)

REFERENCES = ("precompute", "live")
KEEPS_BASE = ("lora", "qlora", "prefix", "prompt")  # adapter methods whose disabled model is the base


@dataclass
class DPOOptions:
    beta: float = 0.1  # strength of the pull towards the reference (trl's default)
    reference: str = "precompute"  # precompute | live: see lmforge.train.objectives.dpo

    def check(self, where: str) -> None:
        if not self.beta > 0:
            raise UserError(f"{where}config key dpo.beta: must be > 0, got {self.beta}")
        if self.reference not in REFERENCES:
            raise UserError(f"{where}config key dpo.reference: {self.reference!r} is not one of "
                            f"{', '.join(REFERENCES)}")


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair sigmoid DPO losses, chosen rewards, rejected rewards) from summed reply log-probs;
    the rewards beta * (log pi - log ref) are detached (metrics)."""
    chosen = policy_chosen.float() - ref_chosen.float()
    rejected = policy_rejected.float() - ref_rejected.float()
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def pair_logps(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """(summed reply log-probs of the chosen conversations (B,), of the rejected (B,)): one forward."""
    ids, mask, _ = both_sides(batch)
    return reply_logps(model(ids)[0], ids, mask)[0].chunk(2)


class DPO(PairObjective):
    """Sigmoid DPO against the frozen base (see the module doc)."""

    name, Options = "dpo", DPOOptions

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any, models: dict | None = None) -> None:
        super().__init__(cfg, tokenizer, model_config, models)
        self.opts = cfg.dpo
        method = getattr(getattr(cfg, "adapter", None), "method", "full")
        if method not in KEEPS_BASE and "reference" not in self.models:
            raise UserError(f"objective dpo with adapter.method={method} changes the base weights, so it needs a "
                            "frozen copy of the base as its reference; run it through `lmforge align`, or use "
                            "adapter.method=lora")
        self.sources: dict[int, PreferenceSource] = {}

    # ---- the reference ----------------------------------------------------------------------

    @contextlib.contextmanager
    def reference(self, model: nn.Module) -> Iterator[nn.Module]:
        """The frozen base, in eval mode: the `reference` model, or the policy with adapters disabled."""
        ref = self.models.get("reference")
        if ref is not None:
            with eval_mode(ref):
                yield ref
            return
        from lmforge.adapters import adapters_disabled

        plain = unwrap(model)
        with adapters_disabled(plain), eval_mode(plain):
            yield plain

    @torch.no_grad()
    def precompute(self, source: PreferenceSource, ref: nn.Module) -> None:
        """The reference log-probs of every pair of `source`, once (`source.reference`, (N, 2) on the CPU)."""
        device = next(ref.parameters()).device
        table = torch.empty(len(source), 2)
        rows = max(1, self.cfg.train.batch_size)
        for start in tqdm(range(0, len(source), rows), desc=f"reference log-probs ({source.split})", leave=False,
                          unit="batch"):
            picks = np.arange(start, min(start + rows, len(source)))
            batch = {k: v.to(device) for k, v in pair_batch(source, picks, self.pad_id).items()}
            chosen, rejected = pair_logps(ref, batch)
            table[picks] = torch.stack([chosen, rejected], dim=1).float().cpu()
        source.reference = table

    def release_reference(self) -> None:
        """Once every source has its table, a reference copy is no longer needed: free its memory."""
        ref = self.models.pop("reference", None)
        if ref is not None:
            ref.to("meta")  # the caller may still hold the module: drop its tensors, not just our name

    def source(self, tokens_dir: Any, split: str) -> PreferenceSource:
        source = super().source(tokens_dir, split)
        self.sources[SPLIT_CODES[split]] = source
        if self.opts.reference == "precompute" and "reference" in self.models:
            with self.reference(None) as ref:
                self.precompute(source, ref)
            if len(self.sources) == len(SPLIT_CODES):
                self.release_reference()
        return source

    def global_batch(self, source: PreferenceSource, seed: int, step: int, rows: int) -> Batch:
        """The pairs, with their reference log-probs once the source's whole table is known."""
        batch = super().global_batch(source, seed, step, rows)
        if source.reference is not None and not source.reference.isnan().any():
            batch["ref_chosen"], batch["ref_rejected"] = source.reference[batch["index"]].unbind(dim=1)
        return batch

    def make_batch(self, windows: np.ndarray, rng: np.random.Generator, source: Any) -> Batch:
        batch = super().make_batch(windows, rng, source)
        if self.opts.reference == "precompute":  # a step reads the table: nothing of the reference runs
            batch["ref_chosen"] = batch["ref_rejected"] = torch.zeros(len(windows))
        return batch

    def reference_logps(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """The batch's reference log-probs (chosen (B,), rejected (B,)): the batch's own (the
        source's table), live, or the table's, filled where it is unknown (`fill_table`)."""
        if "ref_chosen" in batch:
            return batch["ref_chosen"], batch["ref_rejected"]
        if self.opts.reference == "live":
            with torch.no_grad(), self.reference(model) as ref:
                return pair_logps(ref.to(batch["chosen_ids"].device), batch)  # a copy moves to the device once
        source = self.sources[int(batch["split"][0])]  # a batch comes from one source
        index = batch["index"].cpu()
        self.fill_table(model, source, batch, index)
        return source.reference[index].to(batch["index"].device).unbind(dim=1)

    @torch.no_grad()
    def fill_table(self, model: nn.Module, source: PreferenceSource, batch: Batch, index: Tensor) -> None:
        """The reference is the policy with adapters disabled (the base at every step), so each pair's
        log-probs are computed the first time it is used and kept: a short run over a large file costs
        no more reference forwards than `live`. Under torchrun every process computes every pair at
        its first step instead (FSDP2's forwards are collective: each process must run the same ones)."""
        if source.reference is None:
            source.reference = torch.full((len(source), 2), float("nan"))
        missing = source.reference[index, 0].isnan()
        if not missing.any():
            return
        with self.reference(model) as ref:
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                for each in self.sources.values():
                    self.precompute(each, ref)
                return
            rows = missing.to(batch["index"].device)
            chosen, rejected = pair_logps(ref, {k: v[rows] for k, v in batch.items()})
        source.reference[index[missing]] = torch.stack([chosen, rejected], dim=1).float().cpu()

    # ---- loss -------------------------------------------------------------------------------

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        ref_chosen, ref_rejected = self.reference_logps(model, batch)
        chosen, rejected = pair_logps(model, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                                            self.opts.beta)
        self.record(model, pref_acc=(chosen_rewards > rejected_rewards).float(),
                    margin=chosen_rewards - rejected_rewards)
        return losses.mean()
