"""Safety and privacy: a word-list blocklist filter and PII scrubbing with typed placeholders.

Blocklists are files `<lang>.txt` (one word or phrase per line, `#` comments); a document
is removed when blocked words make up more than `safety.max_blocked_ratio` of its words
(CJK: of its characters). PII is replaced, not removed: e-mail addresses -> `<EMAIL>`,
payment-card numbers that pass the Luhn check -> `<CARD>`, national-ID-like numbers (US
SSN, Chinese resident ID with a valid check digit) -> `<ID>`, IPv6/IPv4 -> `<IP>`,
phone numbers -> `<PHONE>`. Digit runs that fail the checks are left alone, so a random
16-digit number is not mistaken for a card.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

_DEFAULT_DIR = Path(__file__).parent / "resources" / "blocklist"
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")

# Look-arounds use ASCII classes, not \w or \b: in Chinese text a Han character (a \w) touches the PII
# ("请联系foo@bar.com。"), and a period after it ends the sentence ("the server is 192.168.10.44.").
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}"
                    r"(?![A-Za-z0-9-])")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_CN_ID = re.compile(r"(?<!\d)[1-9]\d{5}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![\dXx])")
_IPV6 = re.compile(r"(?<![A-Za-z0-9_:])(?:[0-9A-Fa-f]{1,4}:){2,7}:?(?:[0-9A-Fa-f]{1,4}|:)?(?::[0-9A-Fa-f]{1,4}){0,6}"
                   r"(?![A-Za-z0-9_:])|(?<![A-Za-z0-9_:])::1(?![A-Za-z0-9_:])")
# a period after the last number ends the sentence unless a digit follows it (1.2.3.4.5 is no address)
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                   r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\d|\.\d)")
_PHONE = re.compile(
    r"(?<![A-Za-z0-9_+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,5}"
    r"(?![A-Za-z0-9_-])(?![ .-]\d)"
    r"|(?<!\d)1[3-9]\d{9}(?!\d)"  # mainland China mobile numbers
)
# Cheap pre-checks: the full patterns (with look-arounds) only run on texts that could match.
_MANY_DIGITS = re.compile(r"\d(?:[ ().+-]{0,2}\d){6}")
_DOTTED_DIGITS = re.compile(r"\d\.\d")
_HEX_COLON = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f:]|::")


def luhn_valid(number: str) -> bool:
    """The Luhn checksum of the digits in `number` (separators ignored)."""
    digits = [int(c) for c in number if c.isdigit()]
    if len(digits) < 13 or len(digits) > 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def cn_id_valid(number: str) -> bool:
    """ISO 7064 MOD 11-2 check digit of an 18-character Chinese resident identity number."""
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    total = sum(int(c) * w for c, w in zip(number[:17], weights))
    return "10X98765432"[total % 11] == number[17].upper()


def _ip_valid(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def scrub_pii(text: str, counts: Counter | None = None) -> str:
    """`text` with PII replaced by typed placeholders; `counts[type]` += replacements."""
    counts = counts if counts is not None else Counter()

    def sub(pattern: re.Pattern, label: str, check=None) -> None:
        nonlocal text

        def replace(m: re.Match) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            counts[label] += 1
            return f"<{label}>"

        text = pattern.sub(replace, text)

    if "@" in text:
        sub(_EMAIL, "EMAIL")
    if _HEX_COLON.search(text):
        sub(_IPV6, "IP", _ip_valid)
    if _MANY_DIGITS.search(text):
        sub(_CARD, "CARD", luhn_valid)
        sub(_CN_ID, "ID", cn_id_valid)
        sub(_SSN, "ID")
        sub(_PHONE, "PHONE")
    if _DOTTED_DIGITS.search(text):
        sub(_IPV4, "IP", _ip_valid)
    return text


@lru_cache(maxsize=8)
def load_blocklists(directory: str = "") -> dict[str, frozenset[str]]:
    """{language: terms} from `directory/*.txt` (the packaged defaults when empty)."""
    root = Path(directory) if directory else _DEFAULT_DIR
    lists = {}
    for file in sorted(root.glob("*.txt")):
        terms = (line.strip().lower() for line in file.read_text(encoding="utf-8").splitlines())
        lists[file.stem] = frozenset(t for t in terms if t and not t.startswith("#"))
    return lists


def blocked_ratio(text: str, n_words: int, cjk: bool, lists: dict[str, frozenset[str]]) -> float:
    """Share of `text`'s words (CJK: characters) that belong to a blocklisted term, any language."""
    if n_words == 0 or not lists:
        return 0.0
    lowered = text.lower()
    present = [t for terms in lists.values() for t in terms if t in lowered]  # substring pre-check (fast)
    if not present:
        return 0.0
    hits = 0
    words = [t for t in present if " " not in t and t.isascii()]
    for term in present:
        if term not in words:  # phrases and CJK terms: substring counts
            count = lowered.count(term)
            hits += count * (len(term) if not term.isascii() else len(term.split()))
    if words:
        wanted = set(words)
        hits += sum(1 for w in _WORD.findall(lowered) if w in wanted)
    return hits / n_words
