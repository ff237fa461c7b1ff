"""`Tokenizer`: a thin wrapper over a HF `tokenizers.Tokenizer` with lmforge's special tokens.

Every kind of tokenizer lmforge trains (bpe, char, wordpiece, unigram) is a plain
`tokenizer.json` that `tokenizers.Tokenizer.from_file` loads; this wrapper adds what the
rest of the stack needs on top: the special-token ids, `encode`/`decode` that never turn
special-token strings found in user text into control tokens, and an HF-like `__call__`
that pads, truncates and joins sentence pairs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from lmforge.errors import UserError
from lmforge.fsutil import atomic_write_text

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Ids 0..6 in every kind, in this order.
SPECIAL_TOKENS = [BOS, EOS, PAD, *CHAT_TOKENS]
# WordPiece and Unigram models need an unknown token; it gets id 7 in those kinds only.
UNK = "<|unk|>"
KINDS = ("bpe", "char", "wordpiece", "unigram")
TOKENIZER_FILE = "tokenizer.json"

# Tokenizers trained elsewhere (BERT, GPT-2, T5, ...) name their specials differently.
_FALLBACK_SPECIALS = {
    BOS: ["<s>", "[CLS]", "<|endoftext|>"],
    EOS: ["</s>", "[SEP]", "<|endoftext|>"],
    PAD: ["<pad>", "[PAD]"],
}


class Tokenizer:
    """Encode/decode text; `kind` is one of bpe|char|wordpiece|unigram (inferred from tokenizer.json)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, kind: str | None = None, source: str | None = None) -> None:
        self._tk = tokenizer
        self.source = source or "this tokenizer"  # for error messages
        # Special-token strings inside user text are data: "<|eos|>" typed by a user must
        # be encoded as ordinary characters, never as a control token (prompt injection).
        # Control tokens are only ever added by id (add_bos/add_eos, chat templates).
        self._tk.encode_special_tokens = True
        # A tokenizer.json saved by HF may carry its own truncation/padding (all-MiniLM-L6-v2's
        # pads and cuts every encoding to 128); this wrapper pads and truncates only when asked
        # (`__call__`), so those settings would silently corrupt `encode`.
        self._tk.no_truncation()
        self._tk.no_padding()
        self.kind = kind or infer_kind(json.loads(tokenizer.to_str()))
        self._special_ids = {name: self._find_special(name) for name in (BOS, EOS, PAD)}

    # ---- loading and saving -------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a directory containing tokenizer.json, or from the file itself."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise UserError(
                f"{file} does not exist; pass a tokenizer directory (train one with `lmforge tokenizer train`)"
            )
        text = file.read_text(encoding="utf-8", errors="replace")
        try:
            tk = tokenizers.Tokenizer.from_str(text)
            kind = infer_kind(json.loads(text))
        except Exception as e:  # the Rust parser raises a bare Exception
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{file}: not a valid tokenizer.json ({msg}); re-create it") from None
        return cls(tk, kind=kind, source=str(file))

    def save(self, directory: str | Path) -> Path:
        """Write `directory/tokenizer.json` (atomically) and return its path."""
        file = Path(directory) / TOKENIZER_FILE
        atomic_write_text(file, self._tk.to_str(pretty=True))
        return file

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (for what this wrapper does not expose)."""
        return self._tk

    # ---- vocabulary -----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._special_id(BOS)

    @property
    def eos_id(self) -> int:
        return self._special_id(EOS)

    @property
    def pad_id(self) -> int:
        return self._special_id(PAD)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(int(token_id))

    def _find_special(self, name: str) -> int | None:
        for candidate in [name, *_FALLBACK_SPECIALS[name]]:
            token_id = self._tk.token_to_id(candidate)
            if token_id is not None:
                return token_id
        return None

    def _special_id(self, name: str) -> int:
        token_id = self._special_ids[name]
        if token_id is None:
            raise UserError(f"{self.source} has no {name} token; use a tokenizer trained by lmforge")
        return token_id

    # ---- encoding and decoding ------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings inside `text` are encoded as plain text."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """Encode many texts at once with the multi-threaded Rust batch encoder."""
        # encode_batch_fast skips computing character offsets we never use (tokenizers >= 0.20).
        encode = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, numpy array or 1-d tensor); decode(encode(x)) == x for bpe/char."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __call__(
        self,
        text: str | list[str],
        text_pair: str | list[str] | None = None,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        """HF-style batch encoding: {"input_ids", "attention_mask", "token_type_ids"}.

        A pair is joined as `A <|eos|> B` (no bos, no trailing eos); token_type_ids are 0 for
        A and the separator, 1 for B. `truncation` needs `max_length` and cuts the longer
        segment first (pairs) or the end (single). `padding`: True/"longest" pads to the
        longest row, "max_length" to `max_length`; padding uses pad_id on the right and
        attention_mask 0. A single str returns flat lists (or tensors with batch size 1).
        """
        single = isinstance(text, str)
        firsts = [text] if single else list(text)
        seconds: list[str] | None = None
        if text_pair is not None:
            seconds = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(seconds) != len(firsts):
                raise ValueError(f"text has {len(firsts)} items but text_pair has {len(seconds)}")
        if truncation and max_length is None:
            raise ValueError("truncation=True needs max_length")
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")

        ids_a = self.encode_batch(firsts)
        ids_b = self.encode_batch(seconds) if seconds is not None else None
        rows, types = [], []
        for i, a in enumerate(ids_a):
            if ids_b is None:
                if truncation:
                    a = a[:max_length]
                rows.append(a)
                types.append([0] * len(a))
                continue
            b = ids_b[i]
            if truncation:
                a, b = _truncate_pair(a, b, max_length - 1)  # one slot for the separator
            rows.append([*a, self.eos_id, *b])
            types.append([0] * (len(a) + 1) + [1] * len(b))
        masks = [[1] * len(r) for r in rows]

        if padding in (True, "longest", "max_length"):
            target = max_length if padding == "max_length" else max((len(r) for r in rows), default=0)
            for r, t, m in zip(rows, types, masks):
                extra = max(0, target - len(r))
                r.extend([self.pad_id] * extra)
                t.extend([0] * extra)
                m.extend([0] * extra)

        out = {"input_ids": rows, "attention_mask": masks, "token_type_ids": types}
        if return_tensors is not None:
            return {k: _to_tensor(v, return_tensors) for k, v in out.items()}
        return {k: v[0] for k, v in out.items()} if single else out

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def infer_kind(tokenizer_json: dict[str, Any]) -> str:
    """bpe|char|wordpiece|unigram from a parsed tokenizer.json.

    No marker is stored: the kind follows from the model. `char` is lmforge's BPE without
    merges and with byte fallback; any other BPE (byte-level or not) is `bpe`.
    """
    model = tokenizer_json.get("model") or {}
    model_type = model.get("type")
    if model_type == "BPE":
        return "char" if model.get("byte_fallback") and not model.get("merges") else "bpe"
    if model_type in ("WordPiece", "Unigram", "WordLevel"):
        return model_type.lower()
    raise ValueError(f"unknown model type {model_type!r}")


def _truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut tokens from the end of the longer segment until both fit in `budget` (HF 'longest_first')."""
    if budget < 0:
        raise ValueError("max_length must be at least 1 for sentence pairs (room for the separator)")
    len_a, len_b = len(a), len(b)
    while len_a + len_b > budget:
        if len_a > len_b:
            len_a -= 1
        else:
            len_b -= 1
    return a[:len_a], b[:len_b]


def _to_tensor(rows: list[list[int]], return_tensors: str) -> Any:
    if len({len(r) for r in rows}) > 1:
        raise ValueError("rows have different lengths; pass padding=True to return tensors")
    if return_tensors == "pt":
        import torch

        return torch.tensor(rows, dtype=torch.long)
    if return_tensors == "np":
        import numpy as np

        return np.array(rows, dtype=np.int64)
    raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
