"""Supervised fine-tuning: `objective: sft`, reading `data.file` (and `data.val_file`).

The examples (chat, instruction or prompt/completion lines, `lmforge.posttrain.data.read_sft`)
are encoded once with the model's chat template (`lmforge.tokenizer.chat.chat_template`; plain
text for prompt/completion) and packed into rows of block_size positions
(`lmforge.posttrain.packing.pack`: best fit, positions restarting and attention blocked at
each example). Labels are -100 everywhere but the assistant's replies and the end-of-turn token
after each (the model learns to stop), so prompt tokens contribute exactly zero loss. Examples
longer than block_size + 1 tokens are cut, counted and reported.

The held-out split is `data.val_file` when set, else `sft.val_fraction` of data.file's examples
by a content hash of their prompt side (`split_items`). A step's rows are a pure function of
(seed, step), as for every objective: each epoch visits every training row once, in an order
drawn from (seed, epoch). The eval batches are the val rows in order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.tokenizer.tok import PAD
from lmforge.train.objectives.base import Batch, Objective


@dataclass
class SFTOptions:
    """`sft.*`: how the examples become rows."""

    pack: bool = True  # several examples per row (best fit); false: one example per row, padded
    val_fraction: float = 0.05  # without data.val_file: the share of examples held out (content hash)

    def check(self, where: str) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"{where}config key sft.val_fraction: must be in (0, 1), got {self.val_fraction}")


def read_split(file: str, val_file: str, split: str, val_fraction: float) -> list[Any]:
    """The examples of `split`: data.file's train share and data.val_file (or data.file's val share)."""
    from lmforge.posttrain.data import read_sft, split_items

    if not file:
        raise UserError("objective sft reads data.file (a JSONL file of chat, instruction or prompt/completion "
                        "lines); pass --data FILE or --set data.file=FILE")
    for key, path in (("data.file", file), ("data.val_file", val_file)):
        if path and not Path(path).is_file():
            raise UserError(f"{key}: {path} does not exist (or is not a file); pass a JSONL file of examples")
    if val_file:
        return read_sft(file) if split == "train" else read_sft(val_file)
    examples = read_sft(file)
    items = split_items(examples, split, val_fraction)
    if not items:
        raise UserError(f"{file}: no {split} examples among its {len(examples)} ({val_fraction:.0%} go to val by a "
                        "content hash of the prompt); add examples or set data.val_file")
    return items


def rows_of(encoded: list[tuple[list[int], list[int]]], block_size: int, pad_id: int, packed: bool) -> Any:
    """`Packed` rows: best-fit packing, or one example per row (`sft.pack=false`)."""
    from lmforge.posttrain.packing import Packed, pack

    if packed:
        return pack(encoded, block_size, pad_id)
    parts = [pack([e], block_size, pad_id) for e in encoded]
    kept = [p for p in parts if p.rows]
    arrays = {k: (np.concatenate([getattr(p, k) for p in kept]) if kept else np.zeros((0, block_size), np.int64))
              for k in ("input_ids", "targets", "position_ids", "doc_ids")}
    return Packed(**arrays, truncated=sum(p.truncated for p in parts), examples=sum(p.examples for p in parts),
                  dropped=sum(p.dropped for p in parts))


class SFTSource:
    """One split's examples, encoded and packed into rows (`rows`: a `Packed`)."""

    def __init__(self, cfg: Any, tokenizer: Any, split: str, block_size: int) -> None:
        from lmforge.posttrain.data import encode_example
        from lmforge.tokenizer.chat import chat_template

        opts = cfg.sft
        items = read_split(cfg.data.file, cfg.data.val_file, split, opts.val_fraction)
        template = chat_template(tokenizer) if any(e.messages is not None for e in items) else tokenizer
        encoded = [encode_example(template, e) for e in items]
        pad = tokenizer.special_id_or_none(PAD)  # padding positions have no target: any id will do
        self.rows = rows_of(encoded, block_size, 0 if pad is None else pad, opts.pack)
        self.split, self.path = split, Path(cfg.data.val_file if split == "val" and cfg.data.val_file else
                                            cfg.data.file)
        if not self.rows.rows:
            raise UserError(f"{self.path}: none of the {split} examples has a reply to train on; check the file")
        self.truncated, self.examples = self.rows.truncated, len(items)
        self.num_tokens = int((self.rows.doc_ids >= 0).sum())  # positions holding an example

    def __len__(self) -> int:
        return self.rows.rows

    def describe(self) -> str:
        """One line for the run's start: examples, rows, fill, what was cut or dropped."""
        r = self.rows
        return (f"sft {self.split}: {self.examples:,} examples from {self.path} in {r.rows:,} rows of "
                f"{r.input_ids.shape[1]} ({r.fill:.0%} filled); {r.truncated} truncated (longer than the "
                f"context), {r.dropped} without a reply left to train on")

    def summary(self) -> dict[str, Any]:
        return {"file": str(self.path), **self.rows.summary(), "examples_read": self.examples}

    def batch(self, idx: np.ndarray) -> Batch:
        r = self.rows
        return {k: torch.from_numpy(getattr(r, k)[idx]) for k in ("input_ids", "targets", "position_ids", "doc_ids")}


def epoch_rows(seed: int, start: int, count: int, total: int) -> np.ndarray:
    """Rows start .. start+count of the endless sequence of epochs, each a permutation of `total`
    rows drawn from (seed, epoch): every row once per epoch, a pure function of its position."""
    positions = np.arange(start, start + count)
    out = np.empty(count, np.int64)
    for epoch in np.unique(positions // total):
        at = positions // total == epoch
        out[at] = np.random.default_rng([seed, int(epoch)]).permutation(total)[positions[at] % total]
    return out


class SFT(Objective):
    """Supervised fine-tuning on packed chat/instruction/completion examples (GPT family)."""

    name, arch = "sft", "gpt"
    Options = SFTOptions

    def source(self, tokens_dir: Any, split: str) -> SFTSource:
        return SFTSource(self.cfg, self.tokenizer, split, self.model_config.block_size)

    def make_batch(self, windows: np.ndarray, rng: np.random.Generator, source: Any) -> Batch:
        """Token windows as one example per row (what `lmforge.peakmem` measures a step with)."""
        rows, n = windows.shape[0], windows.shape[1] - 1
        return {"input_ids": torch.from_numpy(windows[:, :-1]), "targets": torch.from_numpy(windows[:, 1:]),
                "position_ids": torch.arange(n).expand(rows, n).contiguous(),
                "doc_ids": torch.zeros(rows, n, dtype=torch.long)}

    def global_batch(self, source: SFTSource, seed: int, step: int, rows: int) -> Batch:
        return source.batch(epoch_rows(seed, step * rows, rows, len(source)))

    def eval_batches(self, source: SFTSource, seed: int, eval_steps: int, batch_size: int, rank: int,
                     world_size: int) -> Iterator[Batch]:
        """The val rows in order (at most eval_steps batches; the last one wraps around)."""
        per_step = batch_size * world_size
        for i in range(min(eval_steps, math.ceil(len(source) / per_step))):
            idx = (np.arange(i * per_step, (i + 1) * per_step) % len(source))[rank * batch_size:][:batch_size]
            yield source.batch(idx)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["input_ids"], batch["targets"], position_ids=batch["position_ids"],
                     doc_ids=batch["doc_ids"])[1]
