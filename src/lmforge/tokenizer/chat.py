"""The chat format over the reserved role tokens, shared by `lmforge chat`, SFT and serving.

    <|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

Role tokens are inserted by id, never parsed out of text: a user who types "<|end|>" sends
those characters, not a control token. A pretrained (not yet instruction-tuned) model has
never seen this format; SFT teaches it, learning only what the assistant writes: the
`assistant_mask` of `encode_chat` is 1 on each assistant message's content and the `<|end|>`
that closes it (the model must learn to stop), 0 on role tokens and on everyone else's text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmforge.errors import UserError

ROLES = ("system", "user", "assistant")
END = "<|end|>"


def role_token(role: str) -> str:
    """`<|role|>` of a chat role (system, user or assistant)."""
    if role not in ROLES:
        raise ValueError(f"unknown chat role {role!r}; expected one of {ROLES}")
    return f"<|{role}|>"


def chat_token_id(tokenizer: Any, token: str) -> int:
    """The id of a chat control token; a one-line UserError when the tokenizer lacks it."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        source = getattr(tokenizer, "source", "this tokenizer")
        raise UserError(f"{source} has no {token} token (no chat format); use a tokenizer trained by lmforge")
    return token_id


def chat_stop_ids(tokenizer: Any) -> set[int]:
    """Ids that end an assistant reply: its `<|end|>`, or a role token that starts another turn."""
    return {chat_token_id(tokenizer, t) for t in (END, role_token("user"), role_token("system"))}


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True,
                return_assistant_mask: bool = False) -> list[int] | dict[str, list[int]]:
    """Token ids of a conversation (a list of {"role", "content"}).

    Each message is `<|role|> content <|end|>`; with `add_generation_prompt` the ids end with
    `<|assistant|>`, the start of the reply to generate. With `return_assistant_mask`, returns
    {"input_ids", "assistant_mask"}: the mask is 1 on the content of every assistant message
    and on the `<|end|>` after it (what SFT trains on), 0 elsewhere.
    """
    end = chat_token_id(tokenizer, END)
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        if not isinstance(m.get("content"), str):
            raise ValueError(f"a chat message needs a string 'content', got {m!r}")
        role = chat_token_id(tokenizer, role_token(m.get("role")))
        content = tokenizer.encode(m["content"])
        ids += [role, *content, end]
        mask += [0] + [int(m["role"] == "assistant")] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(chat_token_id(tokenizer, role_token("assistant")))
        mask.append(0)
    return {"input_ids": ids, "assistant_mask": mask} if return_assistant_mask else ids
