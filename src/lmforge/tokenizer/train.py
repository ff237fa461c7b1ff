"""Train a tokenizer (bpe, char, wordpiece or unigram) on a corpus and write `tokenizer.json`.

All kinds put lmforge's special tokens at ids 0..6 and use no normalizer (case, accents
and whitespace are kept). How each kind makes `decode(encode(x)) == x` hold:

- bpe: GPT-2 byte-level BPE; every byte is in the vocab, so any string round-trips.
- char: one token per character seen in the corpus; any other character falls back to
  its UTF-8 bytes (`<0x00>`..`<0xFF>` tokens), so any string round-trips.
- unigram: SentencePiece-style Unigram with byte fallback, over pieces that keep their
  whitespace (` world`), so any string round-trips.
- wordpiece: BERT-style `##` continuation pieces over the same whitespace-keeping pieces,
  decoded by concatenation; every character seen in training is usable both at the start
  of a word and inside one. WordPiece has no byte fallback: a pre-tokenized word that
  contains a character never seen in training becomes a single `<|unk|>`, so round-trip
  holds exactly when every character of the text occurs in the training corpus.

wordpiece and unigram also need an unknown token: `<|unk|>`, id 7 (bpe and char have none).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.readers import iter_documents, list_splits
from lmforge.errors import UserError
from lmforge.fsutil import atomic_dir, write_summary
from lmforge.tokenizer.tok import KINDS, SPECIAL_TOKENS, UNK, Tokenizer

DEFAULT_VOCAB_SIZE = 8192
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]  # the spelling `tokenizers` byte fallback uses
# Words for wordpiece/unigram: a run of letters or of digits, or a single other symbol,
# each with at most one leading space; whitespace runs on their own. Nothing is dropped,
# so concatenating the words gives back the text. A symbol is never grouped with another
# symbol, so no word starts with "##" (keeps WordPiece decoding exact) and no word can
# spell a byte token like "<0x41>" (keeps Unigram byte fallback exact). Runs are cut at
# 64 characters so no word reaches WordPiece's 100-character limit (e.g. Chinese text).
PIECE_PATTERN = r" ?\p{L}{1,64}| ?\p{N}{1,64}| ?[^\s\p{L}\p{N}]|\s{1,64}(?!\S)|\s{1,64}"
# Smallest sensible vocab per kind: specials (+ unk) + the 256 bytes for byte-based kinds.
MIN_VOCAB_SIZE = {"bpe": len(SPECIAL_TOKENS) + 256, "char": len(SPECIAL_TOKENS) + 256,
                  "wordpiece": len(SPECIAL_TOKENS) + 1 + 32, "unigram": len(SPECIAL_TOKENS) + 1 + 256 + 32}


def train_tokenizer(
    input: str | Path,
    out: str | Path,
    kind: str = "bpe",
    vocab_size: int | None = None,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a `kind` tokenizer on the documents under `input`; write out/tokenizer.json + summary.json.

    `vocab_size` includes the special tokens (default 8192). For `char` it is optional: by
    default every character seen becomes a token; if given, only the most frequent
    characters that fit are kept (the rest use byte fallback). An `input` with train/ and
    val/ subdirs is trained on train/ only.
    """
    if kind not in KINDS:
        raise UserError(f"tokenizer kind {kind!r} is not one of {', '.join(KINDS)}; pick one of them")
    if vocab_size is None and kind != "char":
        vocab_size = DEFAULT_VOCAB_SIZE
    if vocab_size is not None and vocab_size < MIN_VOCAB_SIZE[kind]:
        raise UserError(
            f"vocab_size {vocab_size} is too small for a {kind} tokenizer; use at least {MIN_VOCAB_SIZE[kind]}"
        )
    if min_frequency < 1:
        raise UserError(f"min_frequency must be >= 1, got {min_frequency}")

    # A corpus already split into train/ and val/ trains the tokenizer on train/ only, so
    # nothing about the held-out text leaks into the vocabulary.
    splits = list_splits(input)
    source = splits["train"] if splits else Path(input)
    stats = {"documents": 0, "chars": 0}

    def texts() -> Iterator[str]:
        for doc in iter_documents(source):
            stats["documents"] += 1
            stats["chars"] += len(doc.text)
            yield doc.text

    start = time.perf_counter()
    builders = {"bpe": _train_bpe, "char": _build_char, "wordpiece": _train_wordpiece, "unigram": _train_unigram}
    backend = builders[kind](texts(), vocab_size, min_frequency)
    tokenizer = Tokenizer(backend, kind=kind)
    seconds = time.perf_counter() - start

    with atomic_dir(out) as tmp:
        tokenizer.save(tmp)
        write_summary(
            tmp,
            "tokenizer train",
            config={"kind": kind, "vocab_size": vocab_size, "min_frequency": min_frequency},
            inputs={"input": source},
            metrics={"kind": kind, "vocab_size": tokenizer.vocab_size, **stats, "seconds": round(seconds, 3)},
            wall_time_s=seconds,
        )
    return tokenizer


