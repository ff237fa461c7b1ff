"""Chinese text through `data prepare`, on Debian's fortunes-zh (Tang and Song poems, the Book of
Songs and other classical prose, Chinese technical prose with inline commands and box-drawn tables,
most of it with terminal colour codes): clean text is kept, shuffled or looped Chinese is not.

The corpus comes from the Debian package `fortunes-zh` (.ci/run installs it); without it these
tests fail rather than skip.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from data_helpers import write_jsonl

from lmforge.data.config import DataPrepConfig, load_data_config
from lmforge.data.filters import quality_reason, repetition_reason, split_words
from lmforge.data.langid import detect_language
from lmforge.data.normalize import normalize_text
from lmforge.data.prepare import prepare_data

FORTUNES = Path("/usr/share/games/fortunes")
FILES = ("chinese", "song100", "tang300")
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# what an escape sequence leaves when only ESC is removed (one entry spells ESC as a literal "^[")
_ANSI_TAIL = re.compile(r"(?<!\^\[)\[[0-9;]*m")


def fortunes_zh(min_han: int = 64) -> list[str]:
    """Every fortunes-zh entry (entries end at a line '%') with at least `min_han` Han characters."""
    missing = [name for name in FILES if not (FORTUNES / name).is_file()]
    if missing:
        pytest.fail(f"{FORTUNES}/{missing[0]} is missing: install Debian's fortunes-zh "
                    "(apt-get install -y fortunes-zh; .ci/run does)")
    entries = []
    for name in FILES:
        text = (FORTUNES / name).read_text(encoding="utf-8")
        entries += [e.strip("\n") for e in re.split(r"^%\n", text, flags=re.M) if len(_HAN.findall(e)) >= min_han]
    return entries


@pytest.fixture(scope="module")
def sample() -> list[str]:
    entries = fortunes_zh()
    assert len(entries) > 1000  # the package holds ~1400 such entries
    return random.Random(0).sample(entries, 400)


def _removed_reason(raw: str, cfg: DataPrepConfig) -> str | None:
    """The quality/repetition reason `data prepare` gives a document (None: kept)."""
    text, _ = normalize_text(raw, cfg.normalize)
    lang, _ = detect_language(text, cfg.langid.sample_chars)
    words = split_words(text)
    return quality_reason(text, words, lang, cfg.quality) or repetition_reason(text, words, cfg.repetition)


def test_clean_chinese_of_fortunes_zh_is_kept(sample, tmp_path):
    assert sum("\x1b[" in e for e in sample) > 100  # colour codes are part of the test
    write_jsonl(tmp_path / "zh.jsonl", [{"text": e} for e in sample])
    cfg = load_data_config(None, [])
    summary = prepare_data([str(tmp_path / "zh.jsonl")], tmp_path / "out", cfg, workers=1, progress=False)
    kept = summary["metrics"]["documents_kept"]
    assert summary["metrics"]["documents_in"] == 400
    assert kept >= 360, (kept, summary["removed"])  # was 169 (42%) before the rules fitted verse and mixed text
    texts = [t for split in ("train", "val", "test") for f in sorted((tmp_path / "out" / split).glob("*.parquet"))
             for t in pq.read_table(f).column("text").to_pylist()]
    assert len(texts) == kept
    assert not any("\x1b" in t or _ANSI_TAIL.search(t) for t in texts)  # escape sequences removed whole


def test_shuffled_or_looped_chinese_is_removed_while_its_original_is_kept(sample):
    cfg = DataPrepConfig()
    originals = sample[:150]
    kept = [raw for raw in originals if _removed_reason(raw, cfg) is None]
    assert len(kept) >= 0.9 * len(originals)
    shuffled_kept = 0
    for i, raw in enumerate(kept):
        text, _ = normalize_text(raw, cfg.normalize)
        chars = list(text)
        random.Random(i).shuffle(chars)
        shuffled_kept += _removed_reason("".join(chars), cfg) is None
        looped = text[:80] * 5
        assert _removed_reason(looped, cfg) is not None, looped
        line = next(s for s in text.split("\n") if len(_HAN.findall(s)) >= 8)
        assert _removed_reason("\n".join([line] * 12), cfg) is not None, line
    assert shuffled_kept <= 0.03 * len(kept), shuffled_kept  # character salad: ~1% pass
