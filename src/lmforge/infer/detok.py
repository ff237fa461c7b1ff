"""Incremental detokenization: token ids in, text out, never a broken UTF-8 character.

    stream = TextStream(tokenizer, stops=["\\n\\n"])
    for token_id in generated:
        print(stream.push(token_id), end="")    # "" while held back
        if stream.stopped:
            break
    print(stream.finish())                      # stream.text is now the whole reply

Why not `tokenizer.decode(ids)` after every token: byte-level BPE (GPT-2's, lmforge's `bpe`)
has tokens that are single bytes of a multi-byte UTF-8 character (most Chinese characters are
3 bytes, often split over 2-3 tokens), and `decode` turns an incomplete character into U+FFFD.
Decoding the whole reply each time fixes a character once its last byte arrives, but costs
O(reply) per token, and an incomplete character that never completes stays U+FFFD: a small
model often writes a lead byte and then something else, and a reply cut by max_new_tokens or a
stop id may end inside a character. Both printed `�` from `lmforge generate` on a Chinese model.

Here each token id maps once (cached per tokenizer, `token_bytes`) to its bytes, and the bytes
go through Python's incremental UTF-8 decoder: a character is released when its last byte
arrives, bytes that can never form a character (an incomplete sequence followed by a byte that
does not continue it, a stray continuation byte) are dropped, and at the end an incomplete
tail is dropped. For valid UTF-8 the text equals `tokenizer.decode(ids)`; otherwise it equals
that decode with its U+FFFD replacement characters removed (same maximal-subpart rule). That
covers tokenizers whose decode is the concatenation of their tokens' bytes: a `ByteLevel`
decoder (GPT-2, Qwen, lmforge's `bpe`) and byte fallback fused (`<0xE4>` tokens: lmforge's
`char` and `unigram`). Any other tokenizer (SentencePiece's `▁` with a stripped leading
space, WordPiece's `##`, or any object with just `decode`) goes through a window instead, as
vLLM detokenizes: decode the ids since the last emitted chunk, with and without the new ones,
emit the difference unless it ends in U+FFFD (a character not yet complete; at most
`MAX_PENDING` tokens are held); there U+FFFD characters are removed from what is emitted.

Stop strings: text that could be the start of a stop string is held back until it is known not
to be one; when one appears, `stopped` turns True and the text ends just before it.
"""

from __future__ import annotations

import codecs
import json
import weakref
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["MAX_PENDING", "TextStream", "TokenBytes", "first_stop", "held_back", "token_bytes", "token_text"]

REPLACEMENT = "\ufffd"
MAX_PENDING = 8  # tokens a window decoder holds back for one character (4 UTF-8 bytes, with room)


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest of the stop strings starts in text (None if none occurs)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of text might be the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's ByteLevel alphabet: the printable character that stands for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


BYTE_LEVEL_CHARS = _byte_level_chars()
_BYTE_FALLBACK_DECODER = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}


class TokenBytes:
    """Each token id's bytes (computed once per id) for a `tokenizers` backend whose decode is the
    concatenation of its tokens' bytes: `byte_level` (ByteLevel alphabet) or byte fallback (`<0xNN>`).
    Added tokens (specials) are their text; an id the tokenizer does not have is no bytes (as decode skips it)."""

    def __init__(self, backend: Any, byte_level: bool) -> None:
        self.backend, self.byte_level = backend, byte_level
        self.added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        got = self._cache.get(token_id)
        if got is None:
            got = self._cache[token_id] = self._bytes_of(token_id)
        return got

    def _bytes_of(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        token = self.backend.id_to_token(token_id)
        if token is None:
            return b""
        if self.byte_level:
            if all(c in BYTE_LEVEL_CHARS for c in token):
                return bytes(BYTE_LEVEL_CHARS[c] for c in token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        return token.encode("utf-8")


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_bytes(tokenizer: Any) -> TokenBytes | None:
    """The `TokenBytes` of a tokenizer whose decode concatenates token bytes (an lmforge `Tokenizer`, or a
    `tokenizers.Tokenizer`, with a ByteLevel decoder or a fused byte fallback), cached per tokenizer;
    None for any other (use a decode window)."""
    try:
        return _TABLES[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend", tokenizer)
    table = None
    if hasattr(backend, "to_str") and hasattr(backend, "get_added_tokens_decoder"):
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        if decoder.get("type") == "ByteLevel":
            table = TokenBytes(backend, byte_level=True)
        elif decoder == _BYTE_FALLBACK_DECODER:
            table = TokenBytes(backend, byte_level=False)
    try:
        _TABLES[tokenizer] = table
    except TypeError:  # not weak-referenceable: no cache
        pass
    return table


def token_text(tokenizer: Any, token_id: int) -> tuple[str, bytes]:
    """One token's (text, UTF-8 bytes) as OpenAI's logprobs show it: bytes that are not a whole
    character are written as escapes (`\\xe4`) in the text."""
    table = token_bytes(tokenizer)
    raw = table(token_id) if table is not None else tokenizer.decode([token_id]).encode("utf-8")
    return raw.decode("utf-8", errors="backslashreplace"), raw


class _ByteDecoder:
    """Token bytes through an incremental UTF-8 decoder that drops what can never be a character."""

    def __init__(self, table: TokenBytes) -> None:
        self.table = table
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.table(token_id))

    def finish(self) -> str:
        return self.utf8.decode(b"", final=True)


class _WindowDecoder:
    """vLLM's prefix/read offsets: ids[:read] were emitted already (the context that makes a
    decoder's joins right), ids[read:] are new; the window restarts after each emitted chunk."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        after = self.decode(self.ids)
        if after.endswith(REPLACEMENT) and len(self.ids) - self.read < MAX_PENDING:
            return ""
        return self._emit(after)

    def finish(self) -> str:
        return self._emit(self.decode(self.ids)) if len(self.ids) > self.read else ""

    def _emit(self, after: str) -> str:
        before = self.decode(self.ids[:self.read]) if self.read else ""
        piece = after[len(before):]
        self.ids = self.ids[self.read:]
        self.read = len(self.ids)
        return piece.replace(REPLACEMENT, "")


class TextStream:
    """Token ids in, final text out: never a broken UTF-8 character (byte-level tokens that end
    mid-character are held back until it completes; at the end an incomplete tail is dropped),
    text that could be the start of a stop string held back until known not to be one.

    `push(id)` returns the new final text ("" while held back), `finish()` the rest (call once,
    at the end); `text` is all final text so far, `stopped` whether a stop string appeared (the
    text ends before it; push then returns ""). O(new tokens) per push (see the module doc)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        table = token_bytes(tokenizer)
        self._decoder = _ByteDecoder(table) if table is not None else _WindowDecoder(tokenizer.decode)
        self._parts: list[str] = []
        self._pending = ""  # decoded, held back: might start a stop string
        self.stopped = False
        self._finished = False

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def push(self, token_id: int) -> str:
        if self.stopped or self._finished:
            return ""
        return self._release(self._decoder.push(int(token_id)), final=False)

    def finish(self) -> str:
        if self.stopped or self._finished:
            return ""
        self._finished = True
        return self._release(self._decoder.finish(), final=True)

    def _release(self, piece: str, final: bool) -> str:
        if not piece and (not final or not self._pending):
            return ""
        pending = self._pending + piece
        cut = first_stop(pending, self.stops) if self.stops else None
        if cut is not None:
            out, self._pending, self.stopped = pending[:cut], "", True
        else:
            keep = 0 if final else held_back(pending, self.stops)
            out, self._pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        if out:
            self._parts.append(out)
        return out
