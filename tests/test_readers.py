"""Corpus readers: formats, ordering, ids, splits, and one-line errors that name the file."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.readers import Document, iter_documents, list_splits
from lmforge.errors import UserError


def test_directory_is_recursive_sorted_and_skips_hidden(tiny_corpus):
    (tiny_corpus / ".hidden.txt").write_text("secret")
    (tiny_corpus / ".git").mkdir()
    (tiny_corpus / ".git" / "notes.txt").write_text("secret")
    (tiny_corpus / "image.png").write_bytes(b"\x89PNG\0\0")  # unsupported suffix: skipped
    docs = list(iter_documents(tiny_corpus))
    names = [d.source.removeprefix(str(tiny_corpus) + "/") for d in docs]
    assert names == ["hamlet.txt", "macbeth.txt", "plays/lear.txt", "plays/tempest.txt", "sonnets.md"]
    assert all(isinstance(d, Document) and "secret" not in d.text for d in docs)
    assert docs[0].text.startswith("HAMLET") and docs[0].id == docs[0].source


def test_jsonl_and_parquet(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "first"}\n\n{"text": "second", "meta": 1}\n{"text": ""}\n')
    docs = list(iter_documents(jsonl))
    assert [d.text for d in docs] == ["first", "second"]  # blank lines and empty texts skipped
    assert [d.id for d in docs] == [f"{jsonl}:1", f"{jsonl}:3"]

    table = pa.table({"text": [f"row {i}" for i in range(2500)] + [None], "n": list(range(2501))})
    parquet = tmp_path / "b.parquet"
    pq.write_table(table, parquet, row_group_size=1000)
    docs = list(iter_documents(parquet))
    assert len(docs) == 2500 and docs[1234].text == "row 1234" and docs[1234].id == f"{parquet}:1234"


def test_crlf_kept_and_bom_dropped(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    (doc,) = iter_documents(tmp_path)
    assert doc.text == "line one\r\nline two\r\n"


def test_list_splits(tmp_path):
    assert list_splits(tmp_path) is None
    for name in ("train", "val"):
        (tmp_path / name).mkdir()
    assert list_splits(tmp_path) == {"train": tmp_path / "train", "val": tmp_path / "val"}
    (tmp_path / "test").mkdir()
    assert set(list_splits(tmp_path)) == {"train", "val", "test"}


def _error(path) -> str:
    with pytest.raises(UserError) as info:
        list(iter_documents(path))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    assert f"{tmp_path / 'nope'} does not exist" in _error(tmp_path / "nope")


def test_no_supported_files(tmp_path):
    (tmp_path / "data.xlsx").write_text("a,b")
    assert _error(tmp_path) == (f"no .txt/.md/.jsonl/.jsonl.gz/.jsonl.zst/.parquet/.csv files under {tmp_path}; "
                                "point at a corpus directory")


def test_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.md").write_text("")
    assert "corpus is empty" in _error(tmp_path) and str(tmp_path) in _error(tmp_path)


def test_binary_file(tiny_corpus):
    bad = tiny_corpus / "plays" / "zz_photo.txt"
    bad.write_bytes(b"JFIF" + b"\0" * 10)
    assert _error(tiny_corpus) == (
        f"{bad} looks binary (NUL byte at offset 4); remove it or move it out of the corpus"
    )


def test_invalid_utf8_names_byte_and_line(tiny_corpus):
    bad = tiny_corpus / "latin1.txt"
    bad.write_bytes("ok line\nna\xefve\n".encode("latin-1"))
    assert _error(tiny_corpus) == f"{bad}: invalid UTF-8 at byte 10 (line 2); re-encode it as UTF-8"


def test_invalid_utf8_in_jsonl_counts_from_file_start(tmp_path):
    bad = tmp_path / "a.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    assert _error(bad) == f"{bad}: invalid UTF-8 at byte 25 (line 2); re-encode it as UTF-8"


def test_jsonl_missing_field_and_bad_json(tmp_path):
    bad = tmp_path / "a.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    message = _error(bad)
    assert message.startswith(f"{bad}:2: missing field 'text'")
    bad.write_text('{"text": "ok"}\n{"text": \n')
    assert _error(bad).startswith(f"{bad}:2: invalid JSON")
    bad.write_text('{"text": 3}\n')
    assert _error(bad).startswith(f"{bad}:1: field 'text' is int")


def test_parquet_without_text_column_or_corrupt(tmp_path):
    bad = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"]}), bad)
    assert _error(bad) == f"{bad}: no 'text' column (columns: body); rename the text column to 'text'"
    bad.write_bytes(b"not parquet at all")
    assert _error(bad).startswith(f"{bad}: not a readable parquet file")


def test_unsupported_single_file(tmp_path):
    bad = tmp_path / "a.docx"
    bad.write_text("x")
    assert _error(bad).startswith(f"{bad}: unsupported file type '.docx'")
    bad = tmp_path / "a.csv"  # csv is read, but needs a text column
    bad.write_text("x\n1\n")
    assert _error(bad) == f"{bad}: no 'text' column (columns: x); name the text column 'text'"


# ---- one reader stack: every format `data prepare` reads, the tokenizer stages read too ----------

_TEXTS = [f"the king shall speak {i},\nof \"love\" and death\n\nupon this night" for i in range(40)]


def _write_format(root, suffix: str) -> None:
    import csv
    import gzip

    import zstandard

    root.mkdir()
    rows = [{"text": t, "n": i} for i, t in enumerate(_TEXTS)]
    payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
    file = root / f"docs{suffix}"
    if suffix == ".jsonl":
        file.write_bytes(payload)
    elif suffix == ".jsonl.gz":
        file.write_bytes(gzip.compress(payload))
    elif suffix == ".jsonl.zst":
        file.write_bytes(zstandard.ZstdCompressor().compress(payload))
    elif suffix == ".csv":
        with open(file, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["n", "text"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.table({"text": _TEXTS, "n": list(range(len(_TEXTS)))}), file)


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".csv", ".jsonl.gz", ".parquet"])
def test_tokenize_and_tokenizer_training_read_every_prepare_format(suffix, tmp_path, tokenizer_file):
    from lmforge.tokenizer.shards import read_meta, tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer

    _write_format(tmp_path / "jsonl", ".jsonl")
    _write_format(tmp_path / "other", suffix)
    assert [d.text for d in iter_documents(tmp_path / "other")] == _TEXTS
    outputs = {}
    for name in ("jsonl", "other"):
        out = tmp_path / f"tok_{name}"
        tokenize_corpus(tokenizer_file, tmp_path / name, out, val_fraction=0.2, workers=1)
        meta = read_meta(out)
        shards = {split: [(out / s).read_bytes() for s in info["shards"]] for split, info in meta["splits"].items()}
        trained = train_tokenizer(tmp_path / name, tmp_path / f"bpe_{name}", kind="bpe", vocab_size=300)
        outputs[name] = ({k: v["tokens"] for k, v in meta["splits"].items()}, shards, trained.encode(_TEXTS[3]))
    assert outputs["other"] == outputs["jsonl"]
    assert outputs["jsonl"][0]["val"] > 0 and outputs["jsonl"][0]["train"] > 0


def test_damaged_compressed_input_stops_the_tokenizer_stages_with_file_and_line(tmp_path):
    import zstandard

    payload = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(2000)).encode()
    bad = tmp_path / "a.jsonl.zst"
    bad.write_bytes(zstandard.ZstdCompressor().compress(payload)[:-50])
    message = _error(bad)
    assert message.startswith(f"{bad}:") and "truncated" in message
    bad.unlink()
    bad = tmp_path / "b.jsonl.gz"
    bad.write_bytes(b"\x1f\x8b" + b"not gzip at all")
    assert _error(bad).startswith(f"{bad}:1: corrupt")
    bad.unlink()
    bad = tmp_path / "c.csv"
    bad.write_bytes(b"text\nok\n\xff\xfe broken\n")
    assert _error(bad) == f"{bad}: invalid UTF-8 at byte 8 (line 3); re-encode it as UTF-8"
