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
        bos, eos = self._tk.token_to_id(BOS), self._tk.token_to_id(EOS)  # lmforge's own tokens only
        self._own_template = bert_template(BOS, bos, EOS, eos) if bos is not None and eos is not None else None

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

    def special_id_or_none(self, name: str) -> int | None:
        """The id of special token `name` (BOS, EOS, PAD or a usual spelling of it), or None when the
        tokenizer has none (GPT-2's has no padding token)."""
        return self._special_ids[name]

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

    # ---- batches: the collator ---------------------------------------------------------------

    @property
    def special_template(self) -> Any:
        """The `tokenizers` post-processor that adds special tokens in `__call__`, or None.

        A tokenizer.json whose post-processor adds tokens (an HF BERT's [CLS] A [SEP] B [SEP],
        Llama's <s>, T5's </s>) keeps it, so `__call__` gives what `transformers` gives; lmforge's
        own tokenizers (no such post-processor) get `bert_template` with <|bos|>/<|eos|>, the
        format the mlm objective trains on; any other (GPT-2's) adds nothing, as in transformers.
        """
        existing = self._tk.post_processor
        if existing is not None and existing.num_special_tokens_to_add(True) > 0:
            return existing
        return self._own_template

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """How many special tokens `__call__` adds to a text (pair=False) or a pair."""
        template = self.special_template
        return template.num_special_tokens_to_add(pair) if template is not None else 0

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        padding_side: str = "right",
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        """HF-style encoding of texts or pairs: {"input_ids", "attention_mask", "token_type_ids"}.

        With `add_special_tokens` (the default, as in transformers) a text is wrapped by
        `special_template`: lmforge's tokenizers give `<|bos|> A <|eos|>` and a pair
        `<|bos|> A <|eos|> B <|eos|>` (BERT's [CLS] A [SEP] B [SEP], as the mlm objective
        trains), token_type_ids 0 up to the first separator and 1 after it. `truncation` needs
        `max_length` (which counts the special tokens) and cuts a text's end, or a pair's longer
        segment first (transformers' "longest_first"). `padding`: True/"longest" pads to the
        longest row, "max_length" to `max_length`, with pad_id (attention_mask 0, token type 0)
        on `padding_side`. A single str gives flat lists (tensors get a batch dimension of 1);
        `return_tensors` is None, "pt" or "np".
        """
        single = isinstance(text, str)
        firsts = [text] if single else list(text)
        seconds = None
        if text_pair is not None:
            seconds = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(seconds) != len(firsts):
                raise ValueError(f"text has {len(firsts)} items but text_pair has {len(seconds)}")
        if truncation and max_length is None:
            raise ValueError("truncation=True needs max_length")
        check_padding(padding, max_length, padding_side)
        template = self.special_template if add_special_tokens else None
        budget = None
        if truncation:
            budget = max_length - (template.num_special_tokens_to_add(seconds is not None) if template else 0)
            if budget < 0:
                raise ValueError(f"max_length={max_length} leaves no room for the text besides the special tokens")
        rows, types = self._join(firsts, seconds, template, budget)
        pads = padding in (True, "longest", "max_length")
        out = pad_ids(rows, self.pad_id if pads else 0, padding=padding, max_length=max_length,
                      padding_side=padding_side)
        out["token_type_ids"] = pad_ids(types, 0, padding=padding, max_length=max_length,
                                        padding_side=padding_side)["input_ids"]
        if return_tensors is not None:
            return {k: to_tensor(v, return_tensors) for k, v in out.items()}
        return {k: v[0] for k, v in out.items()} if single else out

    def _join(self, firsts: list[str], seconds: list[str] | None, template: Any,
              budget: int | None) -> tuple[list[list[int]], list[list[int]]]:
        """(ids, token type ids) of each text or pair: truncated to `budget`, then wrapped by `template`."""
        encode = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        enc_a = encode(firsts, add_special_tokens=False)
        enc_b = encode(seconds, add_special_tokens=False) if seconds is not None else [None] * len(enc_a)
        rows, types = [], []
        for a, b in zip(enc_a, enc_b):
            if budget is not None:
                cut_a, cut_b = truncation_lengths(len(a), len(b) if b is not None else None, budget)
                a.truncate(cut_a)
                if b is not None:
                    b.truncate(cut_b)
            if template is not None:
                joined = template.process(a, b, True)
                rows.append(list(joined.ids))
                types.append(list(joined.type_ids))
            else:
                rows.append([*a.ids, *(b.ids if b is not None else [])])
                types.append([0] * len(a) + [1] * (len(b) if b is not None else 0))
        return rows, types

    def pad(self, ids: Sequence[Sequence[int]], *, padding: bool | str = True, max_length: int | None = None,
            padding_side: str = "right", return_tensors: str | None = None,
            pad_value: int | None = None) -> dict[str, Any]:
        """Pad already-tokenized rows: {"input_ids", "attention_mask"} (see `pad_ids`).

        `pad_value` defaults to pad_id; pass another (e.g. -100 for labels) to pad with it.
        """
        return pad_ids(ids, self.pad_id if pad_value is None else pad_value, padding=padding,
                       max_length=max_length, padding_side=padding_side, return_tensors=return_tensors)

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


