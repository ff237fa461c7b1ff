"""Bounded memory: `data prepare` on a large input stays under 1 GB resident (slow; size via env)."""

from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import edit_words, prose

# 600 MB passes (570 MB peak); the 2 GB goal is not met yet (see docs/BENCHMARKS.md)
SIZE_MB = float(os.environ.get("LMFORGE_MEMORY_TEST_MB", "600"))


@pytest.mark.slow
def test_large_compressed_input_in_bounded_memory(tmp_path: Path):
    """A single .jsonl.gz (one shard: cannot be cut into byte ranges) of SIZE_MB uncompressed MB."""
    path = tmp_path / "big.jsonl.gz"
    base = [prose(i, 900) for i in range(200)]
    written = 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        i = 0
        while written < SIZE_MB * 1e6:
            text = edit_words(base[i % 200], 0.3, i)
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
            i += 1
    code = ("import resource, sys; from lmforge.cli import main; rc = main(sys.argv[1:]); "
            "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "data", "prepare", "--input", str(path), "--out",
                           str(tmp_path / "out"), "--workers", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss_mb = int(proc.stdout.split("maxrss_kb")[-1].split()[0]) / 1024
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\npeak RSS {max(rss_mb, children_mb):.0f} MB for {written / 1e6:.0f} MB of input ({i} documents)")
    assert max(rss_mb, children_mb) < 1024, f"peak RSS {rss_mb:.0f} MB for {SIZE_MB:.0f} MB of input"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["documents_in"] == i
