"""Gopher quality/repetition filters: hand-checked boundaries, CJK awareness, clean Shakespeare kept."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from lmforge.data.config import NormalizeConfig, QualityConfig, RepetitionConfig
from lmforge.data.filters import (
    is_cjk,
    quality_reason,
    repetition_reason,
    split_words,
    zh_word_pair_ratio,
)
from lmforge.data.normalize import (
    cut_gutenberg,
    find_boilerplate,
    normalize_text,
    strip_html,
    strip_lines,
)

Q, R = QualityConfig(), RepetitionConfig()


def _words(n: int, seed: int = 0) -> list[str]:
    """n distinct 5-letter lower-case words (no digits, no stop words)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen = {"the", "be", "to", "of", "and", "that", "have", "with"}
    while len(out) < n:
        w = "".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(2)) + "s"
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _quality(text: str, lang: str = "en") -> str | None:
    return quality_reason(text, split_words(text), lang, Q)


def _lines(words: list[str], per_line: int = 6) -> str:
    return "\n".join(" ".join(words[i : i + per_line]) for i in range(0, len(words), per_line))


def test_word_count_bounds_are_exact():
    base = ["the", "and"] + _words(47)
    assert _quality(" ".join(base)) == "quality_too_few_words"  # 49 words
    assert _quality(" ".join(base + ["extra"])) is None  # 50 words


def test_mean_word_length_symbols_and_alpha_share():
    assert _quality(" ".join(["the", "and"] + ["ab"] * 98)) == "quality_mean_word_length"  # mean 2.0 < 3
    words = ["the", "and"] + _words(98)
    assert _quality(" ".join(words[:89] + ["#"] * 11)) == "quality_symbol_ratio"  # 11 / 100 > 0.1
    assert _quality(" ".join(words[:90] + ["#tag"] * 10)) is None  # 10 / 100 = 0.1 is allowed
    assert _quality(" ".join(words[:79] + ["1234"] * 21)) == "quality_alpha_words"  # 79% have a letter
    assert _quality(" ".join(words[:80] + ["1234"] * 20)) is None  # 80%
    # punctuation attached to words does not make them non-words (datatrove's 51% loss on plays)
    assert _quality(" ".join(w + "," for w in words)) is None


def test_line_shape_rules_and_stop_words():
    words = ["the", "and"] + _words(118)
    lines = _lines(words, 12).split("\n")  # 10 lines
    ellipsis = "\n".join(line + " ..." if i < 4 else line for i, line in enumerate(lines))
    assert _quality(ellipsis) == "quality_ellipsis_lines"  # 4/10 > 0.3 (the "..." also counts as a symbol: 4/124)
    ellipsis3 = "\n".join(line + "…" if i < 3 else line for i, line in enumerate(lines))
    assert _quality(ellipsis3) is None
    bullets = "\n".join("- " + line for line in lines)
    assert _quality(bullets) == "quality_bullet_lines"  # 10/10 > 0.9
    no_stop = " ".join(_words(120))
    assert _quality(no_stop) == "quality_stop_words"
    assert _quality(no_stop, lang="fr") is None  # the English list is not applied to French


def test_repetition_rules_on_hand_built_texts():
    unique = _lines(["the", "and"] + _words(238), 6).split("\n")  # 40 distinct 6-word lines
    assert repetition_reason("\n".join(unique), split_words("\n".join(unique)), R) is None
    # 10 lines, 4 of them repeats of line 0 -> 40% duplicate lines > 30%
    text = "\n".join(unique[:6] + [unique[0]] * 4)
    assert repetition_reason(text, split_words(text), R) == "repetition_dup_lines"
    # short lines (speaker names) may repeat freely: the deviation from Gopher for plays
    play = "\n".join(f"HAMLET.\n{line}" for line in unique)
    assert repetition_reason(play, split_words(play), R) is None
    # the same 2-gram everywhere: its characters are > 20% of all word characters
    words = _words(60)
    two = " ".join(w for pair in zip(words, ["kings queens"] * 60) for w in pair)
    assert repetition_reason(two, split_words(two), R) == "repetition_top_2gram"
    # a 12-word passage repeated inside otherwise distinct text -> duplicated 5..10-grams
    passage = " ".join(_words(12, seed=1))
    body = _words(100, seed=2)
    dup = " ".join(body[:50]) + " " + passage + " " + " ".join(body[50:]) + " " + passage
    reason = repetition_reason(dup, split_words(dup), R)
    assert reason is not None and reason.startswith("repetition_dup_")


CHINESE_PROSE = (
    "我们的祖国是一个历史悠久的国家。在漫长的岁月里，人民创造了灿烂的文化，也留下了许多动人的故事。"
    "春天来了，田野里的麦苗一片青绿，农民们在地里忙着耕种。孩子们在河边放风筝，笑声传得很远。"
    "城市里的街道越来越宽，高楼一座接着一座，可是老人们还是喜欢在清晨到公园里散步、打太极拳。"
    "他说，读书不仅是为了考试，更是为了明白做人的道理。这句话我一直记在心里。"
)
CHINESE_POETRY = (
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n"
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n"
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n"
    "红豆生南国，春来发几枝。愿君多采撷，此物最相思。\n"
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。\n"
    "独在异乡为异客，每逢佳节倍思亲。遥知兄弟登高处，遍插茱萸少一人。\n"
)


