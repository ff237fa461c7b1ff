"""PII scrubbing (typed placeholders, Luhn/check-digit validation) and the blocklist filter."""

from __future__ import annotations

from collections import Counter

import pytest

from lmforge.data.safety import blocked_ratio, cn_id_valid, load_blocklists, luhn_valid, scrub_pii


@pytest.mark.parametrize("number", ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005",
                                    "6011000990139424"])
def test_luhn_valid_cards_are_replaced(number):
    counts: Counter = Counter()
    assert luhn_valid(number)
    assert scrub_pii(f"pay with {number} today", counts) == "pay with <CARD> today"
    assert counts == {"CARD": 1}


@pytest.mark.parametrize("number", ["4111 1111 1111 1112", "1234567812345678", "378282246310006"])
def test_luhn_invalid_numbers_are_left_alone(number):
    counts: Counter = Counter()
    assert not luhn_valid(number)
    assert scrub_pii(f"order {number} shipped", counts) == f"order {number} shipped"
    assert counts["CARD"] == 0


def test_each_pii_type_gets_its_placeholder_and_count():
    text = ("mail bob.smith@example.co.uk, call +1 415-555-0132 or (020) 7946 0958 or 13812345678; "
            "hosts 192.168.0.1 and 2001:db8::ff00:42:8329; ssn 123-45-6789; id 11010519491231002X. "
            "At 12:30:45 on 2024-05-01 we read 3.14 and version 1.2.3, scene 4.")
    counts: Counter = Counter()
    out = scrub_pii(text, counts)
    assert "<EMAIL>" in out and "bob.smith" not in out
    assert out.count("<PHONE>") == 3 and out.count("<IP>") == 2 and out.count("<ID>") == 2
    assert counts == {"EMAIL": 1, "PHONE": 3, "IP": 2, "ID": 2}
    assert "12:30:45" in out and "2024-05-01" in out and "3.14" in out and "1.2.3" in out  # not PII
    assert cn_id_valid("11010519491231002X") and not cn_id_valid("110105194912310021")
    assert scrub_pii("id 110105194912310021 here") == "id 110105194912310021 here"
    assert scrub_pii("999.1.1.1 is no address") == "999.1.1.1 is no address"


def test_blocklist_ratio_counts_words_and_phrases(tmp_path):
    lists = load_blocklists("")
    assert "fuck" in lists["en"] and "傻逼" in lists["zh"]
    clean = "the quick brown fox jumps over the lazy dog " * 10
    assert blocked_ratio(clean, 90, False, lists) == 0.0
    dirty = clean + "fuck this shit"
    assert blocked_ratio(dirty, 93, False, lists) == pytest.approx(2 / 93)
    (tmp_path / "en.txt").write_text("# comment\nbad phrase\n")
    custom = load_blocklists(str(tmp_path))
    assert blocked_ratio("a bad phrase here", 4, False, custom) == pytest.approx(2 / 4)
    assert blocked_ratio("你这个傻逼", 5, True, lists) == pytest.approx(2 / 5)


# Every PII type at a sentence end, before punctuation and brackets, and inside CJK text (no
# spaces around it, full-width punctuation): the placeholder replaces exactly the PII.
_PII_IN_CONTEXT = {
    "EMAIL": "foo.bar@example.com",
    "IP": "192.168.10.44",
    "IPV6": "2001:db8::ff00:42:8329",
    "PHONE": "+1 415-555-0132",
    "CN_MOBILE": "13812345678",
    "CARD": "4111 1111 1111 1111",
    "SSN": "078-05-1120",
    "CN_ID": "11010519491231002X",
}
_LABELS = {"IPV6": "IP", "CN_MOBILE": "PHONE", "SSN": "ID", "CN_ID": "ID"}
_CONTEXTS = [
    "the value is {}.",  # sentence end
    "the value is {}!",
    "is it {}?",
    "values: {}, and more",
    "(see {})",
    "[{}]",
    "value {}; next",
    "“{}”",
    "请联系 {}。",  # CJK with spaces
    "请联系{}。",  # CJK without spaces
    "地址：{}，谢谢",
    "（{}）",
    "值为{}的",
]


@pytest.mark.parametrize("context", _CONTEXTS)
@pytest.mark.parametrize("kind", list(_PII_IN_CONTEXT))
def test_pii_is_found_at_sentence_ends_before_punctuation_and_in_cjk_text(kind, context):
    label = _LABELS.get(kind, kind)
    counts: Counter = Counter()
    assert scrub_pii(context.format(_PII_IN_CONTEXT[kind]), counts) == context.format(f"<{label}>")
    assert counts == {label: 1}
