"""Split groups (`split.group`): two spellings of one passage share a split; unrelated texts do not group."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from data_helpers import prose, write_jsonl

from lmforge.data import dedup, group, tasks
from lmforge.data import prepare as prepare_module
from lmforge.data.config import load_data_config
from lmforge.data.filters import split_words
from lmforge.data.prepare import prepare_data
from lmforge.data.split import assign_split
from lmforge.errors import UserError

FRACTIONS = (0.9, 0.05, 0.05)


def reference_normalized_words(text: str) -> list[str]:
    """make-tasks' original per-word implementation (ASCII letters), the reference for the fast one."""
    out = []
    for w in re.findall(r"[a-z]+", text.lower()):
        w = re.sub(r"(.)\1+", r"\1", w.replace("j", "i").replace("v", "u").replace("y", "i"))
        out.append(w[0] + re.sub(r"[aeiou]", "", w[1:]))
    return out


def old_spelling(text: str, seed: int, cut: float = 0.15) -> str:
    """`text` as another edition prints it: its first `cut` of the words missing (the passages of the two
    editions begin in different places), Folio spellings (vpon, haue, kinde, hilles, ioy), 4% of the words
    different, and other line breaks."""
    rng = random.Random(seed)
    words = text.split()
    out = []
    for w in words[int(cut * len(words)):]:
        if rng.random() < 0.04:
            w = rng.choice(["alas", "forsooth", "marry", "prithee"])
        core, tail = re.match(r"(.*?)([^a-zA-Z]*)$", w).groups()
        core = core.replace("v", "u").replace("j", "i").replace("l", "ll" if rng.random() < 0.3 else "l")
        if core[:1] == "u":
            core = "v" + core[1:]
        if core[-1:] in ("d", "n", "r", "t", "k") and rng.random() < 0.5:
            core += "e"
        out.append(core + tail)
    return "\n".join(" ".join(out[i : i + 9]) for i in range(0, len(out), 9))


def test_normalized_words_equal_make_tasks_reference_and_stay_importable_from_tasks():
    assert tasks.normalized_words is group.normalized_words
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzJVYAEIOU .,;:'-\n\t0123456789_"
    samples = ["Haue you had quiet Guard? Vpon my ivy-JOY battailes, eau 4x9 aa Ooze_b",
               "My Lord, I come to bring you heauy newes\nOf battailes lost vpon the northerne hilles,"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(500)]
    for text in samples:
        assert group.normalized_words(text) == reference_normalized_words(text), text
    assert group.normalized_words("haue") == group.normalized_words("have") == ["h"]
    # letters beyond a-z stay letters (the reference splits words at them): Latin rules, other scripts kept
    assert group.normalized_words("Personæ, café") == ["prsnæ", "cfé"]
    assert group.normalized_words("Война и мир") == ["Война".lower(), "и", "мир"]


def test_group_shingles_see_through_spelling_and_keep_letterless_texts_apart():
    modern = prose(7, 200)
    folio = old_spelling(modern, 7, cut=0.0)
    a, b = (set(group.group_shingles(t, split_words(t), 4).tolist()) for t in (modern, folio))
    assert len(a & b) / len(a | b) > 0.5  # lower-cased words alone would share few shingles
    plain = [set(dedup.shingles(t.lower().split(), 4).tolist()) for t in (modern, folio)]
    assert len(plain[0] & plain[1]) / len(plain[0] | plain[1]) < 0.3
    # documents without letters are not one group by their (empty) shingle sets
    x, y = (group.group_shingles(t, split_words(t), 4) for t in ("1234 5678", "9999 0000 --"))
    assert len(x) == len(y) == 1 and x[0] != y[0]
    # CJK text is shingled by characters
    zh = "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏"
    assert len(group.group_shingles(zh, split_words(zh), 4)) == len(zh) - 3


def test_candidate_pairs_in_passes_equal_all_bands_at_once():
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 5, size=(300, 128), dtype=np.uint32)  # small values: many shared bands
    chunks = [(start, sigs[start : start + 37]) for start in range(0, 300, 37)]
    passes = group.candidate_pairs_in_passes(lambda: iter(chunks), 300, 64, 2, bands_per_pass=5)
    assert np.array_equal(passes, dedup.candidate_pairs(sigs, 64, 2))
    assert len(passes) > 100


def test_roots_from_pairs_joins_earlier_clusters_and_smallest_key_follows():
    earlier = np.array([0, 0, 2, 3, 3])  # clusters {0, 1}, {2}, {3, 4}
    pairs = np.array([[1, 2]])
    sigs = np.zeros((5, 4), dtype=np.uint32)
    roots = dedup.roots_from_pairs(5, pairs, lambda rows: sigs[rows], 0.5, earlier)
    assert roots.tolist() == [0, 0, 0, 3, 3]
    keys = group.smallest_key_per_cluster(roots, np.array([50, 7, 90, 4, 3], dtype=np.uint64))
    assert keys.tolist() == [7, 7, 7, 3, 3]
    assert group.group_stats(keys) == {"grouped_documents": 5, "groups": 2, "largest_group": 3}
    assert group.group_stats(np.array([1, 2], dtype=np.uint64)) == {"grouped_documents": 0, "groups": 0,
                                                                     "largest_group": 0}


