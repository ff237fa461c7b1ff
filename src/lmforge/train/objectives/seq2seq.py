"""Sequence-to-sequence on paired data: `objective: seq2seq`, reading `data.pairs`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from lmforge.data.readers import iter_jsonl_objects
from lmforge.data.split import assign_split
from lmforge.errors import UserError
from lmforge.train.objectives.base import Batch, Objective


class PairSource:
    """Source/target pairs from a JSONL file (`data.pairs`), tokenized once, split by content hash.

    Each line is `{"source": "...", "target": "..."}`. A pair goes to val when its source text
    falls in the last `val_fraction` (5%) of lmforge's one content-hash splitter
    (`lmforge.data.split`), so the split does not depend on the order of the lines. Sources longer
    than model.block_size - 1 tokens and targets longer than block_size - 1 are cut (counted and
    reported once).
    """

    def __init__(self, path: str | Path, tokenizer: Any, split: str, block_size: int,
                 val_fraction: float = 0.05) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"data.pairs: {path} does not exist; point it at a JSONL file of "
                            '{"source": ..., "target": ...} lines')
        sources, targets = [], []
        for line_no, record in iter_jsonl_objects(path):
            if not all(isinstance(record.get(k), str) and record[k].strip() for k in ("source", "target")):
                raise UserError(f'{path}:{line_no}: needs non-empty string fields "source" and "target"')
            in_val = assign_split(record["source"], (1 - val_fraction, val_fraction))[0] == 1
            if in_val == (split == "val"):
                sources.append(record["source"])
                targets.append(record["target"])
        if not sources:
            raise UserError(f"{path}: no {split} pairs (val takes ~{val_fraction:.0%} by content hash); add pairs")
        cut = block_size - 1
        enc_s = tokenizer.encode_batch(sources)
        enc_t = tokenizer.encode_batch(targets)
        self.truncated = sum(len(a) > cut for a in enc_s) + sum(len(b) > cut for b in enc_t)
        self.sources = [a[:cut] + [tokenizer.eos_id] for a in enc_s]
        self.targets = [b[:cut] + [tokenizer.eos_id] for b in enc_t]
        self.num_tokens = sum(map(len, self.sources)) + sum(map(len, self.targets))
        self.split = split


class Seq2Seq(Objective):
    """Plain sequence-to-sequence on paired data (translation, summarization...): the encoder
    reads the source, the decoder is trained to write the target (teacher forcing).

    Rows are padded to the longest source/target of the batch with the pad id; the encoder
    gets an attention_mask, padded target positions are -100 (ignored by the loss).
    """

    name, arch = "seq2seq", "encdec"

    @classmethod
    def lengths(cls, cfg: Any, block_size: int) -> tuple[int, int | None]:
        """Each batch is padded to its longest pair: at most block_size on either side."""
        return block_size, block_size

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any, models: dict | None = None) -> None:
        super().__init__(cfg, tokenizer, model_config, models)
        if not cfg.data.pairs:
            raise UserError("objective seq2seq reads data.pairs (a JSONL file of source/target pairs); set it")
        self.pad_id = tokenizer.pad_id

    def source(self, tokens_dir: Any, split: str) -> PairSource:
        return PairSource(self.cfg.data.pairs, self.tokenizer, split, self.model_config.block_size)

    def global_batch(self, source: PairSource, seed: int, step: int, rows: int) -> Batch:
        rng = np.random.default_rng([seed, step])
        picks = rng.integers(0, len(source.sources), size=rows)
        inputs = self.tokenizer.pad([source.sources[i] for i in picks], return_tensors="pt")
        labels = self.tokenizer.pad([source.targets[i] for i in picks], pad_value=-100, return_tensors="pt")
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                "labels": labels["input_ids"]}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])[1]

