"""benchmarks/decode_speed.py with tiny arguments: it runs, and its bookkeeping is right."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_speed.py"
TINY = ["--layers", "2", "--width", "32", "--heads", "2", "--vocab", "97", "--block-size", "32",
        "--prompt-len", "5", "--new-tokens", "7", "--batches", "1", "3", "--repeats", "1", "--group-size", "32"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("decode_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_count_tokens_and_agree(bench, tmp_path, capsys):
    result = bench.main(TINY + ["--variants", "fp32", "int8", "--json", str(tmp_path / "out.json")])
    rows = result["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [("fp32", 1), ("fp32", 3), ("int8", 1), ("int8", 3)]
    for r in rows:  # both sides wrote exactly --new-tokens tokens in every row (no EOS stop)
        assert r["lmforge_new_tokens"] == [7] * r["batch"]
        assert r["transformers_new_tokens"] == [7] * r["batch"]
        assert r["ratio"] == pytest.approx(r["lmforge_tokens_per_s"] / r["transformers_tokens_per_s"])
        assert r["lmforge_tokens_per_s"] == pytest.approx(r["batch"] * 7 / r["lmforge_seconds"][0])
    # the same weights (converted by to_hf): fp32 greedy tokens of lmforge and transformers agree
    assert all(r["same_tokens"] for r in rows if r["variant"] == "fp32")
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["rows"][1]["transformers_new_tokens"] == [7, 7, 7]
    out = capsys.readouterr().out
    assert "llama.cpp: not installed" in out or "llama.cpp: installed" in out
    assert "lmforge int8 / lmforge fp32 at batch 1" in out


def test_both_sides_hold_the_same_weights(bench, tmp_path):
    """The converted HF model gives the lmforge model's logits (an independent check of the pairing)."""
    args = bench.parse_args(TINY)
    model, _, hf_dir = bench.build_pair(args, tmp_path)
    hf = bench.load_hf(hf_dir, torch.float32)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(ids)[0], hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert hf.dtype == torch.float32 and bench.load_hf(hf_dir, torch.bfloat16).dtype == torch.bfloat16
    assert bench.load_lmforge(hf_dir.parent / "ckpt", "bf16").tok_embeddings.weight.dtype == torch.bfloat16


def test_prompt_must_fit_the_context(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--block-size", "64", "--prompt-len", "64", "--new-tokens", "8"])


def test_profile_and_lmforge_only(bench, tmp_path):
    bench.main(TINY + ["--profile", str(tmp_path / "prof.txt")])
    text = (tmp_path / "prof.txt").read_text()
    assert "lmforge fp32, batch 1: 7 tokens" in text and "lmforge fp32, batch 3: 21 tokens" in text
    assert "aten::" in text  # the op table
    speeds = bench.main(TINY + ["--lmforge-only"])["lmforge_fp32_tokens_per_s"]
    assert set(speeds) == {1, 3} and all(v > 0 for v in speeds.values())
