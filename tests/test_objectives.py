"""Training objectives: masking statistics, span corruption invertibility, NSP pairs, SimCSE loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_helpers import make_token_dir

from lmforge.config import load_config
from lmforge.errors import UserError
from lmforge.models.config import ModelConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train.objectives import (
    MASK,
    OBJECTIVES,
    Contrastive,
    MaskedLM,
    SpanCorruption,
    objective_for,
    sentinel,
    special_ids,
    token_fallbacks,
    with_tokens,
)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_dir(tmp_path_factory.mktemp("tok"), kind="bpe")


def setup(tokens, objective: str, *overrides: str, arch: str = "gpt", block_size: int = 64):
    cfg = load_config(None, [f"data.tokens={tokens}", f"objective={objective}", *overrides])
    tok = Tokenizer.load(tokens / "tokenizer.json")
    base = tok.vocab_size
    with_tokens(tok, OBJECTIVES[objective].extra_tokens, token_fallbacks())
    mc = ModelConfig(block_size=block_size, vocab_size=tok.vocab_size, dropout=0.1)
    mc.arch = arch  # set after construction: the model families register themselves separately
    return cfg, tok, base, mc


def test_added_tokens_come_after_every_existing_id(tokens):
    _, tok, base, _ = setup(tokens, "span")
    assert tok.vocab_size == base + 100
    assert [tok.token_to_id(sentinel(i)) for i in range(100)] == list(range(base, base + 100))
    assert tok.token_to_id(sentinel(0)) in special_ids(tok)
    # text that spells a sentinel stays text
    assert tok.token_to_id(sentinel(0)) not in tok.encode(sentinel(0))


def test_mlm_masks_15_percent_of_ordinary_tokens_80_10_10(tokens):
    cfg, tok, _, mc = setup(tokens, "mlm")
    obj = MaskedLM(cfg, tok, mc)
    src = obj.source(tokens, "train")
    batch = obj.global_batch(src, seed=3, step=5, rows=400)
    ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    assert ids.shape == (400, 64)
    assert (ids[:, 0] == tok.bos_id).all() and (ids[:, -1] == tok.eos_id).all()
    chosen = labels != -100
    specials = np.isin(labels, sorted(special_ids(tok)))
    assert not specials.any()  # [CLS], [SEP] (and any <|eos|> inside a window) are never chosen
    ordinary = ~np.isin(np.where(chosen, labels, ids), sorted(special_ids(tok)))
    rate = chosen.sum() / ordinary.sum()
    assert abs(rate - 0.15) < 0.01
    masked = ids[chosen] == tok.token_to_id(MASK)
    kept = ids[chosen] == labels[chosen]
    replaced = ~masked & ~kept
    n = chosen.sum()
    assert abs(masked.sum() / n - 0.8) < 0.02
    assert abs(replaced.sum() / n - 0.1) < 0.02
    assert abs(kept.sum() / n - 0.1) < 0.02  # a random token can equal the original: ~1/vocab extra
    assert not np.isin(ids[chosen][replaced], sorted(special_ids(tok))).any()
    # unchosen positions are untouched: they are the window itself (drawn first from the step's rng)
    windows = src.windows(np.random.default_rng([3, 5]), 400)
    inner = ~chosen[:, 1:-1]
    assert np.array_equal(ids[:, 1:-1][inner], windows[inner])
    again = obj.global_batch(src, seed=3, step=5, rows=400)
    assert torch.equal(again["input_ids"], batch["input_ids"])  # a function of (seed, step)


def test_mlm_nsp_pairs(tokens):
    cfg, tok, _, mc = setup(tokens, "mlm", "mlm.nsp=true", "mlm.mask_prob=0.01")
    obj = MaskedLM(cfg, tok, mc)
    src = obj.source(tokens, "train")
    rng = np.random.default_rng([1, 2])
    windows = src.windows(rng, 200)
    batch = obj.make_batch(windows, np.random.default_rng(0), src)
    ids, tt, nsp = batch["input_ids"].numpy(), batch["token_type_ids"].numpy(), batch["next_sentence_label"].numpy()
    labels = batch["labels"].numpy()
    original = np.where(labels != -100, labels, ids)
    assert ids.shape == (200, 64) and 60 < nsp.sum() < 140
    for r in range(200):
        seps = np.flatnonzero(tt[r] == 1)
        start_b = seps[0]
        a, b = original[r, 1:start_b - 1], original[r, start_b:-1]
        assert original[r, start_b - 1] == tok.eos_id and original[r, -1] == tok.eos_id and original[r, 0] == tok.bos_id
        assert (tt[r, :start_b] == 0).all() and (tt[r, start_b:] == 1).all()
        whole = windows[r, :len(a) + len(b)]
        if nsp[r] == 0:
            assert np.array_equal(np.concatenate([a, b]), whole)  # B continues A
        assert np.array_equal(a, whole[:len(a)])


def test_span_corruption_is_invertible_and_has_t5_counts(tokens):
    cfg, tok, _, mc = setup(tokens, "span", arch="encdec", block_size=64)
    obj = SpanCorruption(cfg, tok, mc)
    R = obj.raw_length
    noise, spans = round(R * 0.15), round(round(R * 0.15) / 3)
    assert R - noise + spans + 1 <= 64 < (R + 1) - round((R + 1) * 0.15) + round(round((R + 1) * 0.15) / 3) + 1
    src = obj.source(tokens, "train")
    rng = np.random.default_rng(0)
    windows = src.windows(rng, 50)[:, :R]
    batch = obj.make_batch(windows, np.random.default_rng(7), src)
    inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    assert inputs.shape == (50, R - noise + spans + 1) and labels.shape == (50, noise + spans + 1)
    assert obj.lengths(cfg, 64) == (inputs.shape[1], labels.shape[1])  # what FLOPs / MFU and plan count
    sent = {tok.token_to_id(sentinel(i)): i for i in range(100)}
    for r in range(50):
        # parse the targets into spans, then put them back in place of the sentinels
        pieces, current = {}, None
        for t in labels[r, :-1]:
            if t in sent:
                current = sent[t]
                pieces[current] = []
            else:
                pieces[current].append(t)
        assert list(pieces) == list(range(spans)) and all(pieces.values())
        rebuilt = []
        for t in inputs[r, :-1]:
            rebuilt.extend(pieces[sent[t]] if t in sent else [t])
        assert np.array_equal(rebuilt, windows[r])
        assert inputs[r, -1] == tok.eos_id and labels[r, -1] == tok.eos_id


def test_span_mean_length_over_many_draws(tokens):
    cfg, tok, _, mc = setup(tokens, "span", arch="encdec", block_size=512)
    obj = SpanCorruption(cfg, tok, mc)
    rng = np.random.default_rng(0)
    masks = [obj.noise_mask(obj.raw_length, rng) for _ in range(50)]
    for m in masks:
        assert not m[0] and m[-1]  # T5's interleaving: starts clean, ends in noise
        starts = m & ~np.concatenate([[False], m[:-1]])
        assert abs(m.sum() / starts.sum() - 3.0) < 0.2


class _FakeEncoder(torch.nn.Module):
    """Embeddings = a fixed projection of the one-hot ids plus dropout noise (for the SimCSE loss)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Embedding(500, 8)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, ids, labels=None, return_embeddings=False):
        assert return_embeddings
        return self.drop(self.proj(ids)).mean(1), None


