"""Reading a training run for `lmforge diagnose`: its metrics.jsonl (all of it, or at every eval
only the new lines, for the live warning), config.yaml and summary.json, and the bigram reference
from its token dir, which the rules need to call a run underfitting (see `lmforge.diagnose.rules`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.diagnose.rules import THRESHOLDS, Diagnosis, Thresholds, diagnose_records
from lmforge.errors import UserError


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, one-line UserError on a bad line (naming file and line)."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int) or "loss" not in record:
                raise ValueError("need an object with an integer 'step' and a 'loss'")
        except ValueError as e:
            raise UserError(f"{path}:{number}: not a metrics record ({e}); "
                            "was it written by `lmforge pretrain`?") from None
        records.append(record)
    return records


def _sample_split(tokens_dir: Path, split: str, limit: int) -> np.ndarray:
    from lmforge.tokenizer.shards import load_split

    shards = load_split(tokens_dir, split)
    per_shard = max(limit // len(shards), 1)
    return np.concatenate([np.asarray(s[:per_shard], dtype=np.int64) for s in shards])[:limit]


def bigram_reference(tokens_dir: str | Path, th: Thresholds = THRESHOLDS) -> dict[str, Any]:
    """Losses of count models of the train split, measured on the val split (nats/token).

    `bigram_val_loss`: interpolated absolute discounting (Ney, Essen & Kneser 1994), D = 0.75,
    backing off to an add-one unigram. `unigram_entropy`: entropy of the train token counts
    (the loss of the best context-free model). Up to 20M train and 2M val tokens are read (from
    the start of every shard), which keeps this a few seconds on any corpus.
    """
    from lmforge.tokenizer.shards import read_meta

    tokens_dir = Path(tokens_dir)
    vocab = int(read_meta(tokens_dir)["vocab_size"])
    train = _sample_split(tokens_dir, "train", th.baseline_train_tokens)
    val = _sample_split(tokens_dir, "val", th.baseline_val_tokens)
    vocab = max(vocab, int(train.max()) + 1, int(val.max()) + 1)
    unigram = np.bincount(train, minlength=vocab).astype(np.float64)
    p_unigram = (unigram + 1.0) / (unigram.sum() + vocab)
    seen = unigram[unigram > 0] / unigram.sum()
    pairs, pair_counts = np.unique(train[:-1] * vocab + train[1:], return_counts=True)
    context = np.bincount(train[:-1], minlength=vocab).astype(np.float64)
    followers = np.bincount(pairs // vocab, minlength=vocab).astype(np.float64)
    discount = 0.75
    a, b = val[:-1], val[1:]
    codes = a * vocab + b
    where = np.clip(np.searchsorted(pairs, codes), 0, len(pairs) - 1)
    count_ab = np.where(pairs[where] == codes, pair_counts[where], 0).astype(np.float64)
    count_a = context[a]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(count_a > 0,
                     np.maximum(count_ab - discount, 0.0) / count_a + discount * followers[a] / count_a * p_unigram[b],
                     p_unigram[b])
    return {
        "kind": "bigram",
        "tokens_dir": str(tokens_dir),
        "bigram_val_loss": round(float(-np.log(p).mean()), 4),
        "unigram_val_loss": round(float(-np.log(p_unigram[val]).mean()), 4),
        "unigram_entropy": round(float(-(seen * np.log(seen)).sum()), 4),
        "uniform_loss": round(math.log(vocab), 4),
        "train_tokens_read": int(len(train)),
        "val_tokens_read": int(len(val)),
    }


def _tokens_dir(config: dict[str, Any] | None, run_dir: Path) -> Path | None:
    tokens = ((config or {}).get("data") or {}).get("tokens")
    if not tokens:
        return None
    for candidate in (Path(tokens), run_dir / tokens):
        if (candidate / "meta.json").is_file():
            return candidate
    return None


def diagnose_run(run_dir: str | Path, *, target_loss: float | None = None) -> Diagnosis:
    """Diagnose the training run in `run_dir` (the --out dir of `lmforge pretrain`)."""
    import yaml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory; pass the --out dir of `lmforge pretrain`")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{metrics} not found: {run_dir} is not a training run (no step was logged there)")
    records = read_records(metrics)
    if not records:
        raise UserError(f"{metrics} is empty: the run has not logged a step yet")
    if target_loss is not None and not (math.isfinite(target_loss) and target_loss > 0):
        raise UserError(f"--target-loss must be a positive loss in nats per token, got {target_loss}")
    limitations = []
    config = None
    if (run_dir / "config.yaml").is_file():
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            limitations.append(f"{run_dir / 'config.yaml'} is unreadable ({type(e).__name__}); remedies are generic")
    summary = None
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        except ValueError:
            limitations.append(f"{run_dir / 'summary.json'} is unreadable")
    metrics_summary = (summary or {}).get("metrics", {})
    reference, train_tokens = None, None
    tokens_dir = _tokens_dir(config, run_dir)
    objective = (config or {}).get("objective") or "clm"
    if objective != "clm" and target_loss is None:
        limitations.append(f"objective {objective!r}: its loss is not a next-token loss, so the bigram reference does "
                           f"not apply; pass --target-loss to judge underfitting")
    if tokens_dir is not None:
        try:
            from lmforge.tokenizer.shards import read_meta

            train_tokens = read_meta(tokens_dir)["splits"]["train"]["tokens"]
            if target_loss is None and objective == "clm":
                reference = bigram_reference(tokens_dir)
        except (UserError, KeyError, ValueError) as e:
            limitations.append(f"the token dir {tokens_dir} could not be read ({e})")
    elif config is not None and target_loss is None and objective == "clm":
        limitations.append(f"the token dir named in config.yaml ({((config.get('data') or {}).get('tokens'))}) was "
                           f"not found, so there is no bigram reference; pass --target-loss")
    if target_loss is not None:
        reference = {"kind": "target", "loss": float(target_loss)}
    diagnosis = diagnose_records(records, config=config, finished=summary is not None,
                                 stop_reason=metrics_summary.get("stop_reason"), reference=reference,
                                 train_tokens=train_tokens, world_size=int(metrics_summary.get("world_size") or 1))
    diagnosis.evidence["run"]["dir"] = str(run_dir)
    diagnosis.limitations = limitations + diagnosis.limitations
    return diagnosis


class MetricsTail:
    """Reads a growing metrics.jsonl incrementally, so a check at every eval costs only the new lines.

    It starts over when the file is another one (another path, inode or first line: a new run in
    the same dir) or shorter than what was read (resume trims the lines after its checkpoint).
    """

    def __init__(self) -> None:
        self.signature: tuple | None = None
        self.offset = 0
        self.records: list[dict[str, Any]] = []

    def read(self, path: Path) -> list[dict[str, Any]]:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            signature = (str(path), stat.st_dev, stat.st_ino, f.readline())
            if signature != self.signature or stat.st_size < self.offset:
                self.signature, self.offset, self.records = signature, 0, []
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        self.records += [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]
        return self.records


_tail = MetricsTail()


def live_warning(records: list[dict[str, Any]] | str | Path) -> str | None:
    """One warning line when the run so far overfits or does not converge, else None.

    Called by the training loop at every eval with its metrics.jsonl. Only these two verdicts
    warn: they call for action now (stop early, lower the learning rate); "still improving" is
    the normal state mid-run and "underfitting" needs the finished curve.
    """
    try:
        if not isinstance(records, list):
            if not Path(records).is_file():
                return None
            records = _tail.read(Path(records))
        if not records:
            return None
        d = diagnose_records(records)
    except Exception as e:  # advice must never stop a training run
        return f"diagnose: live check skipped ({type(e).__name__}: {e})"
    if d.verdict not in ("overfitting", "not_converging"):
        return None
    step = records[-1]["step"]
    hint = (f"the best checkpoint so far is checkpoints/best (step {d.evidence['best_checkpoint_step']}); "
            f"train.patience=N stops a run after N evals without improvement" if d.verdict == "overfitting"
            else "lower train.lr, warm up longer (train.warmup_steps) or clip gradients (train.grad_clip=1.0)")
    return f"diagnose (step {step}): {d.verdict.replace('_', ' ')}: {d.reason}; {hint}"
