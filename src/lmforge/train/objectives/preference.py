"""Preference pairs for the objectives that train on them (`reward`, `dpo`, `orpo`).

`PreferenceSource` reads `data.file` (or `data.val_file` for val) with
`lmforge.posttrain.data.read_pairs` (every line validated first), encodes each pair once with the
base's chat template (`encode_pair`: prompt ids ending with the generation prompt, and each reply
ending with the end-of-turn token) and cuts pairs longer than block_size (counted). Pairs are
not packed: a batch holds each pair's two conversations (prompt + chosen, prompt + rejected),
right-padded to the batch's longest, with a mask marking the reply tokens, so the objectives can
read either reply's log-probability (DPO, ORPO) or its last-token score (reward) from one
forward pass over the 2B rows.

`PairObjective` is their base: the batches (a pure function of (seed, step): a fresh permutation
of the pairs per epoch), the one forward over chosen and rejected rows, the metrics of a step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.train.objectives.base import Batch, Objective

SPLIT_CODES = {"train": 0, "val": 1}  # batch["split"]: which source a row comes from


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int],
             block_size: int) -> tuple[list[int], list[int], list[int], bool]:
    """Cut a pair so prompt + either reply fits in block_size tokens: the prompt keeps its last
    tokens (its end is the generation prompt) but at least half the block goes to the replies when
    they need it, the replies keep their first tokens. Returns the pieces and whether anything was cut."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= block_size:
        return prompt, chosen, rejected, False
    keep = min(len(prompt), max(block_size // 2, block_size - longest))
    room = block_size - keep
    return prompt[len(prompt) - keep:], chosen[:room], rejected[:room], True


class PreferenceSource:
    """The preference pairs of one split, encoded once (`lmforge.posttrain.data`)."""

    def __init__(self, cfg: Any, tokenizer: Any, split: str, block_size: int) -> None:
        from lmforge.posttrain.data import encode_pair, read_pairs, split_items
        from lmforge.tokenizer.chat import chat_template

        data = cfg.data
        if not data.file:
            raise UserError(f"objective {cfg.objective} reads preference pairs from data.file (--data FILE: JSONL "
                            'lines {"prompt" or "messages", "chosen", "rejected"}); set it')
        if split == "val" and data.val_file:
            pairs, path = read_pairs(data.val_file), Path(data.val_file)
        else:
            path = Path(data.file)
            pairs = split_items(read_pairs(path), split) if not data.val_file else read_pairs(path)
        if not pairs:
            raise UserError(f"{path}: no {split} pairs (val takes ~5% of the prompts by content hash); add pairs, "
                            "or give held-out pairs in data.val_file")
        template = chat_template(tokenizer)
        self.prompts, self.chosen, self.rejected = [], [], []
        self.truncated = 0
        for pair in pairs:
            prompt, chosen, rejected, cut = fit_pair(*encode_pair(template, pair), block_size)
            self.prompts.append(prompt)
            self.chosen.append(chosen)
            self.rejected.append(rejected)
            self.truncated += cut
        self.split, self.path = split, path
        self.num_tokens = sum(2 * len(p) + len(c) + len(r)
                              for p, c, r in zip(self.prompts, self.chosen, self.rejected))
        self.reference: Tensor | None = None  # (N, 2) reference log-probs of chosen, rejected (DPO)

    def __len__(self) -> int:
        return len(self.prompts)

    def summary(self) -> dict[str, Any]:
        """What the run report says about the data (`lmforge.posttrain.run.RunReport`)."""
        return {"examples": len(self), "rows": len(self), "truncated": self.truncated, "dropped": 0}

    def describe(self) -> str:
        cut = f", {self.truncated} cut to fit block_size" if self.truncated else ""
        return f"{self.split}: {len(self)} preference pairs from {self.path}{cut}"


def pad_or_zero(tokenizer: Any) -> int:
    """The id right padding uses: the pad token, else 0 (GPT-2 has none; a causal model never reads
    a padded position before a real one, and no loss lands on it)."""
    from lmforge.tokenizer import PAD

    pad = tokenizer.special_id_or_none(PAD)
    return 0 if pad is None else pad


def epoch_picks(n: int, seed: int, step: int, rows: int) -> np.ndarray:
    """Pair indices of rows [step * rows, (step + 1) * rows) of an endless stream in which every
    epoch is a fresh permutation of the n pairs (seeded by (seed, epoch)): each pair once per epoch,
    and a pure function of (seed, step)."""
    flat = np.arange(step * rows, (step + 1) * rows, dtype=np.int64)
    epochs, positions = flat // n, flat % n
    picks = np.empty(rows, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        picks[epochs == epoch] = perm[positions[epochs == epoch]]
    return picks


def pair_batch(source: PreferenceSource, picks: np.ndarray, pad_id: int) -> Batch:
    """The pairs `picks` as tensors: `chosen_ids`/`rejected_ids` (B, T) right-padded with pad_id to
    the longest of either side, `chosen_mask`/`rejected_mask` (B, T) True on reply tokens,
    `chosen_len`/`rejected_len` (B,), `index` (B,) and `split` (B,) (where the pair comes from)."""
    sides = {"chosen": source.chosen, "rejected": source.rejected}
    width = max(len(source.prompts[i]) + len(replies[i]) for replies in sides.values() for i in picks)
    batch: Batch = {}
    for name, replies in sides.items():
        ids = torch.full((len(picks), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(picks), width), dtype=torch.bool)
        lengths = torch.empty(len(picks), dtype=torch.long)
        for row, i in enumerate(picks):
            prompt, reply = source.prompts[i], replies[i]
            ids[row, :len(prompt) + len(reply)] = torch.tensor(prompt + reply)
            mask[row, len(prompt):len(prompt) + len(reply)] = True
            lengths[row] = len(prompt) + len(reply)
        batch.update({f"{name}_ids": ids, f"{name}_mask": mask, f"{name}_len": lengths})
    batch["index"] = torch.from_numpy(np.asarray(picks, dtype=np.int64))
    batch["split"] = torch.full((len(picks),), SPLIT_CODES[source.split], dtype=torch.long)
    return batch


def both_sides(batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, reply mask, lengths) of the 2B rows: the B chosen conversations, then the B rejected."""
    return tuple(torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("ids", "mask", "len"))


def reply_logps(logits: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(summed log-probability of each row's reply tokens, their count), in fp32: position t's
    logits predict token t + 1, and only tokens under `mask` count."""
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                          reduction="none").view(targets.shape)
    return -nll.sum(dim=1), mask[:, 1:].sum(dim=1)


class PairObjective(Objective):
    """Base of the objectives on preference pairs (`data.file`): causal LMs only."""

    arch = "gpt"
    views = 2  # each pair's chosen and rejected conversation go through the model

    @classmethod
    def check(cls, model_config: Any) -> None:
        if model_config.arch != "gpt":
            raise UserError(f"objective {cls.name} trains a causal LM (model.arch gpt: lmforge's own, GPT-2, Llama, "
                            f"Mistral, Mixtral), but this model is model.arch={model_config.arch}; use a causal base")

    @classmethod
    def model_flops(cls, model: nn.Module, seq_len: int, decoder_len: int | None) -> float:
        return cls.views * float(model.flops_per_token(seq_len))

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any, models: dict | None = None) -> None:
        super().__init__(cfg, tokenizer, model_config, models)
        self.pad_id = pad_or_zero(tokenizer)
        self._sums: dict[str, float] = {}
        self._count = 0

    def source(self, tokens_dir: Any, split: str) -> PreferenceSource:
        return PreferenceSource(self.cfg, self.tokenizer, split, self.model_config.block_size)

    def global_batch(self, source: PreferenceSource, seed: int, step: int, rows: int) -> Batch:
        return pair_batch(source, epoch_picks(len(source), seed, step, rows), self.pad_id)

    def window_length(self, block_size: int) -> int:
        return block_size

    def make_batch(self, windows: np.ndarray, rng: np.random.Generator, source: Any) -> Batch:
        """Stand-in pairs of random tokens, full length (`lmforge.peakmem` sizes a step with them):
        each window is a prompt (its first half) + chosen reply; the rejected reply is the next row's."""
        windows = torch.from_numpy(np.asarray(windows, dtype=np.int64))
        rows, width = windows.shape
        half = width // 2
        rejected = torch.cat([windows[:, :half], windows.roll(1, dims=0)[:, half:]], dim=1)
        mask = (torch.arange(width) >= half).expand(rows, width)
        full = torch.full((rows,), width, dtype=torch.long)
        return {"chosen_ids": windows, "chosen_mask": mask, "chosen_len": full, "rejected_ids": rejected,
                "rejected_mask": mask.clone(), "rejected_len": full.clone(),
                "index": torch.arange(rows), "split": torch.zeros(rows, dtype=torch.long)}

    def record(self, model: nn.Module, **values: Tensor) -> None:
        """Add the step's numbers (means over the batch) to `step_metrics`; eval passes are not counted."""
        if not model.training:
            return
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value.detach().float().mean())
        self._count += 1

    def step_metrics(self) -> dict[str, float]:
        """The means over the step's micro-batches (then reset)."""
        out = {k: round(v / self._count, 5) for k, v in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        return out