def test_contrastive_loss_matches_hand_computation(tokens):
    cfg, tok, _, mc = setup(tokens, "contrastive", arch="bert")
    obj = Contrastive(cfg, tok, mc)
    model = _FakeEncoder()
    ids = torch.randint(10, 200, (6, 12))
    torch.manual_seed(0)
    loss = obj.loss(model, {"input_ids": ids})
    torch.manual_seed(0)
    z = model(torch.cat([ids, ids]), return_embeddings=True)[0]
    z1, z2 = F.normalize(z[:6], dim=-1), F.normalize(z[6:], dim=-1)
    expected = -sum(math.log(torch.softmax(z1[i] @ z2.T / 0.05, 0)[i].item()) for i in range(6)) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # eval loss: fixed seed per batch index, train mode restored
    model.eval()
    a, b = obj.eval_loss(model, {"input_ids": ids}, 3), obj.eval_loss(model, {"input_ids": ids}, 3)
    assert a.item() == b.item() and not model.training


def test_objective_arch_mismatch_and_bad_settings(tokens):
    cfg, tok, _, mc = setup(tokens, "mlm")
    with pytest.raises(UserError, match="objective mlm trains model.arch=bert"):
        objective_for(cfg, tok, mc)
    cfg, tok, _, mc = setup(tokens, "contrastive", arch="encdec")  # no sentence vectors: refused
    with pytest.raises(UserError, match="objective contrastive trains model.arch=bert, but model.arch is encdec"):
        objective_for(cfg, tok, mc)
    cfg, tok, _, mc = setup(tokens, "contrastive", arch="bert")
    mc.dropout = 0.0
    with pytest.raises(UserError, match="model.dropout must be > 0"):
        objective_for(cfg, tok, mc)
    with pytest.raises(UserError, match="mlm.mask_prob"):
        load_config(None, ["mlm.mask_prob=1.5"])
    with pytest.raises(UserError, match="objective"):
        load_config(None, ["objective=rlhf"])


