"""Incremental detokenization (`lmforge.infer.detok.TextStream`) with Chinese text, where byte-level
tokens often end inside a 3-byte character: streamed pieces never hold U+FFFD, they join up to the
final text, and that text is the tokenizer's own decode (HF `tokenizers`) of the ids wherever those
are valid UTF-8 (elsewhere: that decode without its U+FFFD). Also `generate_text` and the
`lmforge generate` command on a Chinese checkpoint, which printed `�` mid-text before."""

from __future__ import annotations

import random

import pytest
import torch
from data_helpers import write_jsonl

from lmforge.infer.detok import TextStream, token_bytes, token_text
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_tokenizer

REPLACEMENT = "\ufffd"
POEMS = [
    "兰叶春葳蕤，桂华秋皎洁。欣欣此生意，自尔为佳节。谁知林栖者，闻风坐相悦。草木有本心，何求美人折？",
    "浮云终日行，游子久不至。三夜频梦君，情亲见君意。告归常局促，苦道来不易。江湖多风波，舟楫恐失坠。",
    "圣代无隐者，英灵尽来归。遂令东山客，不得顾采薇。既至金门远，孰云吾道非。江淮度寒食，京洛缝春衣。",
    "下马饮君酒，问君何所之。君言不得意，归卧南山陲。但去莫复问，白云无尽时。",
    "言入黄花川，每逐青溪水。随山将万转，趣途无百里。声喧乱石中，色静深松里。",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
]
UNSEEN = "北京大学的学生说：你好，世界！😀 ok"  # characters the tokenizers never saw (byte tokens)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("zh")
    (root / "corpus").mkdir()
    write_jsonl(root / "corpus" / "poems.jsonl", [{"text": p} for p in POEMS * 3])
    return root


@pytest.fixture(scope="module")
def bpe(corpus) -> Tokenizer:
    """A byte-level BPE small enough that most characters stay split into byte tokens."""
    return train_tokenizer(corpus / "corpus", corpus / "bpe", kind="bpe", vocab_size=300)


@pytest.fixture(scope="module")
def char(corpus) -> Tokenizer:
    """lmforge's char kind with room for 20 characters: the rest fall back to <0xNN> byte tokens."""
    return train_tokenizer(corpus / "corpus", corpus / "char", kind="char", vocab_size=7 + 256 + 20)


class DecodeOnly:
    """A tokenizer with nothing but decode: TextStream's decode-window path."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def stream_all(tokenizer, ids: list[int], stops=()) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stops)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.finish())
    return pieces, stream


def splits_characters(tokenizer: Tokenizer, ids: list[int]) -> bool:
    """Whether some prefix of ids ends inside a character (decode gives U+FFFD there)."""
    return any(tokenizer.decode(ids[:n]).endswith(REPLACEMENT) for n in range(1, len(ids)))


@pytest.mark.parametrize("kind", ["bpe", "char", "window"])
def test_chinese_text_streams_whole_characters(kind, bpe, char):
    tokenizer = {"bpe": bpe, "char": char, "window": DecodeOnly(bpe)}[kind]
    base = tokenizer.tokenizer if kind == "window" else tokenizer
    assert (token_bytes(tokenizer) is None) == (kind == "window")
    for text in [*POEMS, UNSEEN, "a\n\n" + POEMS[0]]:
        ids = base.encode(text)
        assert base.decode(ids) == text
        pieces, stream = stream_all(tokenizer, ids)
        assert not any(REPLACEMENT in p for p in pieces)
        assert "".join(pieces) == stream.text == text
    assert splits_characters(base, base.encode(UNSEEN))  # the test really meets split characters
    # a piece is released as soon as its character is complete: each prefix that decodes cleanly is out
    ids = base.encode(UNSEEN)
    stream, out = TextStream(tokenizer), ""
    for n, token_id in enumerate(ids, 1):
        out += stream.push(token_id)
        decoded = base.decode(ids[:n])
        if not decoded.endswith(REPLACEMENT):
            assert out == decoded


@pytest.mark.parametrize("kind", ["bpe", "char", "window"])
def test_arbitrary_token_ids_never_give_a_broken_character(kind, bpe, char):
    """What a random model writes: byte tokens in any order. The text is decode's without U+FFFD (for
    byte fallback, HF replaces a whole invalid run of byte tokens, valid bytes in it too: there the
    stream keeps more, and decode's text is a subsequence of it)."""
    tokenizer = {"bpe": bpe, "char": char, "window": DecodeOnly(bpe)}[kind]
    base = tokenizer.tokenizer if kind == "window" else tokenizer
    rng = random.Random(0)
    broken = 0
    for _ in range(200):
        ids = [rng.randrange(base.vocab_size) for _ in range(rng.randrange(1, 30))]
        pieces, stream = stream_all(tokenizer, ids)
        reference = base.decode(ids)
        broken += REPLACEMENT in reference
        assert not any(REPLACEMENT in p for p in pieces)
        assert "".join(pieces) == stream.text
        if kind != "char" or REPLACEMENT not in reference:
            assert stream.text == reference.replace(REPLACEMENT, "")
        else:
            rest = iter(stream.text)
            assert all(c in rest for c in reference.replace(REPLACEMENT, ""))  # a subsequence
    assert broken > 50


