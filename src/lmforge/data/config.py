"""The typed config tree of `lmforge data prepare`: one dataclass per pipeline step.

    cfg = load_data_config("configs/data/default.yaml", ["quality.min_words=20"])

Validation reuses the training config's machinery (`lmforge.config.build`): an unknown key
names the closest valid one, a wrongly typed value names the key. Defaults follow Rae et al.
2021 (Gopher) except where a comment says why not; `to_dict(cfg)` goes into summary.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.configtree import load_tree
from lmforge.errors import UserError


@dataclass
class ReadConfig:
    text_field: str = "text"  # jsonl/parquet/csv column holding the text; other fields -> metadata
    split_on_blank_lines: bool = False  # .txt/.md: one document per blank-line-separated block
    merge_blocks_chars: int = 0  # with split_on_blank_lines: join consecutive blocks up to at least this many chars
    max_document_bytes: int = 16_000_000  # longer lines/files are counted unreadable, not read whole
    shard_bytes: int = 4_000_000  # uncompressed jsonl/txt inputs are cut into shards of about this size


@dataclass
class NormalizeConfig:
    invalid_utf8: str = "replace"  # replace (U+FFFD, counted) | drop (document removed)
    unicode_form: str = "NFC"  # NFC | NFKC | none
    strip_html: bool = True  # only documents that look like HTML
    remove_patterns: list = field(default_factory=list)  # regexes deleted from every document
    gutenberg_markers: bool = True  # cut Project Gutenberg headers/footers at their *** START/END *** lines
    boilerplate_min_docs: int = 5  # a line in at least this many documents of one source ...
    boilerplate_min_fraction: float = 0.5  # ... and in this share of them is boilerplate
    boilerplate_min_chars: int = 30  # shorter lines (speaker names, "ACT I.") are never boilerplate


@dataclass
class QualityConfig:
    enabled: bool = True
    min_chars: int = 0  # not in Gopher; word bounds below do the work
    max_chars: int = 10_000_000
    min_words: int = 50  # Gopher: 50..100,000 words (CJK: characters count as words)
    max_words: int = 100_000
    min_mean_word_length: float = 3.0  # Gopher: 3..10 (not applied to CJK text)
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' and '...' per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8  # words with at least one letter
    min_stop_words: int = 2  # of the, be, to, of, and, that, have, with (CJK: own list)
    # not Gopher: share of adjacent Han pairs that are common words (shuffled text ~0.03)
    min_zh_word_pairs: float = 0.08
    min_zh_pair_z: float = 2.5  # ... or that many std devs more such pairs than the text shuffled (classical prose)
    min_zh_verse_clauses: float = 0.9  # ... or this share of its Han characters in clauses of 3-8 (verse)


@dataclass
class RepetitionConfig:
    enabled: bool = True
    max_dup_line_fraction: float = 0.3
    max_dup_line_char_fraction: float = 0.2
    max_dup_para_fraction: float = 0.3
    max_dup_para_char_fraction: float = 0.2
    cjk_chars_per_word: int = 2  # deviation: in CJK text an n-gram of n words spans n * this many characters
    # deviation: CJK verse (this share of Han chars in 3-8-char clauses) skips top n-grams
    cjk_verse_refrains: float = 0.9
    # deviation: shorter lines (speaker prefixes, stage cues) are not counted as duplicate lines
    min_line_words: int = 4
    top_ngram_max_fraction: list = field(default_factory=lambda: [0.20, 0.18, 0.16])  # n = 2, 3, 4
    dup_ngram_max_fraction: list = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])  # n = 5..10


@dataclass
class LangIdConfig:
    enabled: bool = True
    allowed: list = field(default_factory=list)  # ISO 639-1 codes; empty: keep every language
    min_confidence: float = 0.0  # below it the document is removed as `lang_low_confidence`
    sample_chars: int = 600  # classify the first N characters (py3langid walks bytes in Python: cost is linear)


@dataclass
class SafetyConfig:
    blocklist: bool = True
    blocklist_dir: str = ""  # files <lang>.txt, one word/phrase per line; empty: the packaged small lists
    max_blocked_ratio: float = 0.01  # share of words that are blocklisted
    pii: bool = True  # replace e-mails, phones, IPs, Luhn-valid cards, national ids with <TYPE>


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    shingle_words: int = 3  # CJK: characters
    num_perm: int = 128
    bands: int = 16
    rows: int = 8
    verify_threshold: float = 0.7  # candidate pairs must also agree on this share of all signature rows
    keep: str = "longest"  # longest | first
    paragraphs: bool = False  # also drop paragraphs (>= 80 chars) already seen in an earlier document
    seed: int = 1


@dataclass
class SplitConfig:
    train: float = 0.90
    val: float = 0.05
    test: float = 0.05
    seed: str = "lmforge"
    # documents whose spelling-normalized word shingles overlap share one split (lmforge.data.group):
    # no passage in val/test with its other edition (or a reworded copy) in train
    group: bool = True
    group_shingle_words: int = 4  # word skeletons (make-tasks checks 5-grams; 4 finds twins more surely)
    group_num_perm: int = 128  # = group_bands * group_rows
    group_bands: int = 64
    group_rows: int = 2
    group_threshold: float = 0.1  # estimated Jaccard similarity of the shingle sets (twins: 0.1-0.7)


@dataclass
class DataPrepConfig:
    read: ReadConfig = field(default_factory=ReadConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    split: SplitConfig = field(default_factory=SplitConfig)


_CHOICES = {
    "normalize.invalid_utf8": ("replace", "drop"),
    "normalize.unicode_form": ("NFC", "NFKC", "none"),
    "dedup.keep": ("longest", "first"),
}


def to_dict(cfg: DataPrepConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_data_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DataPrepConfig:
    """Load a data recipe (defaults when `path` is None) and apply `--set key=value` overrides."""
    cfg, where = load_tree(DataPrepConfig, path, overrides, _CHOICES, "configs/data/default.yaml")
    _validate(cfg, where)
    return cfg


def _validate(cfg: DataPrepConfig, where: str) -> None:
    s = cfg.split
    if min(s.train, s.val, s.test) < 0 or abs(s.train + s.val + s.test - 1.0) > 1e-6:
        raise UserError(f"{where}config key split: train+val+test must be 1 with none negative, "
                        f"got {s.train}/{s.val}/{s.test}")
    if s.group and s.group_bands * s.group_rows != s.group_num_perm:
        raise UserError(f"{where}config key split.group_num_perm: must equal group_bands*group_rows = "
                        f"{s.group_bands * s.group_rows}, got {s.group_num_perm}")
    if s.group and (s.group_shingle_words < 1 or not 0.0 < s.group_threshold <= 1.0):
        raise UserError(f"{where}config key split.group_shingle_words/group_threshold: need >= 1 and (0, 1], "
                        f"got {s.group_shingle_words}/{s.group_threshold}")
    d = cfg.dedup
    if d.bands * d.rows != d.num_perm:
        raise UserError(f"{where}config key dedup.num_perm: must equal bands*rows = {d.bands * d.rows}, "
                        f"got {d.num_perm}")
    if d.shingle_words < 1:
        raise UserError(f"{where}config key dedup.shingle_words: must be >= 1, got {d.shingle_words}")
    for key in ("remove_patterns",):
        if not isinstance(getattr(cfg.normalize, key), list):
            raise UserError(f"{where}config key normalize.{key}: expected a list of regexes")
    if not isinstance(cfg.langid.allowed, list):
        raise UserError(f"{where}config key langid.allowed: expected a list such as [en, zh]")
    r = cfg.repetition
    if len(r.top_ngram_max_fraction) != 3 or len(r.dup_ngram_max_fraction) != 6:
        raise UserError(f"{where}config key repetition: top_ngram_max_fraction needs 3 values (n=2..4), "
                        "dup_ngram_max_fraction 6 (n=5..10)")
    if cfg.read.shard_bytes < 1 or cfg.read.max_document_bytes < 1:
        raise UserError(f"{where}config key read.shard_bytes/max_document_bytes: must be > 0")