def test_seq2seq_pairs_split_pad_and_errors(tokens, tmp_path):
    import json

    from lmforge.train.objectives import PairSource, Seq2Seq

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"source": f"the king speaks {i} " * (1 + i % 3), "target": f"good sir {i}"} for i in range(200)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, tok, _, mc = setup(tokens, "seq2seq", f"data.pairs={pairs}", arch="encdec", block_size=32)
    obj = Seq2Seq(cfg, tok, mc)
    train, val = obj.source(tokens, "train"), obj.source(tokens, "val")
    assert len(train.sources) + len(val.sources) == 200 and 2 <= len(val.sources) <= 25
    assert not set(map(tuple, train.sources)) & set(map(tuple, val.sources))  # no pair in both
    # the split does not depend on line order
    pairs.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    assert sorted(map(tuple, PairSource(pairs, tok, "val", 32).sources)) == sorted(map(tuple, val.sources))
    batch = obj.global_batch(train, seed=0, step=0, rows=8)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape[1] <= 32 and labels.shape[1] <= 32
    assert ((ids == tok.pad_id) == (mask == 0)).all()
    for r in range(8):
        n = int(mask[r].sum())
        assert ids[r, n - 1] == tok.eos_id
        text = tok.decode(ids[r, :n - 1])
        target = tok.decode([t for t in labels[r].tolist() if t != -100][:-1])
        assert target == "good sir " + text.split()[3]
    pairs.write_text('{"source": "a", "target": "b"}\n{"source": "a"}\n')
    with pytest.raises(UserError, match=r"pairs.jsonl:2: needs non-empty string fields"):
        PairSource(pairs, tok, "train", 32)
    pairs.write_text('{"source": "a", "target": "b"}\nnot json\n')
    with pytest.raises(UserError, match=r"pairs.jsonl:2: invalid JSON"):
        PairSource(pairs, tok, "train", 32)


def test_contrastive_pretraining_of_a_bert_runs_end_to_end(tokens, tmp_path):
    """SimCSE through `pretrain`: the in-batch loss falls from ~ln(batch) and the checkpoint embeds."""
    import json

    from train_helpers import tiny_config

    from lmforge.train.checkpoint import load_pretrained
    from lmforge.train.loop import pretrain

    cfg = tiny_config(tokens, "model.arch=bert", "model.norm_position=post", "model.dropout=0.1",
                      "objective=contrastive", "train.max_steps=30", "train.batch_size=8")
    pretrain(cfg, tmp_path / "run")
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = recs[0]["loss"], recs[-1]["loss"]
    assert abs(first - math.log(8)) < 1.0 and last < first
    assert all(math.isfinite(r["val_loss"]) for r in recs if "val_loss" in r)
    model, tok = load_pretrained(tmp_path / "run")
    ids = torch.tensor([tok.encode("the king shall speak")])
    assert model.embed(ids).shape == (1, 32)


def test_nsp_turns_on_the_nsp_head(tokens):
    from lmforge.train.loop import resolve_model_config

    cfg = load_config(None, [f"data.tokens={tokens}", "objective=mlm", "mlm.nsp=true", "model.arch=bert",
                             "model.norm_position=post", "model.nsp_head=false"])
    assert resolve_model_config(cfg, Tokenizer.load(tokens / "tokenizer.json")).nsp_head
    assert cfg.model.nsp_head  # what the run's config.yaml records is what was built
    cfg = load_config(None, [f"data.tokens={tokens}", "objective=mlm", "model.arch=bert", "model.norm_position=post"])
    assert not resolve_model_config(cfg, Tokenizer.load(tokens / "tokenizer.json")).nsp_head
