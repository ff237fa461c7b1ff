"""Readers of `data prepare`: shards, byte ranges, compressed input, bad input as records."""

from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from lmforge.data.config import ReadConfig
from lmforge.data.sources import Record, Unreadable, plan_shards, read_shard, resolve_inputs
from lmforge.errors import UserError


def _read_all(files, cfg):
    return [item for shard in plan_shards(files, cfg) for item in read_shard(shard, cfg)]


def test_byte_range_shards_read_every_line_exactly_once(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": f"document {i} " + "x" * (i * 37 % 500), "k": i}) for i in range(400)]
    lines.insert(123, json.dumps({"text": "y" * 5000}))  # a long line straddling a boundary
    lines.insert(200, "")  # blank lines are skipped, but still count for line numbers
    path.write_text("\n".join(lines) + "\n")
    whole = _read_all([str(path)], ReadConfig(max_document_bytes=4000))
    sharded_cfg = ReadConfig(shard_bytes=3000, max_document_bytes=4000)
    shards = plan_shards([str(path)], sharded_cfg)
    assert len(shards) > 10 and shards[0].start == 0 and shards[-1].end == path.stat().st_size
    assert all(a.end == b.start for a, b in zip(shards, shards[1:]))
    sharded = _read_all([str(path)], sharded_cfg)
    assert [(getattr(r, "id", None), getattr(r, "text", None)) for r in whole] == \
           [(getattr(r, "id", None), getattr(r, "text", None)) for r in sharded]
    too_long = [r for r in sharded if isinstance(r, Unreadable)]
    assert [(r.reason, r.where) for r in too_long] == [("too_long", f"{path}:124")]
    records = [r for r in sharded if isinstance(r, Record)]
    assert len(records) == 400 and records[0].meta == {"k": 0} and records[-1].id == f"{path}:402"


def test_compressed_inputs_and_truncation(tmp_path):
    payload = "\n".join(json.dumps({"text": f"line {i}"}) for i in range(1000)).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload)[:-50])
    (tmp_path / "d.jsonl.gz").write_bytes(b"not gzip at all")
    files = resolve_inputs([str(tmp_path)])
    items = _read_all(files, ReadConfig())
    by_file: dict[str, list] = {}
    for item in items:
        key = (item.source if isinstance(item, Record) else item.where).split("/")[-1].split(":")[0]
        by_file.setdefault(key, []).append(item)
    assert len(by_file["a.jsonl.gz"]) == 1000 and len(by_file["b.jsonl.zst"]) == 1000
    assert any(isinstance(i, Unreadable) and i.reason == "truncated" for i in by_file["c.jsonl.zst"])
    assert [i.reason for i in by_file["d.jsonl.gz"]] == ["corrupt"]


def test_text_blocks_csv_and_strict(tmp_path):
    (tmp_path / "a.txt").write_text("first block\nstill first\n\n\nsecond block\n")
    (tmp_path / "b.csv").write_text("id,text\n7,hello world\n8,\"multi\nline\"\n")
    cfg = ReadConfig(split_on_blank_lines=True)
    items = _read_all(resolve_inputs([str(tmp_path / "*.*")]), cfg)
    assert [(r.id.split("/")[-1], r.text) for r in items] == [
        ("a.txt:1", "first block\nstill first"), ("a.txt:5", "second block"),
        ("b.csv:1", "hello world"), ("b.csv:2", "multi\nline")]
    assert items[2].meta == {"id": "7"}
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(UserError) as info:
        list(read_shard(plan_shards([str(tmp_path / "c.jsonl")], cfg)[0], cfg, strict=True))
    assert "c.jsonl:2" in str(info.value) and "\n" not in str(info.value)


def test_resolve_inputs_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_inputs([str(tmp_path / "missing")])
    with pytest.raises(UserError, match="no file matches"):
        resolve_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(UserError, match="unsupported"):
        resolve_inputs([str(tmp_path / "x.bin")])


def test_blank_line_blocks_can_be_merged_into_larger_documents(tmp_path):
    (tmp_path / "play.txt").write_text("A.\nline one\n\nB.\nline two\n\n\nC.\nline three\n\nD.\nend\n")
    cfg = ReadConfig(split_on_blank_lines=True, merge_blocks_chars=20)
    items = _read_all([str(tmp_path / "play.txt")], cfg)
    assert [(r.id.split(":")[-1], r.text) for r in items] == [
        ("1", "A.\nline one\n\nB.\nline two"), ("8", "C.\nline three\n\nD.\nend")]
