"""`lmforge data make-sft shakespeare`: chat SFT data and preference pairs from the train split, held-out
versions from the test split (minus text the train split holds in another spelling)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.cli import main
from lmforge.data import sft as S
from lmforge.errors import UserError

WORDS = ("sun moon star night day love death crown heart blood tears gold river field flower rose winter summer "
         "wind rain fire stone bread wine ship sea castle tower gate door ring hand eye face voice song grief joy "
         "fear hope honour shame truth faith oath prayer heaven earth").split()
HEADER = "{title}\n\nby William Shakespeare\n\n\n\nDramatis Personae\n\n{cast}\n\nSCENE: Somewhere.\n\n\n\nACT I.\n\n"
# a held-out speech whose First Folio twin sits in the training split: never a held-out item
TWIN_MODERN = "BRUNO.\nMy lord, I come to bring you heavy news\nOf battles lost upon the northern hills,"
TWIN_FOLIO = "  Bru. My Lord, I come to bring you heauy newes\nOf battailes lost vpon the northerne hilles,\n"


def make_play(title: str, speakers: list[str], seed: int, extra_test: tuple[str, ...] = ()) -> tuple[str, str, str]:
    """(whole text, the training part, the held-out part): scene 1 trains, scene 2 is held out."""
    rng = random.Random(seed)

    def speech(k: int) -> str:
        lines = [" ".join(rng.choice(WORDS) for _ in range(6)).capitalize() + "," for _ in range(2 + k % 2)]
        return f"{speakers[(k * 7) % len(speakers)]}.\n" + "\n".join(lines)

    scenes = [[speech(k) for k in range(n)] for n in (24, 12)]
    scenes[1] = scenes[1][:4] + list(extra_test) + scenes[1][4:]
    head = HEADER.format(title=title, cast="\n".join(f"{s.title()}, a person" for s in speakers))
    train = head + "SCENE I. A room.\n\n" + "\n\n".join(scenes[0])
    test = "SCENE II. A hall.\n\n[Enter all.]\n\n" + "\n\n".join(scenes[1])
    return train + "\n\n" + test + "\n", train, test


ALPHA = make_play("THE TRAGEDY OF ALPHA", ["ALBANO", "BRUNO", "CELIA", "DORIAN", "ESTELLA"], 1, (TWIN_MODERN,))
BETA = make_play("THE COMEDY OF BETA", ["ERASMO", "FABIAN", "GRETA", "HORTENSE", "IGNAZIO"], 2)
TITLES = {"The Tragedy of Alpha", "The Comedy of Beta"}


def write_split(root: Path, split: str, rows: list[dict[str, str]]) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / split / "part-00000.parquet")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "alpha_gut.txt").write_text(ALPHA[0])
    (corpus / "beta_gut.txt").write_text(BETA[0])
    (corpus / "alpha_gut_f.txt").write_text("The Tragedie of Alpha\n\n" + TWIN_FOLIO)
    test = [{"text": ALPHA[2], "source": str(corpus / "alpha_gut.txt"), "id": "alpha:40"},
            {"text": BETA[2], "source": str(corpus / "beta_gut.txt"), "id": "beta:30"}]
    train = [{"text": ALPHA[1], "source": str(corpus / "alpha_gut.txt"), "id": "alpha:1"},
             {"text": TWIN_FOLIO, "source": str(corpus / "alpha_gut_f.txt"), "id": "alphaf:1"},
             {"text": BETA[1], "source": str(corpus / "beta_gut.txt"), "id": "beta:1"}]
    out = tmp_path / "data"
    write_split(out, "train", train)
    write_split(out, "val", train[:1])
    write_split(out, "test", test)
    inputs = {"input0": {"path": str(corpus)}}
    (out / "summary.json").write_text(json.dumps({"stage": "data prepare", "inputs": inputs}))
    return out


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def user_text(record: dict) -> str:
    return record["messages"][0]["content"]


def answer(record: dict) -> str:
    return record["messages"][-1]["content"] if "chosen" not in record else record["chosen"]


def test_training_files_come_from_the_train_split_and_held_out_from_test(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    summary = S.make_shakespeare_sft(None, data, out, max_examples=60, max_pairs=30, progress=False)
    train_text, test_text = ALPHA[1] + BETA[1], ALPHA[2] + BETA[2]
    files = {name: read(out / name) for name in S.FILES}
    assert {n: len(v) for n, v in files.items()} == {n: summary["metrics"][n.removesuffix(".jsonl")] for n in S.FILES}
    assert len(files["sft.jsonl"]) == 60 and summary["metrics"]["sft_by_kind"] == {"speaker": 30, "play": 15,
                                                                                  "continue": 15}
    for name, text, other in (("sft.jsonl", train_text, test_text), ("preferences.jsonl", train_text, test_text),
                              ("sft_heldout.jsonl", test_text, train_text),
                              ("preferences_heldout.jsonl", test_text, train_text)):
        assert files[name], name
        for record in files[name]:
            kind = S.kind_of(record["messages"])
            assert kind in S.KINDS
            verse = [line for line in user_text(record).split("\n") if line.endswith(",")]
            assert verse and all(line in text and line not in other for line in verse), (name, record)
            if kind == "speaker":
                assert answer(record) in ({s for s in "ALBANO BRUNO CELIA DORIAN ESTELLA".split()}
                                          | {s for s in "ERASMO FABIAN GRETA HORTENSE IGNAZIO".split()})
            elif kind == "play":
                assert answer(record) in TITLES
            else:
                assert answer(record) + "\n" in text or text.endswith(answer(record))
    held = json.dumps(files["sft_heldout.jsonl"]) + json.dumps(files["speaker_heldout.jsonl"])
    assert "heavy news" not in held and "northern hills" not in held  # its Folio twin is in train
    assert summary["metrics"]["speeches_dropped_in_training"] >= 1


def test_pairs_reject_a_plausible_wrong_answer(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    S.make_shakespeare_sft(None, data, out, max_examples=20, max_pairs=40, progress=False)
    speakers = {"Alpha": set("ALBANO BRUNO CELIA DORIAN ESTELLA".split()),
                "Beta": set("ERASMO FABIAN GRETA HORTENSE IGNAZIO".split())}
    for name in ("preferences.jsonl", "preferences_heldout.jsonl"):
        for pair in read(out / name):
            assert set(pair) == {"messages", "chosen", "rejected"} and pair["chosen"] != pair["rejected"]
            kind = S.kind_of(pair["messages"])
            if kind == "speaker":  # another speaker of the same play
                play = next(p for p, names in speakers.items() if pair["chosen"] in names)
                assert pair["rejected"] in speakers[play]
            elif kind == "play":
                assert {pair["chosen"], pair["rejected"]} == TITLES
            else:  # a line of another speech of the same play
                play_text = ALPHA[0] if pair["chosen"] in ALPHA[0] else BETA[0]
                assert pair["rejected"] in play_text and pair["rejected"] != pair["chosen"]


def test_speaker_items_hold_both_formats_with_the_true_speaker(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    S.make_shakespeare_sft(None, data, out, max_examples=20, max_pairs=10, progress=False)
    items = read(out / "speaker_heldout.jsonl")
    assert items
    for item in items:
        prefixes = [c.split("\n", 1)[0] for c in item["choices"]]
        line = item["choices"][0].split("\n", 1)[1]
        assert item["answers"] == [p.rstrip(".") for p in prefixes] and len(set(item["answers"])) == 4
        # the true speaker: the passage followed by the gold choice is text of the held-out scene
        assert (item["context"] + item["choices"][item["gold"]]).strip() in ALPHA[2] + BETA[2]
        question = S.speaker_question(item["context"], line, item["answers"])
        assert item["messages"] == [{"role": "user", "content": question}]
        assert question.endswith(f": {', '.join(item['answers'][:3])} or {item['answers'][3]}?\n{line}")


def test_deterministic_by_seed_and_atomic(data: Path, tmp_path: Path, monkeypatch) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 0), (b, 0), (c, 1)):
        S.make_shakespeare_sft(None, data, out, seed=seed, max_examples=40, max_pairs=20, progress=False)
    for name in S.FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "sft.jsonl").read_bytes() != (c / "sft.jsonl").read_bytes()
    (a / "keep.txt").write_text("old")

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "write_summary", fail)  # interrupted after the files, before summary.json
    with pytest.raises(KeyboardInterrupt):
        S.make_shakespeare_sft(None, data, a, seed=1, max_examples=40, max_pairs=20, progress=False)
    assert (a / "keep.txt").exists() and (a / "sft.jsonl").read_bytes() == (b / "sft.jsonl").read_bytes()
    assert not list(tmp_path.glob(".a.*"))


def test_mix_and_clip() -> None:
    assert S.parse_mix("speaker=1,play=1") == {"speaker": 0.5, "play": 0.5}
    assert S.parse_mix(None) == S.DEFAULT_MIX
    for bad in ("speaker", "speaker=x", "who=1", "speaker=0"):
        with pytest.raises(UserError, match="--mix"):
            S.parse_mix(bad)
    assert S.clip_passage("aaaa\nbbb\ncc\n", 7) == "bbb\ncc"
    assert S.clip_passage("aaaa\nbbbbbbbbbb", 4) == "bbbb"


def test_cli_writes_files_and_refuses_bad_input(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sft"
    assert main(["data", "make-sft", "shakespeare", "--data", str(data), "--out", str(out), "--max-examples", "10",
                 "--max-pairs", "6", "--mix", "speaker=1"]) == 0
    assert "10 chat examples" in capsys.readouterr().out
    assert {S.kind_of(r["messages"]) for r in read(out / "sft.jsonl")} == {"speaker"}
    assert json.loads((out / "summary.json").read_text())["stage"] == "data make-sft"
    assert main(["data", "make-sft", "shakespeare", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no fetched Shakespeare directory" in capsys.readouterr().err