def test_stop_strings_are_held_back_and_cut(bpe):
    text = POEMS[5]  # 床前明月光，疑是地上霜。举头望明月，...
    ids = bpe.encode(text)
    pieces, stream = stream_all(bpe, ids, stops=["举头"])
    assert stream.stopped and stream.text == "".join(pieces) == text[:text.index("举头")]
    assert not any(REPLACEMENT in p for p in pieces)
    assert stream.push(ids[0]) == "" and stream.finish() == ""  # stopped: nothing more
    # "明月光" is held back until "明月" turns out not to be "明月夜"; at the end nothing is held
    stream, out = TextStream(bpe, ["明月夜"]), []
    for token_id in ids:
        out.append(stream.push(token_id))
        assert not "".join(out).endswith("明")  # a possible start of the stop string waits
    out.append(stream.finish())
    assert not stream.stopped and "".join(out) == text
    pieces, stream = stream_all(bpe, bpe.encode("abc明月"), stops=["明月夜"])
    assert pieces[-1] == "明月" and stream.text == "abc明月"


def test_token_text_for_logprobs(bpe):
    ids = bpe.encode(UNSEEN)
    raw = b"".join(token_text(bpe, i)[1] for i in ids)
    assert raw.decode("utf-8") == UNSEEN
    half = next(i for i in ids if REPLACEMENT in bpe.decode([i]))
    text, raw = token_text(bpe, half)
    assert "\\x" in text and REPLACEMENT not in text and raw == text.encode().decode("unicode_escape").encode("latin-1")
    assert token_text(bpe, bpe.eos_id) == ("<|eos|>", b"<|eos|>")


# --- generate_text and the CLI on a Chinese checkpoint (a random tiny GPT writes arbitrary byte tokens)


@pytest.fixture(scope="module")
def ckpt(bpe, tmp_path_factory):
    from lmforge.models import GPT, ModelConfig
    from lmforge.train.checkpoint import save_checkpoint, tied_aliases

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=bpe.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64))
    path = tmp_path_factory.mktemp("zhckpt") / "ckpt"
    bpe.save(path.parent)
    save_checkpoint(path, model.state_dict(), model.config.to_dict(), path.parent / "tokenizer.json", None,
                    drop=tied_aliases(model))
    return path


def test_generate_text_on_a_chinese_model(ckpt):
    from lmforge.infer.generate import generate, generate_text
    from lmforge.train.checkpoint import load_pretrained

    model, tok = load_pretrained(ckpt)
    prompt = tok.encode("床前明月光")
    for seed in range(2):
        pieces: list[str] = []
        text = generate_text(model, tok, prompt, max_new_tokens=30, seed=seed, stream=pieces.append)
        ids = list(generate(model, prompt, 30, seed=seed, stop_ids={tok.eos_id}))
        ids = ids[:-1] if ids and ids[-1] == tok.eos_id else ids
        assert REPLACEMENT in tok.decode(ids)  # the old output: decode of the reply, broken characters in it
        assert not any(REPLACEMENT in p for p in pieces)
        assert "".join(pieces) == text == tok.decode(ids).replace(REPLACEMENT, "")


def test_lmforge_generate_prints_no_broken_character(ckpt, capsys):
    from lmforge.cli import main

    for args in (["--prompt", "床前明月光", "--seed", "1"], ["--prompt", "你好", "--chat", "--seed", "2"]):
        capsys.readouterr()
        assert main(["generate", "--ckpt", str(ckpt), "--max-new-tokens", "24", *args]) == 0
        out = capsys.readouterr().out
        assert REPLACEMENT not in out and len(out) > 2
    assert main(["generate", "--ckpt", str(ckpt), "--max-new-tokens", "24", "--prompt", "床前", "--seed", "0"]) == 0
    from lmforge.infer.generate import generate
    from lmforge.train.checkpoint import load_pretrained

    model, tok = load_pretrained(ckpt)
    ids = [i for i in generate(model, tok.encode("床前"), 24, seed=0) if i != tok.eos_id]
    assert REPLACEMENT in tok.decode(ids)  # what was printed before
    assert capsys.readouterr().out == "床前" + tok.decode(ids).replace(REPLACEMENT, "") + "\n"
