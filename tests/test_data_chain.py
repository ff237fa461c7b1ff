"""data prepare's filter chain as a list of steps (lmforge.data.chain): order, switches, accounting."""

from __future__ import annotations

from data_helpers import prose

from lmforge.data import tally
from lmforge.data.chain import Doc, filter_steps, make_chain, normalize_batch, run_steps
from lmforge.data.config import load_data_config
from lmforge.data.readers import Record


def _names(overrides: list[str]) -> list[str]:
    return [step.run.__name__.lstrip("_") for step in filter_steps(load_data_config(None, overrides))]


def test_steps_follow_the_pipeline_order_and_switches():
    assert _names([]) == ["not_empty", "langid", "quality", "repetition", "blocklist", "scrub_pii"]
    off = ["langid.enabled=false", "quality.enabled=false", "repetition.enabled=false", "safety.pii=false"]
    assert _names(off) == ["not_empty", "blocklist"]


def test_each_document_is_counted_into_the_steps_it_reaches_and_removed_once():
    cfg = load_data_config(None, [])
    t = tally.new_tally()
    chain, steps = make_chain(cfg, t), filter_steps(cfg)
    good = prose(1) + "\nWrite to jane.doe@example.com today."
    records = [Record(good, "a:1", "a"), Record("Too short to keep.", "a:2", "a"), Record(" \x00 ", "a:3", "a")]
    docs = normalize_batch(records, cfg, t)
    kept = [doc for doc in docs if run_steps(doc, steps, chain)]
    assert [d.rec.id for d in kept] == ["a:1"] and "<EMAIL>" in kept[0].text and kept[0].lang == "en"
    assert t["pii"] == {"EMAIL": 1} and t["documents_in"] == 3
    steps_in = {name: s["docs_in"] for name, s in t["steps"].items() if s["docs_in"]}
    assert steps_in == {"read": 3, "normalize": 3, "langid": 2, "quality": 2, "repetition": 1, "safety": 1}
    assert t["steps"]["normalize"]["removed"] == {"empty": [1, 0]}  # bytes after cleaning: none left
    assert list(t["steps"]["quality"]["removed"]) == ["quality_too_few_words"]
    assert t["examples"]["empty"] == [tally.snippet(" \x00 ")]  # the original, as nothing is left


def test_words_are_those_of_the_text_before_scrubbing():
    cfg = load_data_config(None, [])
    chain, steps = make_chain(cfg, tally.new_tally()), filter_steps(cfg)
    doc = Doc(Record("x", "a", "a"), prose(2) + " mail jane.doe@example.com now")
    assert run_steps(doc, steps, chain)
    assert "jane.doe@example.com" in doc.words.tokens and "<EMAIL>" in doc.text
