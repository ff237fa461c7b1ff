"""DPO and ORPO: losses equal trl's on fixed log-probabilities, pair batching, the reference
(precomputed or live, a frozen copy or the policy with adapters disabled), and a tiny DPO run
whose preference accuracy on its train pairs rises."""

from __future__ import annotations

import collections
import copy
import types

import numpy as np
import pytest
import torch
from preference_helpers import chat_tokenizer, one_thread, pair_config, tiny_gpt, write_pairs  # noqa: F401 - one_thread: a fixture

from lmforge.errors import UserError
from lmforge.models import eval_mode
from lmforge.train.objectives import objective_for
from lmforge.train.objectives.dpo import dpo_loss, pair_logps
from lmforge.train.objectives.orpo import odds_ratio, orpo_loss
from lmforge.train.objectives.preference import both_sides, epoch_picks, fit_pair, pair_batch, reply_logps

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- references: trl ---------------------------------------------------------------------------


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def _trl_dpo(logits, ids, completion_mask, ref_chosen, ref_rejected, beta):
    """trl's DPOTrainer._compute_loss (loss_type sigmoid, precomputed reference log-probs) on fixed logits."""
    from trl import DPOTrainer

    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_Accelerator(), ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
        beta=beta, use_weighting=False, _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0, args=types.SimpleNamespace(max_length=None))
    fake._truncate_inputs = lambda *a: DPOTrainer._truncate_inputs(fake, *a)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion_mask.long(),
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(fake, lambda **kw: types.SimpleNamespace(logits=logits), inputs, False)
    return loss, fake._metrics["train"]


def _fixed_batch(B=4, T=9, V=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    mask = torch.zeros(2 * B, T, dtype=torch.bool)
    for row in range(2 * B):  # prompts of different lengths, replies of different lengths
        start = 2 + row % 3
        mask[row, start:T - row % 2] = True
    return logits, ids, mask


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl(beta):
    logits, ids, mask = _fixed_batch()
    g = torch.Generator().manual_seed(1)
    ref_chosen, ref_rejected = torch.randn(4, generator=g) * 5 - 10, torch.randn(4, generator=g) * 5 - 10
    sums, _ = reply_logps(logits, ids, mask)
    chosen, rejected = sums.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    trl_loss, metrics = _trl_dpo(logits, ids, mask, ref_chosen, ref_rejected, beta)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert chosen.mean().item() == pytest.approx(metrics["logps/chosen"][0], rel=1e-5)
    assert (chosen_rewards - rejected_rewards).mean().item() == pytest.approx(metrics["rewards/margins"][0],
                                                                             rel=1e-5, abs=1e-6)
    assert (chosen_rewards > rejected_rewards).float().mean().item() == metrics["rewards/accuracies"][0]


def test_orpo_loss_equals_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logits, ids, mask = _fixed_batch(seed=3)
    sums, counts = reply_logps(logits, ids, mask)
    labels = ids.masked_fill(~mask, -100)  # trl's labels: -100 outside the completion
    trl_means = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    torch.testing.assert_close(sums / counts, trl_means, rtol=1e-5, atol=1e-6)
    chosen, rejected = (sums / counts).chunk(2)
    fake = types.SimpleNamespace(beta=0.25, accelerator=_Accelerator())
    trl_losses, *_, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)
    ratio, log_odds = odds_ratio(chosen, rejected)
    assert ratio.mean().item() == pytest.approx(trl_ratio.item(), rel=1e-5)
    assert log_odds.mean().item() == pytest.approx(trl_log_odds.item(), rel=1e-5)
    nll = torch.tensor(1.7)
    # trl: loss = policy_nll_loss - losses.mean(), losses = beta * log sigmoid(log odds)
    assert orpo_loss(nll, chosen, rejected, 0.25).item() == pytest.approx((nll - trl_losses.mean()).item(), rel=1e-6)


