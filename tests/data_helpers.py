"""Generated corpora for the data-preparation tests: English prose, planted duplicates, bad input."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

_WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "government company number group problem fact river mountain garden letter story morning evening "
    "window city country music history family friend teacher doctor market village winter summer forest "
    "ask tell work seem feel try leave call keep begin help show hear play run move live believe bring "
    "happen write provide sit stand lose pay meet include continue learn change lead understand watch "
    "follow stop create speak read spend grow open walk offer remember consider appear buy wait serve "
    "good new first last long great little own other old right big high different small large next early "
    "young important few public bad same able green quiet bright heavy gentle simple strange warm"
).split()
_GLUE = "the of and to in that with for on as at by from have be it was is a".split()


def prose(seed: int, n_words: int = 120) -> str:
    """Distinct English-looking text: sentences of common words with function words between them."""
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < n_words:
        length = rng.randint(8, 16)
        words = [rng.choice(_WORDS) if i % 2 == 0 else rng.choice(_GLUE) for i in range(length)]
        sentences.append(" ".join(words).capitalize() + ".")
        count += length
    lines, line = [], []
    for s in sentences:
        line.append(s)
        if len(line) == 2:
            lines.append(" ".join(line))
            line = []
    if line:
        lines.append(" ".join(line))
    return "\n".join(lines)


def edit_words(text: str, share: float, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(share * len(words)))):
        words[i] = rng.choice(_WORDS)
    return " ".join(words)


def write_jsonl(path: Path, records: list, raw_lines: list[str] | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + (raw_lines or [])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def messy_corpus(root: Path) -> dict[str, int]:
    """A directory with every kind of input and of bad input; returns the expected counts."""
    root.mkdir(parents=True, exist_ok=True)
    base = [prose(i) for i in range(12)]
    records = [{"text": t, "url": f"https://example.org/{i}"} for i, t in enumerate(base)]
    records.append({"text": base[0]})  # exact duplicate
    records.append({"text": edit_words(base[1], 0.03, 1)})  # near duplicate
    records.append({"text": "Too short to keep."})  # quality_too_few_words
    records.append({"text": prose(99) + "\nWrite to jane.doe@example.com or call +1 415-555-0132."})  # PII
    records.append({"text": prose(98) + " fuck shit fuck shit fuck"})  # blocklist
    records.append({"title": "no text"})  # missing_field
    records.append({"text": 42})  # missing_field (not a string)
    write_jsonl(root / "a.jsonl", records, raw_lines=["{not json", ""])  # invalid_json, blank line skipped
    gz = "\n".join(json.dumps({"text": prose(200 + i)}) for i in range(3)).encode()
    (root / "b.jsonl.gz").write_bytes(gzip.compress(gz))
    zst = "\n".join(json.dumps({"text": prose(210 + i)}) for i in range(3)).encode()
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zst))
    whole = "\n".join(json.dumps({"text": prose(300 + i)}) for i in range(40)).encode()
    (root / "d_truncated.jsonl.gz").write_bytes(gzip.compress(whole)[:-200])
    (root / "e.csv").write_text('text,lang_hint\n"' + prose(400).replace('"', "'") + '",en\n', encoding="utf-8")
    pq.write_table(pa.table({"text": [prose(500), prose(501)], "n": [1, 2]}), root / "f.parquet")
    pq.write_table(pa.table({"body": ["x"]}), root / "g_other_schema.parquet")
    (root / "h.txt").write_text(prose(600), encoding="utf-8")
    (root / "i_binary.txt").write_bytes(b"\x89PNG\0\0\0binary")
    (root / "j_empty.txt").write_bytes(b"")
    (root / "k_bad_utf8.txt").write_bytes(prose(700).encode() + b" caf\xe9 ok")
    (root / "l_long.jsonl").write_text(json.dumps({"text": "y " * 60_000}) + "\n"
                                       + json.dumps({"text": prose(800)}) + "\n")
    os.symlink(root / "missing-target.txt", root / "m_dangling.txt")
    return {"truncated_gz_lines": 40}
