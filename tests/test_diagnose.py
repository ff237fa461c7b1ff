"""`lmforge diagnose`: verdicts on synthetic curves of every class, boundary behaviour, the bigram
reference against a hand-written count model, the live warning, the CLI, and real short CPU runs
engineered to overfit, to diverge and to fit well."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from train_helpers import make_token_dir, tiny_config, write_corpus

from lmforge.cli import main
from lmforge.diagnose import (
    MetricsTail,
    bigram_reference,
    diagnose_records,
    diagnose_run,
    format_diagnosis,
    live_warning,
    recent_improvement,
    trailing_median,
)
from lmforge.errors import TrainingFailed, UserError

# ---- synthetic curves ----------------------------------------------------------------------------


def synth(train, val=None, *, steps=1000, eval_every=100, noise=0.02, seed=0, grad=None):
    """Records like the trainer's: `train(t)`/`val(t)` are the true losses at run fraction t in (0, 1];
    the per-step loss gets multiplicative batch noise, the eval losses (averages) a little."""
    rng = np.random.default_rng(seed)
    records = []
    for step in range(1, steps + 1):
        t = step / steps
        record = {"step": step, "loss": float(train(t) * (1 + noise * rng.standard_normal())), "lr": 1e-3,
                  "grad_norm": float(grad(t, step) if grad else abs(1 + 0.1 * rng.standard_normal()))}
        if val is not None and (step % eval_every == 0 or step == steps):
            record["val_loss"] = float(val(t) * (1 + 0.002 * rng.standard_normal()))
            record["train_eval_loss"] = float(train(t) * (1 + 0.002 * rng.standard_normal()))
        records.append(record)
    return records


def fitted(t):
    return 1.0 + 4.7 * math.exp(-t / 0.08)  # falls fast, flat from ~half way


CURVES = {
    "good_fit": (fitted, lambda t: fitted(t) + 0.03),
    "still_improving": (lambda t: 1.0 + 4.7 * math.exp(-t / 0.5), lambda t: 1.03 + 4.7 * math.exp(-t / 0.5)),
    # the gap is constant until half way, then grows while train keeps falling and val rises
    "overfitting": (lambda t: 0.5 + 5.2 * math.exp(-t / 0.1) - 0.4 * max(0.0, t - 0.5),
                    lambda t: 0.52 + 5.2 * math.exp(-t / 0.1) + 0.4 * max(0.0, t - 0.5)),
    "diverging": (lambda t: 1.5 + 4.2 * math.exp(-t / 0.1) + 3 * max(0.0, t - 0.6) ** 2,
                  lambda t: 1.55 + 4.2 * math.exp(-t / 0.1) + 3 * max(0.0, t - 0.6) ** 2),
    "flat": (lambda t: 5.7, lambda t: 5.72),
    # a plateau at 2.2: high next to a bigram model that reaches 2.0 (see BIGRAM)
    "underfitting": (lambda t: 2.2 + 3.5 * math.exp(-t / 0.05), lambda t: 2.22 + 3.5 * math.exp(-t / 0.05)),
}
BIGRAM = {"kind": "bigram", "bigram_val_loss": 2.0, "unigram_val_loss": 3.3, "unigram_entropy": 3.2,
          "uniform_loss": 5.7}
EXPECTED = {"good_fit": "good_fit", "still_improving": "still_improving", "overfitting": "overfitting",
            "diverging": "not_converging", "flat": "not_converging", "underfitting": "underfitting"}


@pytest.mark.parametrize("name", list(CURVES))
@pytest.mark.parametrize("seed", range(5))
def test_every_class_on_synthetic_curves(name, seed):
    train, val = CURVES[name]
    d = diagnose_records(synth(train, val, seed=seed), reference=BIGRAM)
    assert d.verdict == EXPECTED[name], format_diagnosis(d)
    assert d.remedies and d.reason
    json.dumps(d.to_dict(), allow_nan=False)  # the --json output is strict JSON


def test_overfitting_reports_where_the_gap_began_to_grow_and_the_best_checkpoint():
    d = diagnose_records(synth(*CURVES["overfitting"]), reference=BIGRAM)
    val = d.evidence["val_loss"]
    # by construction: the gap is 0.02 until step 500, then grows 0.8 per run; val is lowest at 500
    assert val["gap_began_to_grow_step"] == 500
    assert d.evidence["best_checkpoint_step"] == val["best_step"] == 500
    assert val["gap_growth"] == pytest.approx(0.4, abs=0.02)
    assert val["val_trend"] == "rose" and val["val_stopped_improving_step"] == 500
    assert any("checkpoints/best (step 500)" in r for r in d.remedies)
    assert any("dropout" in r for r in d.remedies) and any("weight decay" in r for r in d.remedies)


def test_a_gap_that_closes_from_below_is_not_overfitting():
    # val is easier than train early (gap -0.07), the gap closes to ~0 as both flatten: the gap
    # "grew" 0.07 over the run, but not after val stopped improving
    def val(t):
        return fitted(t) + 0.03 - 0.1 * math.exp(-t / 0.2)

    for seed in range(5):
        d = diagnose_records(synth(fitted, val, seed=seed))
        assert d.verdict == "good_fit", format_diagnosis(d)
        gap = d.evidence["val_loss"]
        assert gap["gap_growth"] < 0.05 < gap["gap_final"] - gap["gap_min"]


def test_not_converging_variants_nan_spikes_and_grad_norms():
    train, val = CURVES["good_fit"]
    records = synth(train, val)[:700]
    records.append({"step": 701, "loss": float("nan"), "lr": 1e-3, "grad_norm": float("inf")})
    d = diagnose_records(records)
    assert d.verdict == "not_converging" and d.evidence["instability"]["nonfinite_step"] == 701
    json.dumps(d.to_dict(), allow_nan=False)

    spikes = {s for start in range(200, 1000, 150) for s in range(start, start + 3)}
    records = synth(lambda t: fitted(t), val, grad=lambda t, step: 30.0 if step in spikes else 1.0)
    for r in records:
        if r["step"] in spikes:
            r["loss"] *= 2
    d = diagnose_records(records)
    assert d.verdict == "not_converging" and "oscillating" in d.reason
    inst = d.evidence["instability"]
    assert inst["loss_spike_count"] == 6  # six episodes of three steps each
    assert [s["step"] for s in inst["loss_spikes"]] == list(range(200, 1000, 150))
    assert {s["step"] for s in inst["grad_norm_spikes"]} == spikes
    assert all(s["x_median"] == 30.0 for s in inst["grad_norm_spikes"])

    d = diagnose_records(synth(*CURVES["diverging"]), config={"train": {"lr": 3.0, "grad_clip": 0.0,
                                                                         "warmup_steps": 0, "max_steps": 1000}})
    assert "diverging" in d.reason
    assert any("train.grad_clip=1.0" in r for r in d.remedies) and any("-> 1 or lower" in r for r in d.remedies)
    assert any("warmup_steps (now 0)" in r for r in d.remedies)


def test_a_few_grad_norm_spikes_alone_are_reported_but_not_a_verdict():
    train, val = CURVES["good_fit"]
    d = diagnose_records(synth(train, val, grad=lambda t, step: 50.0 if step in (300, 600) else 1.0))
    assert d.verdict == "good_fit"
    assert [s["step"] for s in d.evidence["instability"]["grad_norm_spikes"]] == [300, 600]
    assert "2 spikes" in format_diagnosis(d)


def sweep(make, values, seeds=range(3), **kw):
    return [[diagnose_records(synth(*make(v), seed=s), **kw).verdict for s in seeds] for v in values]


def assert_one_switch(verdicts, low, high):
    """Across a sweep the verdict goes from `low` to `high` once and never visits another class;
    seeds disagree at most at one point next to the switch."""
    flat = [v for row in verdicts for v in row]
    assert set(flat) <= {low, high}, verdicts
    majority = [max(set(row), key=row.count) for row in verdicts]
    switch = majority.index(high) if high in majority else len(majority)
    assert majority == [low] * switch + [high] * (len(majority) - switch), verdicts
    mixed = [i for i, row in enumerate(verdicts) if len(set(row)) > 1]
    assert all(abs(i - switch) <= 1 for i in mixed), verdicts
    assert verdicts[0] == [low] * len(verdicts[0]) and verdicts[-1] == [high] * len(verdicts[-1]), verdicts


def test_near_the_overfitting_boundary_verdicts_do_not_flip_wildly():
    # val rises by a/2 and train falls by a/2 over the second half: the gap grows by a (threshold 0.05)
    def make(a):
        return (lambda t: fitted(t) - a * max(0.0, t - 0.5), lambda t: fitted(t) + 0.03 + a * max(0.0, t - 0.5))

    values = [0.0, 0.02, 0.035, 0.045, 0.055, 0.065, 0.08, 0.12, 0.2]
    verdicts = sweep(make, values)
    assert_one_switch(verdicts, "good_fit", "overfitting")
    assert verdicts[values.index(0.035)] == ["good_fit"] * 3 and verdicts[values.index(0.08)] == ["overfitting"] * 3


def test_near_the_still_improving_boundary_verdicts_do_not_flip_wildly():
    def make(tau):
        return (lambda t: 1.0 + 4.7 * math.exp(-t / tau), lambda t: 1.03 + 4.7 * math.exp(-t / tau))

    assert_one_switch(sweep(make, [0.05, 0.08, 0.1, 0.12, 0.14, 0.16, 0.2, 0.3, 0.5]), "good_fit", "still_improving")


def test_near_the_underfitting_boundary_verdicts_do_not_flip_wildly():
    def make(ratio):  # the plateau as a multiple of the bigram model's loss (threshold 0.9)
        return (lambda t: 2.0 * ratio + 3.5 * math.exp(-t / 0.05), lambda t: 2.0 * ratio + 3.5 * math.exp(-t / 0.05))

    verdicts = sweep(make, [0.7, 0.8, 0.86, 0.89, 0.91, 0.94, 1.0, 1.2], reference=BIGRAM)
    assert_one_switch(verdicts, "good_fit", "underfitting")


def test_near_the_divergence_boundary_verdicts_do_not_flip_wildly():
    def make(rise):  # the train loss ends `rise` (relative) above its plateau (threshold 10%)
        return (lambda t: fitted(t) * (1 + rise * max(0.0, (t - 0.7) / 0.3)),)

    assert_one_switch(sweep(make, [0.0, 0.03, 0.06, 0.08, 0.12, 0.15, 0.3, 1.0]), "good_fit", "not_converging")


def test_underfitting_needs_a_reference_and_says_so():
    train, val = CURVES["underfitting"]
    d = diagnose_records(synth(train, val))
    assert d.verdict == "good_fit"
    assert any("no reference loss" in x for x in d.limitations)
    d = diagnose_records(synth(train, val), reference={"kind": "target", "loss": 2.0})
    assert d.verdict == "underfitting" and d.evidence["reference"]["ratio"] == pytest.approx(1.11, abs=0.01)
    assert diagnose_records(synth(train, val), reference={"kind": "target", "loss": 2.15}).verdict == "good_fit"
    d = diagnose_records(synth(train, val), reference={**BIGRAM, "unigram_val_loss": 2.25})
    assert any("unigram level" in r for r in d.remedies)  # stuck at the unigram loss: a lr hint


def test_zero_or_one_eval_and_very_short_runs_get_an_honest_verdict():
    train, _ = CURVES["good_fit"]
    d = diagnose_records(synth(train))
    assert d.verdict == "good_fit"
    assert any("no val evaluation" in x for x in d.limitations) and any("train loss alone" in x for x in d.limitations)
    d = diagnose_records(synth(train, lambda t: train(t) + 0.03, eval_every=10_000))  # one eval, at the end
    assert d.evidence["val_loss"]["evals"] == 1 and any("only one val evaluation" in x for x in d.limitations)
    assert diagnose_records(synth(*CURVES["still_improving"], eval_every=10_000)).verdict == "still_improving"
    # a run that died after 3 steps without a summary (e.g. TrainingFailed) vs one that is just short
    three = synth(train, steps=3)
    d = diagnose_records(three, finished=False, config={"train": {"max_steps": 100}})
    assert d.verdict == "not_converging" and "without writing summary.json" in d.reason
    assert diagnose_records(three, finished=True, config={"train": {"max_steps": 3}}).verdict == "still_improving"


# ---- building blocks against independent computations -------------------------------------------


def test_trailing_median_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    values = rng.normal(size=300)
    values[[5, 77, 200]] = np.nan
    got = trailing_median(values, 7)
    for i in range(300):
        window = [v for v in values[max(0, i - 6): i + 1] if not math.isnan(v)]
        assert got[i] == pytest.approx(statistics.median(window))


def test_recent_improvement_on_a_line():
    steps = np.arange(1, 1001, dtype=float)
    fall, start, err = recent_improvement(steps, 10 - 0.001 * steps, 0.25, 3)
    span = 0.25 * 999
    assert start == 751 and fall == pytest.approx(0.001 * span / (10 - 0.001 * 1000))
    assert err == pytest.approx(0, abs=1e-9)
    evals = np.array([250.0, 500.0, 750.0, 1000.0])  # sparse evals: at least the last 3 points
    fall, start, _ = recent_improvement(evals, np.array([3.0, 2.0, 1.5, 1.5]), 0.25, 3)
    assert start == 500 and fall == pytest.approx(-np.polyfit([500, 750, 1000], [2.0, 1.5, 1.5], 1)[0] * 187.5
                                                   / (1.5 - 1 / 12), rel=1e-9)  # line end: 17/12


def test_bigram_reference_matches_hand_written_counts(tmp_path):
    from lmforge.tokenizer.shards import load_split, read_meta

    tokens = make_token_dir(tmp_path)
    got = bigram_reference(tokens)
    train = [int(x) for shard in load_split(tokens, "train") for x in shard]
    val = [int(x) for shard in load_split(tokens, "val") for x in shard]
    vocab = int(read_meta(tokens)["vocab_size"])
    unigram, pairs, context, followers = {}, {}, {}, {}
    for w in train:
        unigram[w] = unigram.get(w, 0) + 1
    for a, b in zip(train, train[1:]):
        pairs[(a, b)] = pairs.get((a, b), 0) + 1
        context[a] = context.get(a, 0) + 1
    for a, _ in pairs:
        followers[a] = followers.get(a, 0) + 1

    def p_uni(w):
        return (unigram.get(w, 0) + 1) / (len(train) + vocab)

    nll = 0.0
    for a, b in zip(val, val[1:]):
        if context.get(a):
            p = max(pairs.get((a, b), 0) - 0.75, 0) / context[a] + 0.75 * followers[a] / context[a] * p_uni(b)
        else:
            p = p_uni(b)
        nll -= math.log(p)
    assert got["bigram_val_loss"] == pytest.approx(nll / (len(val) - 1), abs=1e-4)
    assert got["unigram_val_loss"] == pytest.approx(-sum(math.log(p_uni(w)) for w in val) / len(val), abs=1e-4)
    entropy = -sum(c / len(train) * math.log(c / len(train)) for c in unigram.values())
    assert got["unigram_entropy"] == pytest.approx(entropy, abs=1e-4)
    assert got["bigram_val_loss"] < got["unigram_val_loss"] < got["uniform_loss"]


# ---- the live warning ------------------------------------------------------------------------------


def test_live_warning_only_for_overfitting_and_not_converging(tmp_path):
    assert live_warning(synth(*CURVES["good_fit"])) is None
    assert live_warning(synth(*CURVES["still_improving"])) is None
    line = live_warning(synth(*CURVES["overfitting"]))
    assert line.startswith("diagnose (step 1000): overfitting:") and "\n" not in line
    assert "not converging" in live_warning(synth(*CURVES["diverging"]))
    assert live_warning(tmp_path / "missing.jsonl") is None
    (tmp_path / "broken.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo\n')
    assert live_warning(tmp_path / "broken.jsonl").startswith("diagnose: live check skipped (JSONDecodeError")


def test_metrics_tail_reads_only_new_complete_lines_and_starts_over_on_a_new_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 6)]
    tail = MetricsTail()
    path.write_text("".join(lines[:2]) + lines[2][:7])  # the third line is being written
    assert [r["step"] for r in tail.read(path)] == [1, 2]
    with open(path, "a") as f:
        f.write(lines[2][7:] + lines[3])
    assert [r["step"] for r in tail.read(path)] == [1, 2, 3, 4]
    replaced = tmp_path / "new.jsonl"  # a new run: a different file at the same path
    replaced.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + "".join(lines[1:]))
    replaced.replace(path)
    assert [r["loss"] for r in tail.read(path)] == [2.0, 1.0, 1.0, 1.0, 1.0]


# ---- run dirs and the CLI ----------------------------------------------------------------------------


def write_run(root: Path, records, config=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        import yaml

        (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def test_cli_json_and_text(tmp_path, capsys):
    run = write_run(tmp_path / "run", synth(*CURVES["overfitting"]),
                    {"train": {"max_steps": 1000, "weight_decay": 0.1, "patience": 0}, "model": {"dropout": 0.0},
                     "data": {"tokens": str(tmp_path / "gone")}})
    assert main(["diagnose", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "overfitting" and out["evidence"]["best_checkpoint_step"] == 500
    assert set(out) >= {"verdict", "reason", "evidence", "remedies", "limitations", "thresholds"}
    assert any("dropout (now 0.0) -> 0.1" in r for r in out["remedies"])
    assert any("token dir named in config.yaml" in x for x in out["limitations"])
    assert main(["diagnose", str(run)]) == 0
    text = capsys.readouterr().out
    assert "verdict: OVERFITTING" in text and "from step 500" in text and "remedies:" in text


def test_the_bigram_reference_only_for_next_token_losses(tmp_path, tokens):
    train, val = CURVES["underfitting"]
    clm = diagnose_run(write_run(tmp_path / "clm", synth(train, val), {"data": {"tokens": str(tokens)}}))
    assert clm.evidence["reference"]["kind"] == "bigram" and clm.evidence["reference"]["tokens_dir"] == str(tokens)
    mlm = diagnose_run(write_run(tmp_path / "mlm", synth(train, val), {"data": {"tokens": str(tokens)},
                                                                       "objective": "mlm"}))
    assert "reference" not in mlm.evidence and any("not a next-token loss" in x for x in mlm.limitations)
    assert diagnose_run(tmp_path / "mlm", target_loss=2.0).verdict == "underfitting"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="no such run directory"):
        diagnose_run(tmp_path / "nope")
    assert main(["diagnose", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in one_error_line(capsys)
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in one_error_line(capsys)
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "is empty" in one_error_line(capsys)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": \n')
    assert main(["diagnose", str(tmp_path)]) == 2
    assert f"{tmp_path / 'metrics.jsonl'}:2:" in one_error_line(capsys)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    assert main(["diagnose", str(tmp_path), "--target-loss", "-1"]) == 2
    assert "--target-loss" in one_error_line(capsys)


# ---- real short CPU runs -------------------------------------------------------------------------------


def char_tokens(root: Path, docs: int, val_fraction: float) -> Path:
    from lmforge.tokenizer.shards import tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer

    corpus = write_corpus(root / "corpus", docs=docs)
    train_tokenizer(corpus, root / "tok", kind="char")
    tokenize_corpus(root / "tok", corpus, root / "tokens", val_fraction=val_fraction)
    return root / "tokens"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_dir(tmp_path_factory.mktemp("diag_tokens"))


@pytest.mark.parametrize("seed", [1, 2])
def test_real_run_with_a_huge_learning_rate_diverges(tokens, tmp_path, seed):
    from lmforge.train.loop import pretrain

    run = tmp_path / "run"
    pretrain(tiny_config(tokens, "train.lr=3.0", "train.min_lr=0.3", "train.grad_clip=0", "train.warmup_steps=0",
                         "train.max_steps=60", f"train.seed={seed}"), run)
    d = diagnose_run(run)
    assert d.verdict == "not_converging" and "diverging" in d.reason, format_diagnosis(d)
    assert d.evidence["train_loss"]["final"] > 2 * d.evidence["train_loss"]["start"]
    assert any("train.grad_clip=1.0 (now 0.0)" in r for r in d.remedies)


def test_real_run_stopped_by_a_non_finite_loss_is_diagnosable(tokens, tmp_path):
    from lmforge.train.loop import pretrain

    run = tmp_path / "run"
    with pytest.raises(TrainingFailed):
        pretrain(tiny_config(tokens, "train.lr=1e3", "train.min_lr=1", "train.grad_clip=0", "train.warmup_steps=0",
                             "train.max_steps=30"), run)
    assert not (run / "summary.json").exists()
    d = diagnose_run(run)
    assert d.verdict == "not_converging", format_diagnosis(d)
    assert d.evidence["val_loss"]["evals"] == 0
    assert any("without writing summary.json" in x for x in d.limitations + [d.reason])


@pytest.mark.slow
def test_real_run_on_tiny_data_with_a_big_model_overfits_and_warns_live(tmp_path, capsys):
    from lmforge.train.loop import pretrain

    tokens = char_tokens(tmp_path, docs=2, val_fraction=0.5)  # one document to train on, one to validate
    run = tmp_path / "run"
    summary = pretrain(tiny_config(tokens, "model.n_embd=64", "model.n_head=4", "model.block_size=64",
                                   "train.batch_size=8", "train.max_steps=400", "train.eval_every=40",
                                   "train.eval_steps=4", "train.lr=5e-3", "train.min_lr=5e-4",
                                   "train.warmup_steps=20", "train.seed=3"), run)
    out = capsys.readouterr().out
    assert "overfitting:" in out and "diagnose (step 400)" in out, out
    d = diagnose_run(run)
    assert d.verdict == "overfitting", format_diagnosis(d)
    val = d.evidence["val_loss"]
    assert d.evidence["best_checkpoint_step"] == summary["metrics"]["best_step"] < 400
    assert val["gap_began_to_grow_step"] <= val["best_step"]
    assert val["final"] > val["best"] + 0.1 and val["gap_final"] > 0.3
    assert d.evidence["run"]["epochs"] > 50


@pytest.mark.slow
def test_real_run_with_enough_data_fits_well(tmp_path, capsys):
    from lmforge.train.loop import pretrain

    tokens = char_tokens(tmp_path, docs=120, val_fraction=0.1)
    run = tmp_path / "run"
    pretrain(tiny_config(tokens, "train.batch_size=16", "train.max_steps=1500", "train.eval_every=100",
                         "train.eval_steps=8", "train.lr=1e-2", "train.min_lr=1e-3", "train.warmup_steps=20",
                         "train.seed=1"), run)
    assert "diagnose (step" not in capsys.readouterr().out  # no live warning
    d = diagnose_run(run)
    assert d.verdict == "good_fit", format_diagnosis(d)
    assert abs(d.evidence["val_loss"]["gap_final"]) < 0.05
    assert d.evidence["reference"]["ratio"] < 0.6  # far below the bigram model's loss


def modular_tokens(root: Path, docs: int = 60) -> Path:
    """Text over 8 letters where each letter is (previous + the one before) mod 8, 70% of the time:
    a bigram model sees nothing (the previous letter alone says nothing about the next); only a
    model that learns the rule over two positions gets below ln 8."""
    import random

    from lmforge.tokenizer.shards import tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer

    rng = random.Random(0)
    (root / "corpus").mkdir(parents=True)
    for d in range(docs):
        x = [rng.randrange(8), rng.randrange(8)]
        for _ in range(2000):
            x.append((x[-1] + x[-2]) % 8 if rng.random() < 0.7 else rng.randrange(8))
        text = "".join("abcdefgh"[i] for i in x)
        (root / "corpus" / f"doc{d:03d}.txt").write_text("\n".join(text[i:i + 50] for i in range(0, len(text), 50)))
    train_tokenizer(root / "corpus", root / "tok", kind="char")
    tokenize_corpus(root / "tok", root / "corpus", root / "tokens", val_fraction=0.1)
    return root / "tokens"


@pytest.mark.slow
def test_real_run_that_cannot_use_context_underfits(tmp_path):
    from lmforge.train.loop import pretrain

    run = tmp_path / "run"
    pretrain(tiny_config(modular_tokens(tmp_path), "train.batch_size=16", "train.max_steps=400",
                         "train.eval_every=50", "train.eval_steps=8", "train.lr=1e-2", "train.min_lr=1e-3",
                         "train.warmup_steps=20", "train.seed=1"), run)
    d = diagnose_run(run)
    assert d.verdict == "underfitting", format_diagnosis(d)
    ref = d.evidence["reference"]
    assert ref["ratio"] >= 0.95 and ref["bigram_val_loss"] == pytest.approx(math.log(8), abs=0.1)
    assert d.evidence["train_loss"]["plateau_step"] < 200  # flat early
