"""Objective `sft` (issue 12): packed rows cut as a pure function of (seed, step), every row once
per epoch, prompt tokens contributing exactly zero loss, truncation counted, one example per row
with `sft.pack=false`, and the config/data errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.config import load_config
from lmforge.errors import UserError
from lmforge.models import build_model
from lmforge.models.config import ModelConfig
from lmforge.train.objectives import OBJECTIVES
from lmforge.train.objectives.sft import SFT, epoch_rows


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from train_helpers import write_corpus

    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("sfttok")
    train_tokenizer(write_corpus(root / "corpus", docs=4), root / "tok", kind="char")
    return Tokenizer.load(root / "tok" / "tokenizer.json")


def write_chat(path, n: int, reply_words: int = 3):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": " ".join(["answer"] * reply_words) + f" {i}"}]}) + "\n")
    return path


def objective(tokenizer, file, *sets, block_size=128):
    cfg = load_config(None, [f"data.file={file}", "objective=sft", *sets])
    return SFT(cfg, tokenizer, ModelConfig(block_size=block_size, vocab_size=tokenizer.vocab_size,
                                           n_layer=1, n_head=2, n_embd=16))


def test_sft_is_registered_with_its_options():
    assert OBJECTIVES["sft"] is SFT
    cfg = load_config(None, ["objective=sft", "sft.pack=false", "sft.val_fraction=0.2"])
    assert cfg.sft.pack is False and cfg.sft.val_fraction == 0.2
    with pytest.raises(UserError, match="sft.val_fraction"):
        load_config(None, ["sft.val_fraction=1.5"])


def test_epochs_visit_every_row_once_as_a_function_of_seed_and_step():
    rows = np.concatenate([epoch_rows(7, s * 6, 6, 20) for s in range(10)])  # 60 rows = 3 epochs of 20
    for e in range(3):
        assert sorted(rows[20 * e:20 * (e + 1)]) == list(range(20))
    assert not np.array_equal(rows[:20], rows[20:40])  # each epoch its own order
    assert np.array_equal(epoch_rows(7, 18, 6, 20), rows[18:24])  # any step alone: the same rows
    assert not np.array_equal(epoch_rows(8, 0, 20, 20), rows[:20])


def test_batches_are_packed_rows_and_the_same_for_any_world_size(tokenizer, tmp_path):
    obj = objective(tokenizer, write_chat(tmp_path / "c.jsonl", 60))
    source = obj.source(None, "train")
    assert source.rows.examples == source.examples > 40 and len(source) < source.examples  # packed
    one = obj.batch_for(source, 3, 5, 4, 1, 0, 1)[0]
    two = [obj.batch_for(source, 3, 5, 2, 1, r, 2)[0] for r in (0, 1)]
    for k in ("input_ids", "targets", "position_ids", "doc_ids"):
        assert torch.equal(one[k], torch.cat([two[0][k], two[1][k]]))
        assert one[k].shape == (4, 128)
    again = obj.batch_for(source, 3, 5, 4, 1, 0, 1)[0]
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert (one["targets"] != -100).any(dim=1).all()  # every row has something to learn


def test_prompt_tokens_contribute_exactly_zero_loss(tokenizer, tmp_path):
    """The loss equals a hand computation over the assistant tokens alone; changing the prompt
    tokens' targets to anything leaves it and the gradient unchanged (their label is -100)."""
    obj = objective(tokenizer, write_chat(tmp_path / "c.jsonl", 30))
    source = obj.source(None, "train")
    batch = obj.batch_for(source, 0, 0, 3, 1, 0, 1)[0]
    torch.manual_seed(0)
    model = build_model(obj.model_config)
    loss = obj.loss(model, batch)
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])[0]
    keep = batch["targets"] != -100
    hand = F.cross_entropy(logits[keep].float(), batch["targets"][keep])
    assert torch.allclose(loss, hand, atol=1e-6)
    # the trained positions are the replies and their end-of-turn token: never a role token or the user's text
    end = tokenizer.token_to_id("<|end|>")
    trained = batch["targets"][keep].tolist()
    assert end in trained and tokenizer.token_to_id("<|user|>") not in trained
    text = tokenizer.decode([t for t in trained if t != end])
    assert "answer" in text and "question" not in text and "be brief" not in text


def test_long_examples_are_cut_and_counted_and_pack_false_is_one_per_row(tokenizer, tmp_path):
    file = write_chat(tmp_path / "c.jsonl", 40, reply_words=30)  # ~200 tokens each: longer than 128
    obj = objective(tokenizer, file)
    train = obj.source(None, "train")
    assert train.truncated == train.examples and "truncated" in train.describe()
    assert f"{train.truncated} truncated" in train.describe()
    unpacked = objective(tokenizer, write_chat(tmp_path / "s.jsonl", 40), "sft.pack=false").source(None, "train")
    packed = objective(tokenizer, tmp_path / "s.jsonl").source(None, "train")
    assert len(unpacked) == unpacked.examples and len(packed) < len(unpacked)
    assert (unpacked.rows.doc_ids <= 0).all()


def test_val_split_and_data_errors(tokenizer, tmp_path):
    file = write_chat(tmp_path / "c.jsonl", 60)
    obj = objective(tokenizer, file, "sft.val_fraction=0.2")
    train, val = obj.source(None, "train"), obj.source(None, "val")
    assert train.examples + val.examples == 60 and val.examples > 0
    held = write_chat(tmp_path / "v.jsonl", 5)
    obj = objective(tokenizer, file, f"data.val_file={held}")
    assert obj.source(None, "train").examples == 60 and obj.source(None, "val").examples == 5
    with pytest.raises(UserError, match="data.file"):
        objective(tokenizer, "").source(None, "train")
    with pytest.raises(UserError, match="does not exist"):
        objective(tokenizer, tmp_path / "nope.jsonl").source(None, "train")
    tiny = write_chat(tmp_path / "t.jsonl", 1)
    with pytest.raises(UserError, match="no val examples"):
        objective(tokenizer, tiny, "sft.val_fraction=0.01").source(None, "val")


def test_peakmem_cuts_an_sft_batch_from_windows(tokenizer, tmp_path):
    """`lmforge.peakmem` measures a step of an sft run from token windows (`make_batch`)."""
    obj = objective(tokenizer, "unused.jsonl")
    windows = np.arange(2 * 65).reshape(2, 65) % 50
    batch = obj.make_batch(windows, np.random.default_rng(0), SimpleNamespace())
    assert batch["input_ids"].shape == batch["position_ids"].shape == batch["doc_ids"].shape == (2, 64)
    assert torch.equal(batch["position_ids"][1], torch.arange(64))