def test_fill_empty_split_moves_a_whole_group(monkeypatch):
    cfg = load_data_config(None, ["split.train=0.5", "split.val=0.5", "split.test=0"])
    split = np.zeros(6, dtype=np.int8)
    position = np.array([0.1, 0.2, 0.3, 0.4, 0.45, 0.45])
    keys = np.array([1, 2, 3, 4, 9, 9], dtype=np.uint64)
    prepare_module._fill_empty_splits(split, position, np.zeros(6, dtype=np.int8), keys, cfg)
    assert split.tolist() == [0, 0, 0, 0, 1, 1]


def test_config_checks_the_group_keys():
    with pytest.raises(UserError, match="split.group_num_perm"):
        load_data_config(None, ["split.group_num_perm=100"])
    with pytest.raises(UserError, match="split.group_shingle_words/group_threshold"):
        load_data_config(None, ["split.group_threshold=0"])
    assert load_data_config(None, ["split.group=false", "split.group_num_perm=100"]).split.group is False


# ---- end to end: `data prepare` on hand-built editions ----------------------------------------

N_TEXTS, TWINS = 40, 12


def editions() -> list[dict]:
    """40 unrelated passages; 12 of them also in another edition (cut, spelt and wrapped differently);
    one passage that quotes a line of another (not a twin: a shared line is not a strong overlap)."""
    modern = [prose(500 + i, 200) for i in range(N_TEXTS)]
    records = [{"text": t, "name": f"m{i}"} for i, t in enumerate(modern)]
    records += [{"text": old_spelling(modern[i], i), "name": f"f{i}"} for i in range(TWINS)]
    quoted = modern[TWINS].split("\n")[2]
    records.append({"text": prose(999, 200) + "\n" + quoted, "name": "quote"})
    return records


def _run(records: list[dict], root: Path, overrides=(), workers=1, files=1) -> tuple[dict, dict[str, str]]:
    root.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        write_jsonl(root / f"in{k}.jsonl", records[k::files])
    cfg = load_data_config(None, list(overrides))
    summary = prepare_data([str(root / f"in{k}.jsonl") for k in range(files)], root / "out", cfg,
                           workers=workers, progress=False)
    where, texts = {}, {}
    for split in ("train", "val", "test"):
        for file in sorted((root / "out" / split).glob("*.parquet")):
            for row in pq.read_table(file).to_pylist():
                name = json.loads(row["meta"])["name"]
                where[name], texts[name] = split, row["text"]
    assert len(where) == len(records)
    return summary, {"where": where, "texts": texts, "report": (root / "out" / "report.md").read_text()}


def _split_of_key(key: int) -> str:
    return ("train", "val", "test")[assign_split(key, FRACTIONS)[0]]


@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> tuple[dict, dict]:
    return _run(editions(), tmp_path_factory.mktemp("grouped"))


def test_two_editions_share_a_split_and_unrelated_texts_do_not_group(grouped):
    summary, out = grouped
    where, texts = out["where"], out["texts"]
    assert all(where[f"m{i}"] == where[f"f{i}"] for i in range(TWINS))
    # exactly the twins are grouped: no unrelated passage (nor the one quoting a line) joined a group
    assert summary["metrics"]["split_groups"] == {"grouped_documents": 2 * TWINS, "groups": TWINS,
                                                  "largest_group": 2}
    # the split key of a group is its smallest exact hash; every other document keeps its own
    for name in texts:
        members = [name, "f" + name[1:] if name[0] == "m" else "m" + name[1:]]
        if name == "quote" or int(name[1:]) >= TWINS:
            members = [name]
        assert where[name] == _split_of_key(min(dedup.exact_hash(texts[m]) for m in members)), name
    assert "Split groups: 24 kept documents in 12 groups (largest 2)" in out["report"]


def test_without_grouping_twins_straddle_splits(tmp_path):
    summary, out = _run(editions(), tmp_path / "off", ["split.group=false"])
    where, texts = out["where"], out["texts"]
    assert all(where[name] == _split_of_key(dedup.exact_hash(t)) for name, t in texts.items())
    assert any(where[f"m{i}"] != where[f"f{i}"] for i in range(TWINS))  # what grouping prevents
    assert summary["metrics"]["split_groups"]["grouped_documents"] == 0
    assert "Split groups: off" in out["report"]


def test_groups_do_not_depend_on_file_order_shards_or_workers(grouped, tmp_path):
    summary, out = grouped
    records = editions()
    random.Random(3).shuffle(records)
    other, shuffled = _run(records, tmp_path / "shuffled", ["read.shard_bytes=3000"], workers=2, files=3)
    assert other["metrics"]["shards"] >= 6
    assert shuffled["where"] == out["where"]
    assert other["metrics"]["split_groups"] == summary["metrics"]["split_groups"]
