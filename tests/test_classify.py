"""Sequence classification fine-tuning (`objective: classify`): BERT through its pooled classifier
(equal to BertForSequenceClassification's loss), GPT through the score head at the last token,
with and without LoRA; label checks name file:line."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from preference_helpers import chat_tokenizer, one_thread, tiny_gpt  # noqa: F401 - one_thread: a fixture
from train_helpers import WORDS

from lmforge.config import load_config
from lmforge.errors import UserError
from lmforge.models import BERT, ModelConfig
from lmforge.train.objectives import objective_for, padded_vocab

pytestmark = pytest.mark.usefixtures("one_thread")

def _write(path, n=64, seed=0):
    """Label "pos" when the text holds "love", else "neg": learnable from one word."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = [rng.choice([w for w in WORDS if w != "love"]) for _ in range(rng.randint(3, 6))]
            if i % 2:
                words.insert(rng.randrange(len(words)), "love")
            f.write(json.dumps({"text": " ".join(words), "label": "pos" if i % 2 else "neg"}) + "\n")
    return path


def _cfg(data, *overrides):
    return load_config(None, ["objective=classify", f"data.file={data}", "classify.labels=[neg, pos]",
                              "train.batch_size=8", *overrides])


def _bert(tok, cfg):
    torch.manual_seed(0)
    model_cfg = ModelConfig(arch="bert", vocab_size=padded_vocab(tok.vocab_size), n_layer=2, n_head=2, n_embd=32,
                            block_size=48, norm_position="post")
    objective_for(cfg, tok, model_cfg).configure_model(cfg, model_cfg)
    return BERT(model_cfg)


def _accuracy(objective, model, source):
    batch = objective.global_batch(source, 0, 0, len(source))
    model.eval()
    with torch.no_grad():
        return (objective.logits(model, batch).argmax(-1) == batch["labels"]).float().mean().item()


def _train(objective, model, source, steps, lr):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss = objective.loss(model, objective.global_batch(source, 0, step, 8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return objective.step_metrics()


def test_bert_classify_loss_equals_cross_entropy_of_hf_layout(tmp_path):
    tok = chat_tokenizer(tmp_path)
    cfg = _cfg(_write(tmp_path / "d.jsonl"))
    model = _bert(tok, cfg).eval()
    objective = objective_for(cfg, tok, model.config)
    source = objective.source(None, "train")
    batch = objective.global_batch(source, 0, 0, 8)
    ids, lengths = batch["input_ids"], batch["lengths"]
    assert (ids[:, 0] == tok.bos_id).all() and (ids[torch.arange(8), lengths - 1] == tok.eos_id).all()
    # the reference: BERT.classify row by row, unpadded (the pooled [CLS] of each text alone)
    want = torch.stack([model.classify(ids[i:i + 1, :lengths[i]])[0][0] for i in range(8)])
    torch.testing.assert_close(objective.logits(model, batch), want, rtol=1e-5, atol=1e-5)
    loss = objective.loss(model, batch)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(want, batch["labels"]).item(), rel=1e-5)


@pytest.mark.parametrize("arch,method", [("bert", "full"), ("gpt", "full"), ("gpt", "lora")])
def test_classify_fine_tuning_learns(tmp_path, arch, method):
    from lmforge.adapters import AdapterOptions, adapter_transform

    tok = chat_tokenizer(tmp_path)
    cfg = _cfg(_write(tmp_path / "d.jsonl"), f"adapter.method={method}")
    if arch == "bert":
        model = _bert(tok, cfg)
    else:
        model = tiny_gpt(tok, num_labels=2)
    if method == "lora":
        model = adapter_transform(AdapterOptions(method="lora", lora_rank=4), trainable=["score"])(model)
    objective = objective_for(cfg, tok, model.config)
    source = objective.source(None, "train")
    before = _accuracy(objective, model, source)
    metrics = _train(objective, model, source, *((60, 1e-3) if arch == "bert" else (80, 2e-3)))
    after = _accuracy(objective, model, source)
    assert after >= 0.9 and after > before + 0.2, (before, after)
    assert 0.0 <= metrics["acc"] <= 1.0


def test_classify_configures_the_head_and_checks_labels(tmp_path):
    tok = chat_tokenizer(tmp_path)
    model_cfg = ModelConfig(vocab_size=64)
    cfg = _cfg(tmp_path / "d.jsonl")
    objective_for(cfg, tok, model_cfg).configure_model(cfg, model_cfg)
    assert model_cfg.num_labels == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b", "label": "neg"}\n{"text": "c d", "label": "maybe"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: \"label\" is 'maybe'"):
        objective_for(_cfg(bad), tok, model_cfg).source(None, "train")
    bad.write_text('{"text": "", "label": 0}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: needs a non-empty string \"text\""):
        objective_for(_cfg(bad), tok, model_cfg).source(None, "train")
    with pytest.raises(UserError, match="encoder .* or a causal LM"):
        objective_for(cfg, tok, ModelConfig(arch="encdec", vocab_size=64, pos_encoding="sinusoidal"))


def test_classify_regression_with_one_output(tmp_path):
    tok = chat_tokenizer(tmp_path)
    data = tmp_path / "r.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} {w}", "label": float(len(w))}) + "\n" for w in WORDS))
    cfg = load_config(None, ["objective=classify", f"data.file={data}", "classify.num_labels=1"])
    model = tiny_gpt(tok, num_labels=1).eval()
    objective = objective_for(cfg, tok, model.config)
    source = objective.source(None, "train")
    batch = objective.global_batch(source, 0, 0, 4)
    out = objective.logits(model, batch)[:, 0]
    assert objective.loss(model, batch).item() == pytest.approx(((out - batch["labels"]) ** 2).mean().item(),
                                                                rel=1e-5)
    assert np.isin(batch["labels"].numpy(), [len(w) for w in WORDS]).all()
