"""Eval metrics against their reference implementations (sacrebleu, rouge-score, scikit-learn) and
hand-worked values."""

from __future__ import annotations

import math
import random

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lmforge.eval import metrics as M

sklearn_metrics = pytest.importorskip("sklearn.metrics")

HYPS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog", "to be or not to be",
        "shall i compare thee to a summer's day", "running dogs were barking loudly", "nothing"]
REFS = ["the cat is on the mat", "the quick brown fox jumped over the lazy dog",
        "to be, or not to be: that is the question", "shall I compare thee to a summer's day?",
        "the dog runs and barks", "all is well"]
REFS2 = ["a cat sat on a mat", "quick brown foxes jump over lazy dogs", "be or not be", "compare thee to summer",
         "dogs ran barking", "nothing at all"]


# ---- BLEU / chrF -------------------------------------------------------------------------------

def test_corpus_bleu_and_chrf_equal_sacrebleu():
    got = M.corpus_bleu_chrf(HYPS, [[r] for r in REFS])
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score, abs=1e-9)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score, abs=1e-9)
    assert got["bleu_tokenize"] == "13a" and "tok:13a" in got["bleu_signature"]


def test_corpus_bleu_with_two_references_equals_sacrebleu():
    got = M.corpus_bleu_chrf(HYPS, [[a, b] for a, b in zip(REFS, REFS2)])
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS, REFS2]).score, abs=1e-9)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS, REFS2]).score, abs=1e-9)


def test_chinese_references_use_the_zh_tokenizer():
    hyps = ["我爱北京天安门", "今天天气很好", "他们在学校学习中文"]
    refs = ["我爱北京故宫", "今天的天气非常好", "他们在大学学习汉语"]
    got = M.corpus_bleu_chrf(hyps, [[r] for r in refs])
    assert got["bleu_tokenize"] == "zh"
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score, abs=1e-9)
    # 13a would see each sentence as one word and score ~0: the tokenizer choice matters
    assert sacrebleu.corpus_bleu(hyps, [refs]).score < got["bleu"]
    assert M.bleu_tokenizer(["こんにちは世界"]) == "zh"  # Han present
    assert M.bleu_tokenizer(["こんにちは"]) == "char" and M.bleu_tokenizer(["안녕하세요"]) == "char"
    assert M.bleu_tokenizer(["hello"], lang="zh") == "zh"


# ---- ROUGE -------------------------------------------------------------------------------------

def test_rouge_equals_rouge_score_with_stemming():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    mean, per_item = M.rouge_scores(HYPS, [[r] for r in REFS])
    for key in M.ROUGE_TYPES:
        ref = [scorer.score(r, h)[key].fmeasure for h, r in zip(HYPS, REFS)]
        assert [p[key] for p in per_item] == pytest.approx(ref, abs=1e-12)
        assert mean[key] == pytest.approx(sum(ref) / len(ref), abs=1e-12)
    # stemming: "running dogs were barking" matches "the dog runs and barks" on dog/run/bark
    assert per_item[4]["rouge1"] > 0.5


def test_rouge_multi_reference_takes_the_best_reference():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    _, per_item = M.rouge_scores(HYPS, [[a, b] for a, b in zip(REFS, REFS2)])
    for h, a, b, p in zip(HYPS, REFS, REFS2, per_item):
        assert p["rougeL"] == pytest.approx(max(scorer.score(a, h)["rougeL"].fmeasure,
                                                scorer.score(b, h)["rougeL"].fmeasure), abs=1e-12)


def test_chinese_rouge_is_character_level_hand_worked():
    # prediction 我爱上海 vs reference 我爱北京: unigrams 我/爱 shared (2 of 4 each side) -> 0.5;
    # bigrams 我爱 shared (1 of 3 each side) -> 1/3; LCS 我爱 = 2 -> 0.5
    mean, _ = M.rouge_scores(["我爱上海"], [["我爱北京"]])
    assert mean["rouge1"] == pytest.approx(0.5) and mean["rouge2"] == pytest.approx(1 / 3)
    assert mean["rougeL"] == pytest.approx(0.5)
    # rouge-score's own tokenizer drops every CJK character, which is why we tokenize ourselves
    plain = rouge_scorer.RougeScorer(["rouge1"]).score("我爱北京", "我爱上海")["rouge1"].fmeasure
    assert plain == 0.0
    # mixed text: latin words are stemmed as rouge-score does, CJK characters count one each
    mean, _ = M.rouge_scores(["running 我"], [["runs 我们"]], cjk=True)
    # tokens: pred [run, 我], ref [run, 我, 们] -> P = 2/2, R = 2/3 -> F = 0.8
    assert mean["rouge1"] == pytest.approx(0.8)


# ---- SQuAD EM / F1 -----------------------------------------------------------------------------

