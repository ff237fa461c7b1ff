"""`atomic_dir`: a directory appears whole or not at all, and a failed swap leaves the old one in place."""

from __future__ import annotations

import os

import pytest

from lmforge.fsutil import atomic_dir


def test_atomic_dir_replaces_whole_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()  # nothing visible before the block ends
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old dir left


def test_a_failing_block_leaves_the_old_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failing_swap_puts_the_old_dir_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp" in str(src):
            raise OSError("disk trouble")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk trouble"), atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dot_names_the_directory_itself(tmp_path, monkeypatch):
    target = tmp_path / "here"
    target.mkdir()
    monkeypatch.chdir(target)
    with atomic_dir(".") as tmp:
        (tmp / "f.txt").write_text("x")
    assert (tmp_path / "here" / "f.txt").read_text() == "x"


def test_summary_stage_names_have_one_spelling(tmp_path):
    """summary.json names its stage as the command is typed; a stray spelling is refused."""
    from lmforge.fsutil import STAGES, write_summary

    assert write_summary(tmp_path, "data prepare")["stage"] == "data prepare"
    for wrong in ("data_prepare", "data.fetch", "convert-to-hf"):
        with pytest.raises(ValueError, match="unknown stage"):
            write_summary(tmp_path, wrong)
    assert all(s == " ".join(s.split()) and "_" not in s and "." not in s for s in STAGES)