# ---- batches -----------------------------------------------------------------------------------


def test_fit_pair_keeps_the_prompt_end_and_the_reply_start():
    prompt, chosen, rejected = list(range(30)), list(range(100, 110)), list(range(200, 230))
    p, c, r, cut = fit_pair(prompt, chosen, rejected, 40)
    assert cut and p == list(range(10, 30)) and c == chosen and r == rejected[:20]
    assert len(p) + len(r) == 40
    assert fit_pair([1, 2], [3], [4, 5], 8) == ([1, 2], [3], [4, 5], False)


def test_epoch_picks_cover_each_pair_once_per_epoch_and_depend_only_on_seed_step():
    rows, n = 4, 10
    stream = np.concatenate([epoch_picks(n, 7, step, rows) for step in range(5)])  # two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert (epoch_picks(n, 7, 3, rows) == stream[12:16]).all()
    assert not (epoch_picks(n, 8, 0, 10) == stream[:10]).all()


def test_pair_batch_pads_right_and_masks_the_replies(tmp_path):
    tok = chat_tokenizer(tmp_path)
    cfg = pair_config("dpo", write_pairs(tmp_path / "p.jsonl"))
    model = tiny_gpt(tok)
    objective = objective_for(cfg, tok, model.config, {"reference": copy.deepcopy(model)})
    source = objective.source(None, "train")
    batch = pair_batch(source, np.array([0, 1, 2]), objective.pad_id)
    ids, mask, lengths = both_sides(batch)
    for row, i in enumerate([0, 1, 2, 0, 1, 2]):
        reply = (source.chosen if row < 3 else source.rejected)[i]
        n = len(source.prompts[i])
        assert ids[row, :n].tolist() == source.prompts[i]
        assert ids[row, mask[row]].tolist() == reply and lengths[row] == n + len(reply)
    # each reply's log-prob is the same alone as padded in the batch (attention is causal)
    with eval_mode(model):
        logps = reply_logps(model(ids)[0], ids, mask)[0]
        alone = reply_logps(model(ids[4:5, :lengths[4]])[0], ids[4:5, :lengths[4]], mask[4:5, :lengths[4]])[0]
    torch.testing.assert_close(logps[4:5], alone, rtol=1e-5, atol=1e-5)


# ---- the reference -----------------------------------------------------------------------------


def test_dpo_precompute_equals_live_and_releases_the_copy(tmp_path):
    tok = chat_tokenizer(tmp_path)
    data = write_pairs(tmp_path / "p.jsonl")
    model = tiny_gpt(tok)
    losses = {}
    for mode in ("precompute", "live"):
        ref = copy.deepcopy(model)
        objective = objective_for(pair_config("dpo", data, f"dpo.reference={mode}"), tok, model.config,
                                  {"reference": ref})
        source = objective.source(None, "train")
        objective.source(None, "val")
        assert next(ref.parameters()).is_meta == (mode == "precompute")  # the copy is released once cached
        batch = objective.global_batch(source, 0, 0, 8)
        with eval_mode(model):
            losses[mode] = objective.loss(model, batch)
    # the policy is still the base: every implicit reward is 0, the loss is log 2
    assert losses["precompute"].item() == pytest.approx(np.log(2), abs=1e-5)
    assert losses["live"].item() == pytest.approx(np.log(2), abs=1e-5)