def _both(text: str) -> str | None:
    words = split_words(text)
    return quality_reason(text, words, "zh", Q) or repetition_reason(text, words, R)


def test_chinese_prose_and_poetry_pass_but_shuffled_or_repeated_do_not():
    assert is_cjk(CHINESE_PROSE) and is_cjk(CHINESE_POETRY) and not is_cjk("plain English text")
    assert _both(CHINESE_PROSE) is None
    assert _both(CHINESE_POETRY) is None
    # measured in characters, not space-split words: the prose is 1 "word" to a whitespace split
    assert len(CHINESE_PROSE.split()) == 1 and len(split_words(CHINESE_PROSE).tokens) > 150
    for text in (CHINESE_PROSE, CHINESE_POETRY):
        for seed in range(10):
            chars = list(text)
            random.Random(seed).shuffle(chars)
            assert _both("".join(chars)) == "quality_zh_word_pairs", seed
    repeated = "\n".join([CHINESE_POETRY.split("\n")[0]] * 12)
    assert _both(repeated) == "repetition_dup_lines"
    looped = CHINESE_PROSE[:60] * 5
    assert _both(looped).startswith("repetition_")
    assert zh_word_pair_ratio(CHINESE_PROSE) > 0.25 and zh_word_pair_ratio(CHINESE_POETRY) > 0.1


def test_japanese_is_measured_in_characters_too():
    text = ("日本語の文章は単語の間に空白を置かないので、文字を単位として数える必要がある。"
            "今日は天気が良いので、友達と一緒に公園へ散歩に行きました。桜の花がとても綺麗でした。"
            "夜には家族で夕食を食べて、テレビを見ながら話をしました。")
    words = split_words(text)
    assert words.cjk and quality_reason(text, words, "ja", Q) is None


def test_normalization_html_gutenberg_and_boilerplate():
    cfg = NormalizeConfig()
    html_doc = "<html><body><p>Hello &amp; welcome</p><script>x=1</script><div>Second</div></body></html>"
    text, changes = normalize_text(html_doc, cfg)
    assert "html_stripped" in changes and "Hello & welcome" in text and "x=1" not in text and "<" not in text
    assert "Second" in strip_html("<p>a</p><div>Second</div>")
    gut = ("header\n*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nbody text\n"
           "*** END OF THE PROJECT GUTENBERG EBOOK ***\nlicence")
    assert cut_gutenberg(gut).strip() == "body text"
    text, changes = normalize_text("a\u00a0b\u200bc\x07d\r\ne\uff21", NormalizeConfig(unicode_form="NFKC"))
    assert text == "a bcd\neA" and "control_or_space_cleaned" in changes
    docs = [f"Copyright 2024 Example Corp. All rights reserved.\nstory number {i} is here" for i in range(6)]
    lines = find_boilerplate(docs, cfg)
    assert lines == {"Copyright 2024 Example Corp. All rights reserved."}
    assert strip_lines(docs[0], lines) == ("story number 0 is here", 1)


def _chunks(text: str, lo: int = 2000) -> list[str]:
    out, cur, size = [], [], 0
    for block in re.split(r"\n\s*\n", text):
        cur.append(block)
        size += len(block)
        if size >= lo:
            out.append("\n\n".join(cur))
            cur, size = [], 0
    if cur and out:
        out[-1] += "\n\n" + "\n\n".join(cur)
    return out


def test_clean_shakespeare_is_kept(shakespeare_dir: Path):
    """At most 2% of clean play documents (2-16 KB blank-line chunks, both editions) removed."""
    removed = total = 0
    for file in sorted(shakespeare_dir.glob("*.txt")):
        text, _ = normalize_text(file.read_text(encoding="utf-8"), NormalizeConfig())
        for chunk in _chunks(text):
            total += 1
            removed += _both_en(chunk) is not None
    assert total > 3000
    assert removed / total <= 0.02, f"{removed}/{total} removed"


def _both_en(text: str) -> str | None:
    words = split_words(text)
    return quality_reason(text, words, "en", Q) or repetition_reason(text, words, R)


@pytest.mark.parametrize("form", ["NFC", "NFKC"])
def test_unicode_forms(form):
    text, _ = normalize_text("e\u0301 \ufb01", NormalizeConfig(unicode_form=form))
    assert text.startswith("\u00e9")
    assert (text.endswith("fi")) == (form == "NFKC")


def test_terminal_escape_sequences_are_removed_whole():
    text = ("\x1b[33;1m警告\x1b[m：磁盘已满 \x1b[1;31mdisk full\x1b[0m\n"
            "\x1b]0;window title\x07标题 \x1b(B字符集 \x1bM上移 \x9b32m八位")
    out, changes = normalize_text(text, NormalizeConfig())
    assert out == "警告：磁盘已满 disk full\n标题 字符集 上移 八位"
    assert changes == ["ansi_escapes_removed"]
    plain = "数组 a[1] 与 [33m 字样保留"  # brackets without ESC are text
    assert normalize_text(plain, NormalizeConfig()) == (plain, [])
