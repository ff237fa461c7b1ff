"""Which held-out text a compressed/pruned/distilled checkpoint is measured on (`compress.heldout`)."""

from __future__ import annotations

import shutil

from train_helpers import make_token_dir

from lmforge.compress.heldout import token_dir_of


def test_a_relative_token_dir_from_another_working_dir_is_found_by_its_tokenizer(tmp_path, monkeypatch):
    """A run made in project A records `data.tokens: runs/x/tokens`; run from project B, which has its own
    runs/x/tokens made with another tokenizer, the checkpoint must still be measured on A's tokens."""
    a, b = tmp_path / "a", tmp_path / "b"
    tokens_a = make_token_dir(a / "work", kind="char")
    tokens_b = make_token_dir(b / "work", kind="bpe")
    for root, tokens in ((a, tokens_a), (b, tokens_b)):
        shutil.copytree(tokens, root / "runs" / "x" / "tokens")
    run = a / "runs" / "x" / "model"
    (run / "checkpoints" / "best").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  tokens: runs/x/tokens\n")
    shutil.copy(tokens_a / "tokenizer.json", run / "checkpoints" / "best" / "tokenizer.json")
    monkeypatch.chdir(b)
    assert (b / "runs" / "x" / "tokens" / "meta.json").is_file()  # the wrong one is right there
    for ckpt in (run, run / "checkpoints" / "best"):
        assert token_dir_of(ckpt).resolve() == (a / "runs" / "x" / "tokens").resolve()
    monkeypatch.chdir(a)
    assert token_dir_of(run).resolve() == (a / "runs" / "x" / "tokens").resolve()
