"""Metrics, computed the way their reference implementations do (so numbers are comparable).

- BLEU and chrF: `sacrebleu` corpus scores (BLEU with its default 13a tokenization; `zh` when
  the references are Chinese, `char` for Japanese/Korean without Han characters). 0-100.
- ROUGE-1/2/L/Lsum: `rouge-score` F-measures with Porter stemming, averaged over items (the
  best reference per item). Its tokenizer keeps only [a-z0-9], which would erase CJK text,
  so text with CJK characters is scored character by character instead. 0-1.
- Exact match and token F1 with the SQuAD v1.1 normalization (lowercase, no punctuation, no
  articles a/an/the, single spaces), the best over the gold answers. 0-1.
- Binary yes/no: the confusion matrix, accuracy with a Wilson 95% interval, precision,
  recall, F1 and specificity; an unparseable reply is its own category and never a hit.
- Classification: per-class precision/recall/F1/support, macro and micro averages,
  the confusion matrix (rows gold, columns predicted), as scikit-learn computes them.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence
from typing import Any

Z_95 = 1.959963984540054  # two-sided 95% standard normal quantile

# CJK ideographs (+ extension A, compatibility), kana, hangul
_HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_KANA_HANGUL = r"\u3040-\u30ff\u31f0-\u31ff\uac00-\ud7af\u1100-\u11ff"
_CJK_RE = re.compile(f"[{_HAN}{_KANA_HANGUL}]")
_HAN_RE = re.compile(f"[{_HAN}]")


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


# ---- QA: SQuAD v1.1 exact match and token F1 -----------------------------------------------

def squad_normalize(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(max(squad_normalize(prediction) == squad_normalize(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best token-overlap F1 against the answers (bags of normalized tokens)."""
    pred = squad_normalize(prediction).split()
    best = 0.0
    for answer in answers:
        gold = squad_normalize(answer).split()
        common = collections.Counter(pred) & collections.Counter(gold)
        overlap = sum(common.values())
        if not pred or not gold:
            score = float(pred == gold)  # both empty after normalization: a match
        elif overlap == 0:
            score = 0.0
        else:
            precision, recall = overlap / len(pred), overlap / len(gold)
            score = 2 * precision * recall / (precision + recall)
        best = max(best, score)
    return best


# ---- generation: BLEU, chrF, ROUGE ---------------------------------------------------------

def has_cjk(texts: Sequence[str]) -> bool:
    return any(_CJK_RE.search(t) for t in texts)


def bleu_tokenizer(references: Sequence[str], lang: str | None = None) -> str:
    """The sacrebleu tokenizer for these references: zh for Chinese, char for ja/ko, else 13a."""
    if lang == "zh" or (lang is None and any(_HAN_RE.search(r) for r in references)):
        return "zh"
    if lang in ("ja", "ko") or (lang is None and has_cjk(references)):
        return "char"
    return "13a"


def corpus_bleu_chrf(predictions: Sequence[str], references: Sequence[Sequence[str]],
                     lang: str | None = None) -> dict[str, Any]:
    """sacrebleu corpus BLEU and chrF; items may have different numbers of references."""
    import sacrebleu

    flat = [r for refs in references for r in refs]
    tokenize = bleu_tokenizer(flat, lang)
    n_refs = max(len(refs) for refs in references)
    # sacrebleu wants one stream per reference position; a missing reference is None
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(n_refs)]
    bleu_metric, chrf_metric = sacrebleu.metrics.BLEU(tokenize=tokenize), sacrebleu.metrics.CHRF()
    bleu = bleu_metric.corpus_score(list(predictions), streams)
    chrf = chrf_metric.corpus_score(list(predictions), streams)
    return {"bleu": bleu.score, "chrf": chrf.score, "bleu_tokenize": tokenize,
            "bleu_signature": str(bleu_metric.get_signature()),
            "chrf_signature": str(chrf_metric.get_signature())}


