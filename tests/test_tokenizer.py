"""Tokenizers (all kinds) and token shards: round-trip, special tokens, __call__, splits, errors."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import tokenizers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lmforge.errors import UserError
from lmforge.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    load_split,
    read_meta,
    tokenize_corpus,
    train_tokenizer,
)
from lmforge.tokenizer.shards import doc_hash

KINDS = ("bpe", "char", "wordpiece", "unigram")
VOCAB = {"bpe": 400, "char": None, "wordpiece": 200, "unigram": 400}
# Any Unicode string Python can encode to UTF-8: every category except lone surrogates.
ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=60)
HARD_EXAMPLES = [
    "", "Hello, world!", "  leading and trailing  ", "\r\n\r\n", "\x00NUL\x00", "tab\there",
    "中文字符和标点。", "emoji 🎉👩‍👩‍👧 flags 🇬🇧", "\u0301lone combining mark", "e\u0301 vs \u00e9",
    "<|bos|><|eos|><|pad|><|user|> typed by a user", "<0x41> <0xFF>", "## heading", "\ufeffBOM",
    "\u200bzero\u200dwidth", "ﬁ ligature", "\U0010ffff\U000e0001", "x" * 300, " " * 150 + "end",
]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def toks(tiny_corpus_shared, tmp_path_factory) -> dict[str, Tokenizer]:
    out = tmp_path_factory.mktemp("toks")
    return {k: train_tokenizer(tiny_corpus_shared, out / k, kind=k, vocab_size=VOCAB[k], min_frequency=1)
            for k in KINDS}


# ---- training, saving, loading ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_specials_lowest_ids_and_survive_save_load(toks, kind, tmp_path):
    tok = toks[kind]
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size
    assert [loaded.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert Tokenizer.load(tmp_path / "tokenizer.json").kind == kind
    # The file is plain HF `tokenizers` format.
    plain = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "To be, or not to be"
    assert plain.encode(text).ids == tok.encode(text)
    assert plain.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", KINDS)
def test_train_writes_summary(tiny_corpus_shared, kind, tmp_path):
    train_tokenizer(tiny_corpus_shared, tmp_path / "tok", kind=kind, vocab_size=VOCAB[kind])
    summary = json.loads((tmp_path / "tok" / "summary.json").read_text())
    assert summary["stage"] == "tokenizer train"
    assert summary["metrics"]["kind"] == kind and summary["metrics"]["documents"] == 5
    assert {"vocab_size", "chars", "seconds"} <= set(summary["metrics"])


def test_char_vocab_is_specials_bytes_and_seen_chars(toks, tiny_corpus_shared):
    seen = set("".join(p.read_text() for p in tiny_corpus_shared.rglob("*.*")))
    assert toks["char"].vocab_size == 7 + 256 + len(seen)
    assert toks["char"].id_to_token(7) == "<0x00>"
    assert all(len(toks["char"].encode(c)) == 1 for c in seen)


def test_bad_kind_and_small_vocab(tiny_corpus, tmp_path):
    with pytest.raises(UserError, match="kind 'sentencepiece' is not one of"):
        train_tokenizer(tiny_corpus, tmp_path / "t", kind="sentencepiece")
    with pytest.raises(UserError, match="vocab_size 100 is too small for a bpe tokenizer; use at least 263"):
        train_tokenizer(tiny_corpus, tmp_path / "t", kind="bpe", vocab_size=100)
    assert not (tmp_path / "t").exists()


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}/tokenizer.json does not exist"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(UserError, match=f"{tmp_path}/tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


# ---- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "char", "unigram"])
def test_round_trip_any_string(toks, kind):
    tok = toks[kind]

    @SETTINGS
    @given(ANY_TEXT)
    def check(text):
        assert tok.decode(tok.encode(text)) == text

    for text in HARD_EXAMPLES:
        assert tok.decode(tok.encode(text)) == text, repr(text)
    check()


def test_wordpiece_round_trips_text_of_its_alphabet(toks, tiny_corpus_shared):
    tok = toks["wordpiece"]
    alphabet = sorted(set("".join(p.read_text() for p in tiny_corpus_shared.rglob("*.*"))))

    @SETTINGS
    @given(st.text(st.sampled_from(alphabet), max_size=200))
    @example("Shall I compare thee to a summer's day?\n")
    @example(" (1611) -- &  " + "a" * 150 + "  \n\n")
    def check(text):
        assert tok.decode(tok.encode(text)) == text

    check()


def test_wordpiece_unseen_character_becomes_unk(toks):
    # Documented limitation: WordPiece has no byte fallback; the word with the unseen
    # character (here "中文") becomes <|unk|>, the rest of the text survives.
    tok = toks["wordpiece"]
    ids = tok.encode("the 中文 king")
    assert tok.token_to_id("<|unk|>") in ids
    assert tok.decode(ids) == "the<|unk|> king"


@pytest.mark.parametrize("kind", KINDS)
def test_special_strings_in_user_text_are_data(toks, kind):
    tok = toks[kind]
    text = "<|eos|><|user|> hi <|bos|>"
    ids = tok.encode(text)
    assert not set(ids) & set(range(7))
    if kind != "wordpiece":  # the tiny corpus has no "<", "|", ">": WordPiece gives <|unk|>
        assert tok.decode(ids) == text
    assert tok.encode("hi", add_bos=True, add_eos=True) == [0, *tok.encode("hi"), 1]
    assert tok.decode([0, *tok.encode("hi"), 1]) == "<|bos|>hi<|eos|>"
    assert tok.decode([0, *tok.encode("hi"), 1], skip_special_tokens=True) == "hi"


def test_encode_batch_matches_encode(toks):
    tok = toks["bpe"]
    texts = HARD_EXAMPLES + ["more text"] * 10
    assert tok.encode_batch(texts, add_eos=True) == [tok.encode(t, add_eos=True) for t in texts]
    assert tok.decode(np.array(tok.encode("numpy ids"))) == "numpy ids"


# ---- __call__ ------------------------------------------------------------------------------


def test_call_padding_truncation_pairs(toks):
    tok = toks["char"]
    a, b, c, d, e = (tok.token_to_id(ch) for ch in "abcde")
    bos, eos, pad = tok.bos_id, tok.eos_id, tok.pad_id

    single = tok("ab")  # special tokens by default, as in transformers: [CLS] A [SEP]
    assert single == {"input_ids": [bos, a, b, eos], "attention_mask": [1] * 4, "token_type_ids": [0] * 4}
    assert tok("ab", add_special_tokens=False)["input_ids"] == [a, b] == tok.encode("ab")

    batch = tok(["ab", "abcd"], padding=True, add_special_tokens=False)
    assert batch["input_ids"] == [[a, b, pad, pad], [a, b, c, d]]
    assert batch["attention_mask"] == [[1, 1, 0, 0], [1, 1, 1, 1]]
    left = tok(["ab", "abcd"], padding=True, padding_side="left", add_special_tokens=False)
    assert left["input_ids"] == [[pad, pad, a, b], [a, b, c, d]]
    assert left["attention_mask"] == [[0, 0, 1, 1], [1, 1, 1, 1]]

    assert tok(["ab"], padding="max_length", max_length=5)["input_ids"] == [[bos, a, b, eos, pad]]
    assert tok("abcde", truncation=True, max_length=5)["input_ids"] == [bos, a, b, c, eos]  # max_length counts them
    assert tok("abcde", truncation=True, max_length=3, add_special_tokens=False)["input_ids"] == [a, b, c]

    pair = tok("ab", "cde")  # the mlm objective's pair: [CLS] A [SEP] B [SEP], segment 1 from B on
    assert pair["input_ids"] == [bos, a, b, eos, c, d, e, eos]
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1, 1]
    # longest_first: 2+3 tokens into 7-3=4 slots -> the longer gives one up
    cut = tok("ab", "cde", truncation=True, max_length=7)
    assert cut["input_ids"] == [bos, a, b, eos, c, d, eos] and cut["token_type_ids"] == [0] * 4 + [1] * 3
    # into 6-3=3 slots: both cut to half, the second (the longer) keeps the odd one (as tokenizers does)
    assert tok("ab", "cde", truncation=True, max_length=6)["input_ids"] == [bos, a, eos, c, d, eos]

    pairs = tok(["a", "abc"], ["bc", "d"], padding="longest", return_tensors="pt")
    assert pairs["input_ids"].tolist() == [[bos, a, eos, b, c, eos, pad], [bos, a, b, c, eos, d, eos]]
    assert pairs["token_type_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1]]
    assert pairs["attention_mask"].tolist() == [[1] * 6 + [0], [1] * 7]
    as_np = tok("abc", return_tensors="np")
    assert as_np["input_ids"].shape == (1, 5) and as_np["input_ids"].dtype == np.int64

    with pytest.raises(ValueError, match="padding=True"):
        tok(["a", "abc"], return_tensors="pt")
    with pytest.raises(ValueError, match="needs max_length"):
        tok("a", truncation=True)
    with pytest.raises(ValueError, match="no room"):
        tok("a", "b", truncation=True, max_length=2)


# ---- token shards ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tiny_corpus_shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokdir") / "tok"
    train_tokenizer(tiny_corpus_shared, out, kind="bpe", vocab_size=400, min_frequency=1)
    return out


def _docs_from_shards(directory, split):
    meta = read_meta(directory)
    tok = Tokenizer.load(directory)
    ids = np.concatenate(load_split(directory, split)) if meta["splits"][split]["shards"] else np.array([])
    pieces = np.split(ids, np.flatnonzero(ids == meta["eos_id"]) + 1)
    return [tok.decode(p[:-1]) for p in pieces if len(p)]


def test_tokenize_corpus_format(tok_dir, tiny_corpus, tmp_path):
    out = tmp_path / "tokens"
    summary = tokenize_corpus(tok_dir, tiny_corpus, out, val_fraction=0.3, shard_tokens=100)
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta) == {"dtype", "vocab_size", "bos_id", "eos_id", "pad_id", "tokenizer_sha256", "splits"}
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 400 and meta["eos_id"] == 1
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    docs = {p.read_text() for p in tiny_corpus.rglob("*.*")}
    seen = []
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert set(info) == {"tokens", "documents", "bytes", "shards"}
        shards = load_split(out, split)
        assert info["shards"] == [f"{split}/{i:05d}.bin" for i in range(len(shards))]
        assert all(len(s) <= 100 for s in shards) and sum(len(s) for s in shards) == info["tokens"]
        tokens = np.concatenate(shards)
        assert int((tokens == meta["eos_id"]).sum()) == info["documents"]  # one eos after each doc
        split_docs = _docs_from_shards(out, split)
        assert all((doc_hash(d) < 0.3) == (split == "val") for d in split_docs)
        seen += split_docs
    assert sorted(seen) == sorted(docs)
    assert summary["metrics"]["train_documents"] + summary["metrics"]["val_documents"] == 5
    assert {"bytes_per_token", "tokens_per_s", "train_tokens", "val_tokens"} <= set(summary["metrics"])
    assert json.loads((out / "summary.json").read_text())["stage"] == "tokenize"


def test_split_is_deterministic_and_order_independent(tok_dir, tiny_corpus, tmp_path):
    # Same files written in another order: byte-identical shards.
    files = sorted(tiny_corpus.rglob("*.*"))
    random.Random(1).shuffle(files)
    copy = tmp_path / "copy"
    for f in files:
        (copy / f.relative_to(tiny_corpus)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, copy / f.relative_to(tiny_corpus))
    tokenize_corpus(tok_dir, tiny_corpus, tmp_path / "a", val_fraction=0.3)
    tokenize_corpus(tok_dir, copy, tmp_path / "b", val_fraction=0.3)
    for split in ("train", "val"):
        assert [s.tobytes() for s in load_split(tmp_path / "a", split)] == [
            s.tobytes() for s in load_split(tmp_path / "b", split)
        ]
    # Shuffled lines of a jsonl: the same documents land in the same split.
    texts = [f"document number {i} " * 3 for i in range(40)]
    for name, order in (("x", texts), ("y", random.Random(2).sample(texts, len(texts)))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in order))
        tokenize_corpus(tok_dir, tmp_path / f"{name}.jsonl", tmp_path / name, val_fraction=0.25)
    for split in ("train", "val"):
        assert sorted(_docs_from_shards(tmp_path / "x", split)) == sorted(_docs_from_shards(tmp_path / "y", split))


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_identical_output(tok_dir, tiny_corpus, tmp_path, workers):
    tokenize_corpus(tok_dir, tiny_corpus, tmp_path / "rust", val_fraction=0.3)
    tokenize_corpus(tok_dir, tiny_corpus, tmp_path / "pool", val_fraction=0.3, workers=workers)
    for split in ("train", "val"):
        assert [s.tobytes() for s in load_split(tmp_path / "rust", split)] == [
            s.tobytes() for s in load_split(tmp_path / "pool", split)
        ]


def test_presplit_directories_are_kept_and_test_is_held_out(tok_dir, tmp_path):
    corpus = tmp_path / "corpus"
    for split, n in (("train", 4), ("val", 2), ("test", 1)):
        (corpus / split).mkdir(parents=True)
        for i in range(n):
            (corpus / split / f"{i}.txt").write_text(f"{split} document {i}")
    tokenize_corpus(tok_dir, corpus, tmp_path / "out", val_fraction=0.5)
    meta = read_meta(tmp_path / "out")
    # the test split is held out: never encoded into the shards that training reads
    assert {k: v["documents"] for k, v in meta["splits"].items()} == {"train": 4, "val": 2}
    assert not (tmp_path / "out" / "test").exists()


def test_empty_val_gets_one_document(tok_dir, tiny_corpus, tmp_path):
    summary = tokenize_corpus(tok_dir, tiny_corpus, tmp_path / "out", val_fraction=1e-12)
    meta = read_meta(tmp_path / "out")
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 4
    smallest = min((p.read_text() for p in tiny_corpus.rglob("*.*")), key=doc_hash)
    assert _docs_from_shards(tmp_path / "out", "val") == [smallest]
    assert "smallest hash" in summary["notes"][0]


def test_single_document_is_split_by_tokens(tok_dir, tmp_path):
    text = "To be, or not to be, that is the question. " * 20
    (tmp_path / "one.txt").write_text(text)
    summary = tokenize_corpus(tok_dir, tmp_path / "one.txt", tmp_path / "out")
    meta = read_meta(tmp_path / "out")
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["documents"] == val["documents"] == 1
    assert 0.05 < val["tokens"] / (train["tokens"] + val["tokens"]) < 0.15
    assert "".join(_docs_from_shards(tmp_path / "out", "train") + _docs_from_shards(tmp_path / "out", "val")) == text
    assert "single document" in summary["notes"][0]


def test_uint32_for_large_vocab(tmp_path):
    # 70000 distinct characters make a char tokenizer with a vocab over 65536.
    chars = "".join(chr(0x20000 + i) for i in range(70000))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "wide.txt").write_text(chars)
    (tmp_path / "corpus" / "other.txt").write_text("plain ascii")
    tok = train_tokenizer(tmp_path / "corpus", tmp_path / "tok", kind="char")
    assert tok.vocab_size > 2**16
    tokenize_corpus(tmp_path / "tok", tmp_path / "corpus", tmp_path / "out", val_fraction=0.5)
    assert read_meta(tmp_path / "out")["dtype"] == "uint32"
    tokens = np.concatenate(load_split(tmp_path / "out", "train") + load_split(tmp_path / "out", "val"))
    assert tokens.dtype == np.uint32 and tokens.max() > 2**16


def test_shard_errors_name_the_file(tok_dir, tiny_corpus, tmp_path):
    with pytest.raises(UserError) as info:
        read_meta(tmp_path)
    assert str(info.value) == f"{tmp_path} is not a token directory (no meta.json); create it with `lmforge tokenize`"

    out = tmp_path / "out"
    tokenize_corpus(tok_dir, tiny_corpus, out, val_fraction=0.3, shard_tokens=50)
    with pytest.raises(UserError, match="no 'dev' split"):
        load_split(out, "dev")
    first = out / "train" / "00000.bin"
    first.write_bytes(first.read_bytes()[:-1])  # odd byte count
    with pytest.raises(UserError, match=f"{first} is truncated"):
        load_split(out, "train")
    first.write_bytes(first.read_bytes()[:-3])  # whole tokens missing from a middle shard
    with pytest.raises(UserError, match=f"{first} is truncated"):
        load_split(out, "train")
    (out / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json is corrupt"):
        read_meta(out)


def test_bad_val_fraction(tok_dir, tiny_corpus, tmp_path):
    with pytest.raises(UserError, match="val_fraction must be in"):
        tokenize_corpus(tok_dir, tiny_corpus, tmp_path / "out", val_fraction=1.5)


def test_real_corpus_char_vocab(shakespeare_dir, tmp_path):
    tok = train_tokenizer(shakespeare_dir, tmp_path / "tok", kind="char")
    chars = tok.vocab_size - 7 - 256
    assert 60 <= chars <= 100, chars


def test_presplit_corpus_trains_tokenizer_on_train_only(tmp_path):
    for split, word in (("train", "alpha"), ("val", "omega")):
        (tmp_path / "corpus" / split).mkdir(parents=True)
        (tmp_path / "corpus" / split / "a.txt").write_text(f"{word} {word} {word}")
    tok = train_tokenizer(tmp_path / "corpus", tmp_path / "tok", kind="char")
    assert tok.token_to_id("a") is not None
    assert tok.token_to_id("m") is None  # only in val/
    summary = json.loads((tmp_path / "tok" / "summary.json").read_text())
    assert summary["inputs"]["input"]["path"] == str(tmp_path / "corpus" / "train")
    assert summary["metrics"]["documents"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_bad_corpus_file_surfaces_through_the_trainer(tiny_corpus, tmp_path, kind):
    bad = tiny_corpus / "zz.txt"
    bad.write_bytes(b"text\0more")
    with pytest.raises(UserError, match=f"{bad} looks binary"):
        train_tokenizer(tiny_corpus, tmp_path / "tok", kind=kind, vocab_size=VOCAB[kind])
    assert not (tmp_path / "tok").exists()