def _train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int) -> HFTokenizer:
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, seen or not, so that any string can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tk.train_from_iterator(texts, trainer)
    return tk


def _build_char(texts: Iterator[str], vocab_size: int | None, min_frequency: int) -> HFTokenizer:
    # Counting characters is all the "training" a character tokenizer needs; min_frequency
    # does not apply (every character seen is kept unless vocab_size caps them).
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    chars = sorted(counts, key=lambda c: (-counts[c], c))
    if vocab_size is not None:
        chars = chars[: vocab_size - len(SPECIAL_TOKENS) - len(BYTE_TOKENS)]
    tokens = SPECIAL_TOKENS + BYTE_TOKENS + sorted(chars)
    vocab = {token: i for i, token in enumerate(tokens)}
    # A BPE model with no merges is a character lookup; byte_fallback handles the rest.
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens(SPECIAL_TOKENS)
    return tk


def _train_wordpiece(texts: Iterator[str], vocab_size: int, min_frequency: int) -> HFTokenizer:
    tk = HFTokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=100))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    # Strip the "##" continuation prefix and concatenate: the pieces carry their own spaces.
    tk.decoder = decoders.Sequence([decoders.Replace(Regex("^##"), ""), decoders.Fuse()])
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[*SPECIAL_TOKENS, UNK],
        continuing_subword_prefix="##",
        show_progress=True,
    )
    tk.train_from_iterator(texts, trainer)
    _complete_wordpiece_alphabet(tk, vocab_size)
    return tk


def _complete_wordpiece_alphabet(tk: HFTokenizer, vocab_size: int) -> None:
    """Make every character seen in training usable both at the start and inside a word.

    The trainer only adds "##c" for characters it saw inside words (and "c" for ones it saw
    at the start), so e.g. " <" would become <|unk|> if "<" never followed a space in the
    corpus. The missing pieces replace the last (rarest) learned pieces, keeping vocab_size.
    """
    vocab = tk.get_vocab(with_added_tokens=False)
    alphabet = {t.removeprefix("##") for t in vocab if len(t.removeprefix("##")) == 1 and t not in SPECIAL_TOKENS}
    missing = sorted({p for c in alphabet for p in (c, "##" + c)} - set(vocab))
    if not missing:
        return
    by_id = sorted(vocab, key=vocab.get)
    single = alphabet | {"##" + c for c in alphabet}
    # Drop the newest multi-character pieces (never specials or alphabet) to make room.
    room = max(0, len(by_id) + len(missing) - vocab_size)
    droppable = [t for t in reversed(by_id) if t not in single and t not in SPECIAL_TOKENS and t != UNK]
    dropped = set(droppable[:room])
    tokens = [t for t in by_id if t not in dropped] + missing
    tk.model = models.WordPiece(
        vocab={t: i for i, t in enumerate(tokens)}, unk_token=UNK, max_input_chars_per_word=100
    )


def _train_unigram(texts: Iterator[str], vocab_size: int, min_frequency: int) -> HFTokenizer:
    tk = HFTokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - len(BYTE_TOKENS),  # the byte tokens are added below
        special_tokens=[*SPECIAL_TOKENS, UNK],
        unk_token=UNK,
        max_piece_length=16,
        show_progress=True,
    )
    tk.train_from_iterator(texts, trainer)
    # The trainer cannot add byte-fallback tokens, so rebuild the model with them appended.
    # They get the lowest score; the pre-tokenizer guarantees no word spells "<0x41>", so
    # they are reached only through byte fallback for characters not in the vocab.
    model = _model_json(tk)
    pieces = [(piece, score) for piece, score in model["vocab"]]
    known = {piece for piece, _ in pieces}
    lowest = min(score for _, score in pieces)
    pieces += [(byte, lowest) for byte in BYTE_TOKENS if byte not in known]
    tk.model = models.Unigram(pieces, model["unk_id"], byte_fallback=True)
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tk


def _model_json(tk: HFTokenizer) -> dict:
    return json.loads(tk.to_str())["model"]