def test_dpo_reference_is_the_policy_with_adapters_disabled(tmp_path):
    from lmforge.adapters import AdapterOptions, adapter_transform

    tok = chat_tokenizer(tmp_path)
    base = tiny_gpt(tok)
    policy = adapter_transform(AdapterOptions(method="lora", lora_rank=4))(copy.deepcopy(base))
    with torch.no_grad():  # a trained-looking adapter: the policy no longer equals the base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    objective = objective_for(pair_config("dpo", write_pairs(tmp_path / "p.jsonl"), "adapter.method=lora"), tok,
                              base.config)
    source = objective.source(None, "train")
    objective.source(None, "val")
    batch = objective.global_batch(source, 0, 0, 8)
    ref_chosen, ref_rejected = objective.reference_logps(policy, batch)
    known = ~source.reference[:, 0].isnan()  # computed for the batch's pairs alone, the first time they are used
    assert sorted(known.nonzero()[:, 0].tolist()) == sorted(set(batch["index"].tolist()))
    with eval_mode(base), torch.no_grad():
        want_chosen, want_rejected = pair_logps(base, batch)
        got_chosen, _ = pair_logps(policy.eval(), batch)
    torch.testing.assert_close(ref_chosen, want_chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_rejected, want_rejected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got_chosen, want_chosen, atol=1e-3)  # the adapter does change the policy


def test_dpo_full_finetuning_needs_a_reference_copy(tmp_path):
    tok = chat_tokenizer(tmp_path)
    model = tiny_gpt(tok)
    with pytest.raises(UserError, match="frozen copy of the base"):
        objective_for(pair_config("dpo", write_pairs(tmp_path / "p.jsonl")), tok, model.config)


def test_pair_objectives_refuse_an_encoder(tmp_path):
    from lmforge.models import ModelConfig

    bert = ModelConfig(arch="bert", vocab_size=64, norm_position="post")
    for name in ("dpo", "orpo", "reward"):
        with pytest.raises(UserError, match="causal LM"):
            objective_for(pair_config(name, tmp_path / "p.jsonl"), None, bert)


# ---- training ----------------------------------------------------------------------------------