def bert_template(cls: str, cls_id: int, sep: str, sep_id: int, second_type: int = 1) -> Any:
    """BERT's post-processor over any tokens: `cls A sep`, a pair `cls A sep B sep` (B in `second_type`)."""
    from tokenizers import processors

    return processors.TemplateProcessing(single=f"{cls}:0 $A:0 {sep}:0",
                                         pair=f"{cls}:0 $A:0 {sep}:0 $B:{second_type} {sep}:{second_type}",
                                         special_tokens=[(cls, cls_id), (sep, sep_id)])


def truncation_lengths(len_a: int, len_b: int | None, budget: int) -> tuple[int, int | None]:
    """How many tokens of a text (or of each text of a pair) fit in `budget` tokens.

    A pair is cut as `tokenizers`' "longest_first" cuts it: the longer text gives up tokens
    until both are equal, then both are cut to half the budget (the second one, or the longer,
    keeps the odd token).
    """
    if len_b is None:
        return min(len_a, budget), None
    if len_a + len_b <= budget:
        return len_a, len_b
    short, long_ = sorted((len_a, len_b))
    long_ = short if short > budget else max(short, budget - short)
    if short + long_ > budget:
        short, long_ = budget // 2, budget // 2 + budget % 2
    return (long_, short) if len_a > len_b else (short, long_)


def check_padding(padding: bool | str, max_length: int | None, padding_side: str) -> None:
    if padding not in (False, True, "longest", "max_length", "do_not_pad"):
        raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
    if padding == "max_length" and max_length is None:
        raise ValueError("padding='max_length' needs max_length")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")


def pad_ids(rows: Sequence[Sequence[int]], pad_value: int, *, padding: bool | str = True,
            max_length: int | None = None, padding_side: str = "right",
            return_tensors: str | None = None) -> dict[str, Any]:
    """The collator: rows of ids (lists, arrays or 1-d tensors) padded with `pad_value`.

    {"input_ids", "attention_mask"} (1 on a row's own tokens, 0 on padding). `padding`:
    True/"longest" pads to the longest row, "max_length" to `max_length` (rows already longer
    stay as they are), False leaves rows as they are. `return_tensors`: None (lists), "pt", "np".
    """
    check_padding(padding, max_length, padding_side)
    rows = [r.tolist() if hasattr(r, "tolist") else list(r) for r in rows]
    masks = [[1] * len(r) for r in rows]
    if padding in (True, "longest", "max_length"):
        target = max_length if padding == "max_length" else max((len(r) for r in rows), default=0)
        for i, r in enumerate(rows):
            extra = max(0, target - len(r))
            if padding_side == "right":
                rows[i], masks[i] = [*r, *[pad_value] * extra], [*masks[i], *[0] * extra]
            else:
                rows[i], masks[i] = [*[pad_value] * extra, *r], [*[0] * extra, *masks[i]]
    out = {"input_ids": rows, "attention_mask": masks}
    if return_tensors is not None:
        return {k: to_tensor(v, return_tensors) for k, v in out.items()}
    return out


def to_tensor(rows: list[list[int]], return_tensors: str) -> Any:
    """(rows, width) int64 tensor ("pt") or array ("np") of equally long rows."""
    if len({len(r) for r in rows}) > 1:
        raise ValueError("rows have different lengths; pass padding=True to return tensors")
    if return_tensors == "pt":
        import torch

        return torch.tensor(rows, dtype=torch.long)
    if return_tensors == "np":
        import numpy as np

        return np.array(rows, dtype=np.int64)
    raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