class CJKRougeTokenizer:
    """rouge-score tokenizer that keeps CJK characters as one token each (latin words stemmed).

    rouge-score's default tokenizer replaces everything outside [a-z0-9] with spaces, which
    turns Chinese text into nothing; here each CJK character is a token (character-level
    ROUGE, the usual choice for Chinese) and latin words are handled as rouge-score does.
    """

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()
        self._token = re.compile(f"[{_HAN}{_KANA_HANGUL}]|[a-z0-9]+")

    def tokenize(self, text: str) -> list[str]:
        tokens = self._token.findall(text.lower())
        return [self._stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in tokens]


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                 cjk: bool | None = None) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Mean ROUGE F-measures over items (best reference per item) and the per-item scores."""
    from rouge_score import rouge_scorer

    if cjk is None:
        cjk = has_cjk([r for refs in references for r in refs])
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True,
                                      tokenizer=CJKRougeTokenizer() if cjk else None)
    per_item = []
    for prediction, refs in zip(predictions, references):
        scores = scorer.score_multi(list(refs), prediction)
        per_item.append({k: scores[k].fmeasure for k in ROUGE_TYPES})
    n = max(len(per_item), 1)
    return {k: sum(s[k] for s in per_item) / n for k in ROUGE_TYPES}, per_item


# ---- binary yes/no ----------------------------------------------------------------------------

def binary_metrics(gold: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    """Confusion matrix and rates for yes/no answers; `predicted` may hold "unparsed".

    "yes" is the positive class. An unparsed reply is neither a hit nor a "no": it counts
    as wrong in accuracy, as a miss in recall (gold yes) and in specificity (gold no), and
    is reported on its own (`unparsed`); precision only looks at predicted yes.
    """
    tp = sum(g == "yes" and p == "yes" for g, p in zip(gold, predicted))
    fp = sum(g == "no" and p == "yes" for g, p in zip(gold, predicted))
    tn = sum(g == "no" and p == "no" for g, p in zip(gold, predicted))
    fn = sum(g == "yes" and p == "no" for g, p in zip(gold, predicted))
    unparsed = sum(p not in ("yes", "no") for p in predicted)
    n = len(gold)
    positives = sum(g == "yes" for g in gold)
    negatives = n - positives
    correct = tp + tn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / positives if positives else 0.0
    lo, hi = wilson_interval(correct, n)
    return {
        "accuracy": correct / n if n else 0.0, "accuracy_ci95": [lo, hi],
        "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "specificity": tn / negatives if negatives else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "unparsed": unparsed,
        "unparsed_yes": sum(g == "yes" and p not in ("yes", "no") for g, p in zip(gold, predicted)),
        "unparsed_no": sum(g == "no" and p not in ("yes", "no") for g, p in zip(gold, predicted)),
        "n": n,
    }


_YES_NO = re.compile(r"^\W*(yes|no)\b\W*$", re.IGNORECASE)


def parse_yes_no(reply: str) -> str:
    """The answer in a generated reply, read strictly: "yes"/"no" or "unparsed".

    Only the first line counts, and it must be the single word yes or no (any case, with
    surrounding punctuation allowed: "Yes.", " no!"). Anything else ("Yes, but no", "maybe",
    "Nope", an empty reply) is unparsed, never silently mapped to "no".
    """
    first = reply.strip().split("\n", 1)[0] if reply.strip() else ""
    match = _YES_NO.match(first)
    return match.group(1).lower() if match else "unparsed"


# ---- multi-class classification -------------------------------------------------------------

def classification_metrics(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Per-class and averaged precision/recall/F1 and the confusion matrix (rows gold, columns predicted)."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted):
        matrix[index[g]][index[p]] += 1
    per_class = {}
    tp_total = fp_total = fn_total = 0
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        fp = sum(matrix[r][i] for r in range(len(labels))) - tp
        fn = sum(matrix[i]) - tp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
        tp_total, fp_total, fn_total = tp_total + tp, fp_total + fp, fn_total + fn
    k = max(len(labels), 1)
    macro = {m: sum(c[m] for c in per_class.values()) / k for m in ("precision", "recall", "f1")}
    micro_p = tp_total / (tp_total + fp_total) if tp_total + fp_total else 0.0
    micro_r = tp_total / (tp_total + fn_total) if tp_total + fn_total else 0.0
    micro_f1 = 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0
    n = len(gold)
    correct = sum(g == p for g, p in zip(gold, predicted))
    lo, hi = wilson_interval(correct, n)
    return {
        "accuracy": correct / n if n else 0.0, "accuracy_ci95": [lo, hi],
        "precision": macro["precision"], "recall": macro["recall"], "f1": macro["f1"],
        "precision_macro": macro["precision"], "recall_macro": macro["recall"], "f1_macro": macro["f1"],
        "precision_micro": micro_p, "recall_micro": micro_r, "f1_micro": micro_f1,
        "per_class": per_class,
        "confusion_matrix": {"labels": list(labels), "matrix": matrix},
        "n": n,
    }
