"""Sequence classification fine-tuning: `objective: classify`, section `classify`, on `data.file`.

Each JSONL line is `{"text": "...", "label": ...}`: a class index (0..n-1), a class name from
`classify.labels`, or a number when there is one output (`num_labels: 1`, regression). The
class count is `len(classify.labels)`, else `classify.num_labels`; the objective sets
`model.num_labels` to it, so a base checkpoint without the head starts with a fresh one
(`new_heads`).

- encoders (BERT): `[CLS] text [SEP]` through `BERT.classify` (the pooled [CLS] output and the
  classifier; HF's `BertForSequenceClassification`);
- causal LMs (GPT, Llama, ...): `text <eos>` through the score head (`GPT.scores`), read at the
  last token (HF's `GPT2ForSequenceClassification`).

The loss is cross-entropy (mean squared error for one output); `acc` (classification) is logged
per step. Adapters (`adapter.method`) apply as for any run. Rows are right-padded, split into
train/val by a content hash of the text (5%), or val comes from `data.val_file`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.readers import iter_jsonl_objects
from lmforge.data.split import assign_split
from lmforge.errors import UserError
from lmforge.posttrain.reward import last_scores, plain_for_head, right_pad
from lmforge.train.objectives.base import Batch, Objective
from lmforge.train.objectives.preference import epoch_picks, pad_or_zero


@dataclass
class ClassifyOptions:
    num_labels: int = 2  # outputs when `labels` is empty (1 = regression on a number)
    labels: list[str] = field(default_factory=list)  # class names, in index order; their count wins

    @property
    def count(self) -> int:
        return len(self.labels) or self.num_labels

    def check(self, where: str) -> None:
        if not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool) or self.num_labels < 1:
            raise UserError(f"{where}config key classify.num_labels: must be an integer >= 1, got {self.num_labels!r}")
        if self.labels and (len(set(self.labels)) != len(self.labels) or len(self.labels) < 2):
            raise UserError(f"{where}config key classify.labels: needs two or more distinct names, got {self.labels}")


def label_value(label: Any, opts: ClassifyOptions, where: str) -> float:
    """A line's label as a class index (or a number for one output); a one-line error otherwise."""
    if opts.count == 1 and isinstance(label, (int, float)) and not isinstance(label, bool):
        return float(label)
    if isinstance(label, str) and label in opts.labels:
        return float(opts.labels.index(label))
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < opts.count:
        return float(label)
    names = f" or one of {', '.join(opts.labels)}" if opts.labels else ""
    raise UserError(f'{where}: "label" is {label!r}; use a class index 0..{opts.count - 1}{names} '
                    "(or set classify.labels / classify.num_labels)")


class TextLabels:
    """The (text, label) lines of one split, tokenized once and cut to the model's block."""

    def __init__(self, cfg: Any, tokenizer: Any, split: str, block_size: int, arch: str) -> None:
        data, opts = cfg.data, cfg.classify
        if not data.file:
            raise UserError('objective classify reads data.file (--data FILE: JSONL lines {"text", "label"}); set it')
        path = Path(data.val_file if split == "val" and data.val_file else data.file)
        if not path.is_file():
            raise UserError(f"{path} does not exist; point data.file at a JSONL file of {{\"text\", \"label\"}} lines")
        texts, labels = [], []
        for line_no, record in iter_jsonl_objects(path):
            where = f"{path}:{line_no}"
            if not isinstance(record.get("text"), str) or not record["text"].strip():
                raise UserError(f'{where}: needs a non-empty string "text"')
            label = label_value(record.get("label"), opts, where)
            in_val = assign_split(record["text"], (0.95, 0.05))[0] == 1
            if data.val_file or in_val == (split == "val"):
                texts.append(record["text"])
                labels.append(label)
        if not texts:
            raise UserError(f"{path}: no {split} examples (val takes ~5% by content hash); add lines or set "
                            "data.val_file")
        encoded = tokenizer.encode_batch(texts)
        if arch == "bert":  # [CLS] text [SEP]
            ends, room = ([tokenizer.bos_id], [tokenizer.eos_id]), block_size - 2
        else:  # text <eos>: the score is read at the end marker (GPT-2's tokenizer has none: the last token)
            eos = tokenizer.special_id_or_none("<|eos|>")
            ends, room = ([], [] if eos is None else [eos]), block_size - (eos is not None)
        self.ids = [[*ends[0], *ids[:room], *ends[1]] for ids in encoded]
        self.truncated = sum(len(ids) > room for ids in encoded)
        self.labels = np.asarray(labels, dtype=np.float32)
        self.num_tokens = sum(map(len, self.ids))
        self.split = split

    def __len__(self) -> int:
        return len(self.ids)

    def summary(self) -> dict[str, Any]:
        """What the run report says about the data (`lmforge.posttrain.run.RunReport`)."""
        return {"examples": len(self), "rows": len(self), "truncated": self.truncated, "dropped": 0}

    def describe(self) -> str:
        cut = f", {self.truncated} cut to fit block_size" if self.truncated else ""
        return f"{self.split}: {len(self)} labelled texts{cut}"


