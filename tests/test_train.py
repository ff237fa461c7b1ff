"""The training loop: schedule, parameter groups, batches, checkpoints, exact resume, failures."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from train_helpers import make_token_dir, tiny_config

from lmforge.errors import Interrupted, TrainingFailed, UserError
from lmforge.models import GPT
from lmforge.models.config import ModelConfig
from lmforge.train import checkpoint as ckpt
from lmforge.train.batches import TokenBatches
from lmforge.train.loop import pretrain
from lmforge.train.optim import lr_at, param_groups


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_dir(tmp_path_factory.mktemp("tok"))


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_hand_values():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.5 * 0.9)  # half way: cos(pi/2) = 0
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_embeddings():
    model = GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith("weight") for n in decayed)
    for n, p in model.named_parameters():
        if p.dim() < 2 or "emb" in n or "wte" in n or "wpe" in n:
            assert n not in decayed, n
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_batches_are_a_function_of_step_and_partition_across_ranks(tokens):
    from lmforge.models.config import ModelConfig
    from lmforge.train.objectives import CausalLM

    obj = CausalLM(None, None, ModelConfig(block_size=16))
    b = obj.source(tokens, "train")
    one = obj.batch_for(b, seed=1, step=7, batch_size=4, grad_accum=2, rank=0, world_size=1)
    again = obj.batch_for(b, seed=1, step=7, batch_size=4, grad_accum=2, rank=0, world_size=1)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(one, again))
    # two ranks with 2 micro-batches of 2 rows each see the same 8 rows as one process
    parts = [obj.batch_for(b, 1, 7, 2, 2, r, 2) for r in range(2)]
    rows = torch.cat([m["input_ids"] for part in parts for m in part])
    assert torch.equal(rows, torch.cat([m["input_ids"] for m in one]))
    x, y = one[0]["input_ids"], one[0]["targets"]
    assert x.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def test_windows_cross_shard_boundaries(tmp_path):
    """Shards are one token stream: every window equals the same slice of their concatenation."""
    import numpy as np
    from train_helpers import write_corpus

    from lmforge.tokenizer.shards import load_split, tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer

    corpus = write_corpus(tmp_path / "c", docs=6)
    train_tokenizer(corpus, tmp_path / "tok", kind="char")
    tokenize_corpus(tmp_path / "tok", corpus, tmp_path / "tokens", val_fraction=0.2, shard_tokens=1000)
    shards = load_split(tmp_path / "tokens", "train")
    assert len(shards) > 3 and len(shards[-1]) <= 1000
    stream = np.concatenate(shards)
    b = TokenBatches(tmp_path / "tokens", "train", 64)
    assert b.num_tokens == len(stream)
    for start in [0, 990, 999, 1000, len(stream) - 65]:
        assert np.array_equal(b._window(start), stream[start:start + 65])


def test_training_writes_metrics_checkpoints_and_report(tokens, tmp_path):
    out = tmp_path / "run"
    summary = pretrain(tiny_config(tokens, "train.keep_last=2"), out)
    recs = losses(out)
    assert [r["step"] for r in recs] == list(range(1, 41))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "ms_per_step"):
        assert all(key in r for r in recs)
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert recs[-1]["loss"] < recs[0]["loss"]
    # keep last 2 step checkpoints + best
    assert [s for s, _ in ckpt.step_checkpoints(out)] == [30, 40]
    best = out / "checkpoints" / "best"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt"):
        assert (best / name).exists() and (out / "checkpoints" / "step_000040" / name).exists()
    state = torch.load(best / "trainer_state.pt", weights_only=True)
    assert state["step"] == summary["metrics"]["best_step"]
    for name in ("summary.json", "report.md", "loss.png", "config.yaml"):
        assert (out / name).exists(), name
    assert summary["metrics"]["final_val_loss"] == evals[-1]["val_loss"]
    assert not list(out.rglob(".*tmp*")), "temp files left behind"


@pytest.mark.parametrize("interrupt_at", [1, 13, 39])
def test_interrupt_then_resume_equals_uninterrupted(tokens, tmp_path, interrupt_at):
    straight = tmp_path / "straight"
    pretrain(tiny_config(tokens, "model.dropout=0.1"), straight)

    resumed = tmp_path / "resumed"

    def ctrl_c(step):
        if step == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        pretrain(tiny_config(tokens, "model.dropout=0.1"), resumed, on_step=ctrl_c)
    assert ckpt.latest_checkpoint(resumed).name == f"step_{interrupt_at:06d}"
    pretrain(tiny_config(tokens, "model.dropout=0.1"), resumed, resume=True)
    a, b = losses(straight), losses(resumed)
    assert [r["step"] for r in b] == list(range(1, 41))
    assert abs(a[-1]["loss"] - b[-1]["loss"]) <= 1e-6
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) <= 1e-6


def test_existing_run_needs_resume_or_overwrite(tokens, tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_config(tokens, "train.max_steps=5"), out)
    with pytest.raises(UserError, match="--resume"):
        pretrain(tiny_config(tokens, "train.max_steps=5"), out)
    pretrain(tiny_config(tokens, "train.max_steps=5"), out, overwrite=True)
    with pytest.raises(UserError, match="model.n_embd"):
        pretrain(tiny_config(tokens, "train.max_steps=8", "model.n_embd=64"), out, resume=True)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tokens, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tokens, "train.max_steps=30", "train.eval_every=5", "train.grad_clip=0")
    calls = {"n": 0}
    original = GPT.forward

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = original(self, idx, targets, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 12:  # step 12 produces a NaN loss
                loss = loss * float("nan")
        return logits, loss

    GPT.forward = poisoned
    try:
        with pytest.raises(TrainingFailed, match="step 12: loss is nan"):
            pretrain(cfg, out)
    finally:
        GPT.forward = original
    assert ckpt.latest_checkpoint(out).name == "step_000010"
    state = torch.load(ckpt.latest_checkpoint(out) / "trainer_state.pt", weights_only=True)
    assert state["step"] == 10
    last = losses(out)[-1]  # the failing step is logged, for `lmforge diagnose`
    assert last["step"] == 12 and math.isnan(last["loss"])


def test_early_stopping(tokens, tmp_path, monkeypatch):
    from lmforge.train import loop

    vals = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0])
    def fake_loss(self, batches):
        return next(vals) if batches.split == "val" else 1.0

    monkeypatch.setattr(loop._Trainer, "estimate_loss", fake_loss)
    out = tmp_path / "run"
    summary = pretrain(tiny_config(tokens, "train.patience=2", "train.eval_every=5"), out)
    assert summary["metrics"]["stop_reason"] == "early_stopping"
    assert summary["metrics"]["steps"] == 20 and summary["metrics"]["best_step"] == 10
    state = torch.load(out / "checkpoints" / "best" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 10 and math.isclose(state["best_val_loss"], 2.0)


def test_vocab_mismatch_is_a_user_error(tokens, tmp_path):
    with pytest.raises(UserError, match="model.vocab_size"):
        pretrain(tiny_config(tokens, "model.vocab_size=8"), tmp_path / "run")


def test_checkpoint_loads_for_inference_and_rejects_damage(tokens, tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_config(tokens, "train.max_steps=10"), out)
    model, tok = ckpt.load_pretrained(out)
    assert isinstance(model, GPT) and not model.training
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(out / "checkpoints" / "best", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        ckpt.load_pretrained(bad)
    with pytest.raises(UserError, match="does not exist"):
        ckpt.load_pretrained(tmp_path / "nope")


@pytest.mark.slow
def test_compiled_training_matches_eager(tokens, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    pretrain(tiny_config(tokens, "train.max_steps=10"), eager)
    pretrain(tiny_config(tokens, "train.max_steps=10", "train.compile=true"), compiled)
    a, b = losses(eager), losses(compiled)
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-3, (x, y)


def test_an_objectives_step_metrics_reach_metrics_jsonl(tmp_path, monkeypatch):
    """`Objective.step_metrics()` (e.g. DPO's reward margin) is merged into each step's line."""
    from lmforge.train.objectives import CausalLM

    calls = iter(range(100))
    monkeypatch.setattr(CausalLM, "step_metrics", lambda self: {"objective_calls": next(calls)})
    tokens = make_token_dir(tmp_path)
    out = tmp_path / "run"
    pretrain(tiny_config(tokens, "train.max_steps=3", "train.eval_every=3"), out)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["objective_calls"] for r in lines] == [0, 1, 2]