def _train(objective, model, source, steps, lr=3e-3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss = objective.loss(model, objective.global_batch(source, 0, step, 8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return objective.step_metrics()


def _policy_preference(model, objective, source) -> float:
    """Share of the pairs whose chosen reply the model gives the higher log-probability."""
    batch = pair_batch(source, np.arange(len(source)), objective.pad_id)
    with eval_mode(model), torch.no_grad():
        chosen, rejected = pair_logps(model, batch)
    return (chosen > rejected).float().mean().item()


@pytest.mark.parametrize("name", ["dpo", "orpo"])
def test_tiny_preference_run_raises_train_preference_accuracy(tmp_path, name):
    tok = chat_tokenizer(tmp_path)
    model = tiny_gpt(tok, seed=1)
    cfg = pair_config(name, write_pairs(tmp_path / "p.jsonl", n=48), "dpo.beta=0.5", "orpo.weight=1.0")
    objective = objective_for(cfg, tok, model.config, {"reference": copy.deepcopy(model)} if name == "dpo" else None)
    source = objective.source(None, "train")
    objective.source(None, "val")
    before = _policy_preference(model, objective, source)
    metrics = _train(objective, model, source, steps=12)
    after = _policy_preference(model, objective, source)
    assert after >= 0.9 and after > before + 0.2, (before, after)
    assert set(metrics) >= {"pref_acc", "margin"} and metrics["margin"] > 0


# ---- lmforge align -----------------------------------------------------------------------------

FAST = ["train.max_steps=12", "train.eval_every=6", "train.eval_steps=1", "train.threads=1", "train.precision=fp32",
        "train.warmup_steps=2", "train.batch_size=8"]


def _align(preset, base, data, out, *sets, extra=()):
    from lmforge.cli import main

    args = ["align", preset, "--base", str(base), "--data", str(data), "--out", str(out)]
    for s in [*FAST, *sets]:
        args += ["--set", s]
    return main(args + list(extra))


def _preference_of(run_or_base, tmp_path, data) -> float:
    from lmforge.train import checkpoint as ckpt

    model, tok = ckpt.load_pretrained(run_or_base)
    cfg = pair_config("orpo", data)  # any pair objective: only its source and batches are used
    objective = objective_for(cfg, tok, model.config)
    return _policy_preference(model, objective, objective.source(None, "train"))


@pytest.mark.parametrize("method,lr", [("lora", 1e-2), ("full", 3e-3)])
def test_align_dpo_runs_on_the_loop_and_raises_preference_accuracy(tmp_path, method, lr, capsys):
    import json

    from preference_helpers import save_base

    tok = chat_tokenizer(tmp_path)
    base, data = save_base(tmp_path, tok, seed=1), write_pairs(tmp_path / "p.jsonl")
    out = tmp_path / f"dpo-{method}"
    assert _align("dpo", base, data, out, f"adapter.method={method}", f"train.lr={lr}", "dpo.beta=0.5") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["pref_acc"] >= 0.75 and records[-1]["margin"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "align" and summary["metrics"]["method"] == method
    before, after = _preference_of(base, tmp_path, data), _preference_of(out, tmp_path, data)
    assert after >= 0.9 and after > before + 0.2, (before, after)
    assert "done: dpo, 12 steps" in capsys.readouterr().out


def test_align_reward_trains_the_new_head_under_lora(tmp_path, capsys):
    from preference_helpers import save_base

    from lmforge.posttrain.reward import sequence_rewards
    from lmforge.train import checkpoint as ckpt

    tok = chat_tokenizer(tmp_path)
    base, data = save_base(tmp_path, tok, seed=2), write_pairs(tmp_path / "p.jsonl")
    out = tmp_path / "reward"
    assert _align("reward", base, data, out, "train.lr=1e-2", "train.max_steps=40") == 0
    model, _ = ckpt.load_pretrained(out)
    assert model.config.num_labels == 1 and model.score.weight.abs().sum() > 0
    objective = objective_for(pair_config("reward", data), tok, model.config)
    source = objective.source(None, "train")
    batch = pair_batch(source, np.arange(len(source)), objective.pad_id)
    rewards = [sequence_rewards(model, [r[:n] for r, n in zip(batch[f"{side}_ids"].tolist(), batch[f"{side}_len"])])
               for side in ("chosen", "rejected")]
    assert (rewards[0] > rewards[1]).float().mean() >= 0.9


def test_align_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    from preference_helpers import save_base

    tok = chat_tokenizer(tmp_path)
    data = write_pairs(tmp_path / "p.jsonl")
    bert, gpt = save_base(tmp_path, tok, arch="bert"), save_base(tmp_path, tok)
    cases = [(("dpo", bert, data), "not a causal LM"),
             (("dpo", gpt, data, "--reward", str(gpt)), "--reward is for objective ppo"),
             (("ppo", gpt, data), "needs --reward DIR"),
             (("sft-lora", gpt, data), "align runs objective")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    cases.append((("orpo", gpt, bad), "bad.jsonl:1"))
    for (preset, base, pairs, *extra), message in cases:
        out = tmp_path / "out"
        assert _align(preset, base, pairs, out, extra=extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_align_dpo_ctrl_c_and_resume_give_the_straight_run(tmp_path, method, capsys):
    import json
    import os
    import signal

    from preference_helpers import save_base

    from lmforge.config import load_config
    from lmforge.errors import Interrupted
    from lmforge.posttrain.align import align

    tok = chat_tokenizer(tmp_path)
    base, data = save_base(tmp_path, tok, seed=3), write_pairs(tmp_path / "p.jsonl")
    sets = [*FAST, f"adapter.method={method}", "train.lr=3e-3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _align("dpo", base, data, straight, *sets) == 0

    def ctrl_c(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        align(load_config("dpo", sets), resumed, base=base, data=data, on_step=ctrl_c)
    assert _align("dpo", base, data, resumed, *sets, extra=["--resume"]) == 0, capsys.readouterr().err
    a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, 13))
    for key in ("loss", "val_loss", "pref_acc", "margin"):
        assert a[-1][key] == pytest.approx(b[-1][key], abs=1e-5), key
