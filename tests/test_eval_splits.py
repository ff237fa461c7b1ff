"""Test-split discipline: training and early stopping never read the test split; eval names what it reads."""

from __future__ import annotations

import json

import numpy as np
from eval_helpers import write_task
from train_helpers import make_token_dir, tiny_config

from lmforge.eval import evaluate
from lmforge.tokenizer import shards
from lmforge.train import batches


def test_training_and_early_stopping_read_only_train_and_val(tmp_path, monkeypatch):
    from lmforge.train.loop import pretrain

    tokens = make_token_dir(tmp_path)
    # a token dir that does hold a test split (as old `tokenize` versions wrote): training must still skip it
    meta = json.loads((tokens / "meta.json").read_text())
    (tokens / "test").mkdir()
    np.asarray(shards.load_split(tokens, "val")[0]).tofile(tokens / "test" / "00000.bin")
    meta["splits"]["test"] = {**meta["splits"]["val"], "shards": ["test/00000.bin"]}
    (tokens / "meta.json").write_text(json.dumps(meta))

    read: list[str] = []
    real_load_split = batches.load_split

    def spy(directory, split):
        read.append(split)
        return real_load_split(directory, split)

    monkeypatch.setattr(batches, "load_split", spy)
    # early stopping on: patience makes the val loss choose when to stop and which checkpoint is best
    pretrain(tiny_config(tokens, "train.max_steps=12", "train.eval_every=4", "train.patience=1"), tmp_path / "run")
    assert read and set(read) == {"train", "val"}


def test_eval_results_name_the_split_they_read(tmp_path):
    from eval_helpers import make_checkpoint

    ckpt, _, _ = make_checkpoint(tmp_path / "m")
    held_out = write_task(tmp_path / "h.jsonl", [{"text": "the king my lord"}], {"kind": "perplexity", "split": "test"})
    unstated = write_task(tmp_path / "u.jsonl", [{"text": "the king my lord"}], {"kind": "perplexity"})
    results = {r["task"]: r for r in evaluate(ckpt, [held_out, unstated], tmp_path / "out", progress=False)["tasks"]}
    assert results["h"]["split"] == "test" and results["h"]["split_note"] is None
    assert results["u"]["split"] == "unstated" and "not stated" in results["u"]["split_note"]
    recorded = evaluate(ckpt, [unstated], tmp_path / "out2", split="val", progress=False)["tasks"][0]
    assert recorded["split"] == "val"
    assert json.loads((tmp_path / "out2" / "results.json").read_text())["split"] == "val"