@pytest.mark.parametrize("prediction,answers,em,f1", [
    ("Denver Broncos", ["Denver Broncos"], 1.0, 1.0),
    ("the Denver Broncos!", ["Denver Broncos"], 1.0, 1.0),  # articles and punctuation are dropped
    ("Broncos won", ["Denver Broncos"], 0.0, 0.5),  # 1 shared token: P = 1/2, R = 1/2
    ("Denver", ["Denver Broncos", "Broncos"], 0.0, 2 / 3),  # P = 1, R = 1/2 against the first answer
    ("Santa Clara, California", ["Levi's Stadium", "Santa Clara"], 0.0, 0.8),  # P = 2/3, R = 1
    ("an apple", ["The Apple"], 1.0, 1.0),
    ("nothing here", ["Carolina Panthers"], 0.0, 0.0),
    ("the", ["a"], 1.0, 1.0),  # both normalize to empty
])
def test_squad_exact_match_and_f1_hand_worked(prediction, answers, em, f1):
    assert M.exact_match(prediction, answers) == em
    assert M.token_f1(prediction, answers) == pytest.approx(f1)


def test_squad_normalize():
    assert M.squad_normalize("  The  Cat's   hat, an ANSWER.  ") == "cats hat answer"


# ---- Wilson interval ---------------------------------------------------------------------------

def test_wilson_interval_hand_computed():
    # 8/10, z = 1.96: center (0.8 + 1.92/10) / 1.384 = 0.7167, half 1.96*sqrt(0.016 + 0.0096)/1.384 = 0.2266
    lo, hi = M.wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    lo, hi = M.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.8415 / 13.8415, abs=1e-4)  # z^2 / (n + z^2)
    lo, hi = M.wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert M.wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_matches_the_formula_for_random_counts():
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(1, 500)
        k = rng.randint(0, n)
        p, z = k / n, 1.959963984540054
        center = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert M.wilson_interval(k, n) == pytest.approx((max(0, center - half), min(1, center + half)))


# ---- binary ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_equal_scikit_learn_with_unparsed_as_a_third_class(seed):
    rng = random.Random(seed)
    gold = [rng.choice(["yes", "no"]) for _ in range(200)]
    pred = [rng.choice(["yes", "no", "no", "yes", "unparsed"]) for _ in range(200)]
    got = M.binary_metrics(gold, pred)
    labels = ["yes", "no", "unparsed"]
    cm = sklearn_metrics.confusion_matrix(gold, pred, labels=labels)
    assert (got["tp"], got["fn"], got["unparsed_yes"]) == tuple(cm[0])
    assert (got["fp"], got["tn"], got["unparsed_no"]) == tuple(cm[1])
    assert got["unparsed"] == pred.count("unparsed")
    assert got["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(gold, pred))
    p, r, f, _ = sklearn_metrics.precision_recall_fscore_support(gold, pred, labels=["yes"], zero_division=0)
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p[0], r[0], f[0]))
    # specificity is the recall of "no"
    assert got["specificity"] == pytest.approx(sklearn_metrics.recall_score(gold, pred, labels=["no"], average=None)[0])
    lo, hi = M.wilson_interval(got["tp"] + got["tn"], 200)
    assert got["accuracy_ci95"] == [lo, hi]


def test_binary_metrics_without_unparsed_equal_scikit_learn_binary():
    rng = random.Random(11)
    gold = [rng.choice(["yes", "no"]) for _ in range(100)]
    pred = [g if rng.random() < 0.7 else ("no" if g == "yes" else "yes") for g in gold]
    got = M.binary_metrics(gold, pred)
    tn, fp, fn, tp = sklearn_metrics.confusion_matrix(gold, pred, labels=["no", "yes"]).ravel()
    assert (got["tp"], got["fp"], got["tn"], got["fn"], got["unparsed"]) == (tp, fp, tn, fn, 0)
    assert got["f1"] == pytest.approx(sklearn_metrics.f1_score(gold, pred, pos_label="yes"))


@pytest.mark.parametrize("reply,expected", [
    ("yes", "yes"), ("Yes.", "yes"), (" NO!", "no"), ("no\nbecause ...", "no"), ('"Yes"', "yes"),
    ("", "unparsed"), ("Nope", "unparsed"), ("yes, but no", "unparsed"), ("maybe", "unparsed"),
    ("I think yes", "unparsed"), ("yesterday", "unparsed"), ("no no", "unparsed"),
])
def test_parse_yes_no_is_strict(reply, expected):
    assert M.parse_yes_no(reply) == expected


# ---- multi-class -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_equal_scikit_learn(seed):
    rng = random.Random(seed)
    labels = ["comedy", "tragedy", "history", "romance", "poem"]
    gold = [rng.choice(labels[:4]) for _ in range(150)]  # "poem" never occurs in gold
    pred = [g if rng.random() < 0.5 else rng.choice(labels[1:]) for g in gold]  # "comedy" rarely predicted
    got = M.classification_metrics(gold, pred, labels)
    p, r, f, s = sklearn_metrics.precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        c = got["per_class"][label]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    for avg in ("macro", "micro"):
        p, r, f, _ = sklearn_metrics.precision_recall_fscore_support(gold, pred, labels=labels, average=avg,
                                                                      zero_division=0)
        assert (got[f"precision_{avg}"], got[f"recall_{avg}"], got[f"f1_{avg}"]) == pytest.approx((p, r, f))
    assert (got["precision"], got["f1"]) == (got["precision_macro"], got["f1_macro"])
    assert got["confusion_matrix"]["matrix"] == sklearn_metrics.confusion_matrix(gold, pred, labels=labels).tolist()
    assert got["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(gold, pred))
