"""The special tokens objectives need, and the vocabulary they give the model.

Our tokenizers' `<|bos|>` serves as BERT's [CLS] and `<|eos|>` as [SEP]. Tokens an objective
needs that the tokenizer lacks (`<|mask|>`, the span sentinels `<|extra_id_N|>`) are appended to
the run's copy of the tokenizer (`with_tokens`), after every existing id, so the token shards
stay valid and the checkpoint's tokenizer.json knows them.
"""

from __future__ import annotations

import math
from typing import Any

from lmforge.errors import UserError

MASK = "<|mask|>"
MASK_FALLBACKS = ("[MASK]", "<mask>")
NUM_SENTINELS = 100  # as T5


def sentinel(i: int) -> str:
    return f"<|extra_id_{i}|>"


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special (control) tokens."""
    decoder = tokenizer.backend.get_added_tokens_decoder()
    return {i for i, tok in decoder.items() if tok.special}


def find_token(tokenizer: Any, name: str, fallbacks: tuple[str, ...] = ()) -> int:
    for candidate in (name, *fallbacks):
        token_id = tokenizer.token_to_id(candidate)
        if token_id is not None:
            return token_id
    raise UserError(f"{tokenizer.source} has no {name} token; train through `lmforge pretrain`, which adds it")


def with_tokens(tokenizer: Any, names: tuple[str, ...], fallbacks: dict[str, tuple[str, ...]] | None = None) -> bool:
    """Append the special tokens in `names` the tokenizer lacks (after every existing id).

    A token counts as present under a fallback name too ([MASK] for <|mask|>, T5's
    <extra_id_N> for <|extra_id_N|>). Returns whether anything was added.
    """
    from tokenizers import AddedToken

    fallbacks = fallbacks or {}
    missing = [n for n in names
               if all(tokenizer.token_to_id(c) is None for c in (n, *fallbacks.get(n, ())))]
    if missing:
        tokenizer.backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in missing])
    return bool(missing)


def token_fallbacks() -> dict[str, tuple[str, ...]]:
    return {MASK: MASK_FALLBACKS, **{sentinel(i): (f"<extra_id_{i}>",) for i in range(NUM_SENTINELS)}}


def padded_vocab(n: int) -> int:
    return 64 * math.ceil(n / 64)  # a multiple of 64 keeps matmuls aligned
