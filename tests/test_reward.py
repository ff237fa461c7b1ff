"""Reward models: the GPT score head, `sequence_rewards`, the Bradley–Terry loss (equal to trl's
RewardTrainer) and a tiny reward-model run whose pairwise accuracy rises."""

from __future__ import annotations

import collections
import types

import numpy as np
import pytest
import torch
from preference_helpers import chat_tokenizer, one_thread, pair_config, tiny_gpt, write_pairs  # noqa: F401 - one_thread: a fixture

from lmforge.errors import UserError
from lmforge.models import has_capability
from lmforge.posttrain.reward import sequence_rewards
from lmforge.train.objectives import objective_for
from lmforge.train.objectives.preference import pair_batch
from lmforge.train.objectives.reward import RewardModel, bradley_terry_loss

pytestmark = pytest.mark.usefixtures("one_thread")

def test_bradley_terry_loss_equals_trl():
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(6, generator=g) * 3, torch.randn(6, generator=g) * 3
    logits = torch.cat([chosen, rejected])[:, None]  # trl: the model's (2B, 1) logits, chosen rows first
    acc = types.SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = types.SimpleNamespace(model=types.SimpleNamespace(training=False), accelerator=acc,
                                 args=types.SimpleNamespace(center_rewards_coefficient=None), _total_train_tokens=0,
                                 _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    inputs = {"input_ids": torch.zeros(12, 3, dtype=torch.long), "attention_mask": torch.ones(12, 3)}
    trl_loss = RewardTrainer.compute_loss(fake, lambda **kw: types.SimpleNamespace(logits=logits), inputs)
    assert bradley_terry_loss(chosen, rejected).mean().item() == pytest.approx(trl_loss.item(), rel=1e-6)
    assert (chosen > rejected).float().mean().item() == pytest.approx(fake._metrics["eval"]["accuracy"][0])


def test_gpt_score_head_reads_the_final_normed_hidden_states(tmp_path):
    tok = chat_tokenizer(tmp_path)
    plain, reward = tiny_gpt(tok), tiny_gpt(tok, num_labels=1)
    assert not has_capability(plain, "score") and "score.weight" not in plain.state_dict()
    assert has_capability(reward, "score") and reward.state_dict()["score.weight"].shape == (1, 32)
    with torch.no_grad():  # the score head as one row of the LM head: scores are that logit column
        reward.score.weight.copy_(reward.lm_head.weight[7:8])
    ids = torch.randint(0, tok.vocab_size, (3, 11))
    reward.eval()
    torch.testing.assert_close(reward.scores(ids)[..., 0], reward(ids)[0][..., 7])
    with pytest.raises(ValueError, match="no score head"):
        plain.scores(ids)


def test_sequence_rewards_do_not_depend_on_batching_or_padding(tmp_path):
    tok = chat_tokenizer(tmp_path)
    model = tiny_gpt(tok, num_labels=1)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, tok.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 3, 9, 30)]
    together = sequence_rewards(model, seqs, batch_size=4)
    alone = torch.stack([sequence_rewards(model, [s])[0] for s in seqs])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    model.eval()
    want = model.scores(torch.tensor([seqs[1]]))[0, -1, 0]
    assert together[1].item() == pytest.approx(want.item(), rel=1e-5)
    assert model.training is False
    with pytest.raises(UserError, match="not a reward model"):
        sequence_rewards(tiny_gpt(tok), seqs)


def test_reward_objective_adds_a_scalar_head():
    cfg = pair_config("reward", "unused.jsonl")
    from lmforge.models import ModelConfig

    model_cfg = ModelConfig(vocab_size=64)
    RewardModel.configure_model(cfg, model_cfg)
    assert model_cfg.num_labels == 1 and cfg.model.num_labels == 1
    assert RewardModel.new_heads == ("score.weight",)


def test_tiny_reward_model_run_raises_pairwise_accuracy(tmp_path):
    tok = chat_tokenizer(tmp_path)
    model = tiny_gpt(tok, num_labels=1, seed=2)
    objective = objective_for(pair_config("reward", write_pairs(tmp_path / "p.jsonl")), tok, model.config)
    source = objective.source(None, "train")

    def accuracy():
        batch = pair_batch(source, np.arange(len(source)), objective.pad_id)
        chosen = sequence_rewards(model, [r[:n] for r, n in zip(batch["chosen_ids"].tolist(), batch["chosen_len"])])
        rejected = sequence_rewards(model, [r[:n] for r, n in zip(batch["rejected_ids"].tolist(),
                                                                 batch["rejected_len"])])
        return (chosen > rejected).float().mean().item()

    before = accuracy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(15):
        loss = objective.loss(model, objective.global_batch(source, 0, step, 8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metrics = objective.step_metrics()
    after = accuracy()
    assert after >= 0.9 and after > before + 0.2, (before, after)
    assert set(metrics) == {"pref_acc", "margin"}
