"""The interactive `lmforge chat` loop, and one chat reply (`chat_reply`, also `lmforge generate --chat`).

The chat format is the checkpoint's `lmforge.tokenizer.chat.chat_template`, the one SFT trained
on: lmforge's role tokens (inserted by id, never parsed out of text), or the jinja template a
converted model ships. A reply ends at the template's end-of-turn token (`<|end|>`,
`<|im_end|>`, `<|eot_id|>`, ...) or eos. `encode_chat` is importable from here too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from lmforge.infer.generate import generate_text
from lmforge.tokenizer.chat import ROLES, ChatTemplate, chat_template, encode_chat

__all__ = ["ROLES", "chat_loop", "chat_reply", "encode_chat"]


def chat_reply(model: Any, template: ChatTemplate, messages: Sequence[dict[str, str]], *,
               stream: Callable[[str], None] | None = None, **sampling) -> str:
    """The assistant's next reply to `messages`, generated after the template's generation prompt
    and ended by its stop ids (not included in the text)."""
    return generate_text(model, template.tokenizer, template.encode(messages, add_generation_prompt=True),
                         stop_ids=template.stop_ids, stream=stream, **sampling)


def chat_loop(model, tokenizer, *, system: str | None = None, stdin: TextIO | None = None,
              stdout: TextIO | None = None, **sampling) -> None:
    """Read user lines, answer each with the model (streamed), keep the conversation as context.

    Commands: `/reset` clears the history, `/quit` (or end of input) leaves.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    template = chat_template(tokenizer)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            break
        message = line.rstrip("\n")
        if message.strip() == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": message})
        stdout.write("model> ")
        stdout.flush()
        reply = chat_reply(model, template, history, stream=lambda piece: (stdout.write(piece), stdout.flush()),
                           **sampling)
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": reply})