class Classify(Objective):
    """Sequence classification (or regression) on text/label lines (see the module doc)."""

    name, Options = "classify", ClassifyOptions
    new_heads = ("score.weight", "classifier.weight", "classifier.bias", "pooler.weight", "pooler.bias")
    uses_all_parameters = False  # the LM / MLM head takes no part

    @classmethod
    def check(cls, model_config: Any) -> None:
        if model_config.arch not in ("bert", "gpt"):
            raise UserError(f"objective classify trains an encoder (model.arch bert) or a causal LM (gpt), "
                            f"not model.arch={model_config.arch}")

    @classmethod
    def configure_model(cls, cfg: Any, model_config: Any) -> None:
        model_config.num_labels = cfg.model.num_labels = cfg.classify.count

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any, models: dict | None = None) -> None:
        super().__init__(cfg, tokenizer, model_config, models)
        self.pad_id, self.count = pad_or_zero(tokenizer), cfg.classify.count
        self._correct = self._seen = 0

    def source(self, tokens_dir: Any, split: str) -> TextLabels:
        return TextLabels(self.cfg, self.tokenizer, split, self.model_config.block_size, self.model_config.arch)

    def global_batch(self, source: TextLabels, seed: int, step: int, rows: int) -> Batch:
        picks = epoch_picks(len(source), seed, step, rows)
        ids, lengths = right_pad([source.ids[i] for i in picks], self.pad_id)
        labels = torch.from_numpy(source.labels[picks])
        return {"input_ids": ids, "lengths": lengths,
                "labels": labels if self.count == 1 else labels.long()}

    def window_length(self, block_size: int) -> int:
        return block_size

    def make_batch(self, windows: np.ndarray, rng: np.random.Generator, source: Any) -> Batch:
        """Random texts of full length with random labels (`lmforge.peakmem` sizes a step with them)."""
        rows, width = np.shape(windows)
        labels = rng.integers(0, self.count, rows) if self.count > 1 else rng.standard_normal(rows)
        return {"input_ids": torch.from_numpy(np.asarray(windows, dtype=np.int64)),
                "lengths": torch.full((rows,), width, dtype=torch.long),
                "labels": torch.from_numpy(labels).long() if self.count > 1 else torch.from_numpy(labels).float()}

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        """(B, num_labels) class logits (or the regression output)."""
        plain = plain_for_head(model, "objective classify")
        ids, lengths = batch["input_ids"], batch["lengths"]
        if self.model_config.arch == "bert":
            mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
            return plain.classify(ids, attention_mask=mask.long())[0]
        return last_scores(plain.scores(ids), lengths)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        logits, labels = self.logits(model, batch).float(), batch["labels"]
        if self.count == 1:
            return F.mse_loss(logits[:, 0], labels.float())
        if model.training:
            self._correct += int((logits.argmax(dim=-1) == labels).sum())
            self._seen += len(labels)
        return F.cross_entropy(logits, labels)

    def step_metrics(self) -> dict[str, float]:
        out = {"acc": round(self._correct / self._seen, 5)} if self._seen else {}
        self._correct = self._seen = 0
        return out
