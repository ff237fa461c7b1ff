"""The interactive `lmforge chat` loop.

The chat format itself (role tokens inserted by id, never parsed out of text) is
`lmforge.tokenizer.chat`, which SFT and serving share; `encode_chat` is importable from here
too.
"""

from __future__ import annotations

import sys
from typing import TextIO

from lmforge.infer.generate import generate_text
from lmforge.tokenizer.chat import ROLES, chat_stop_ids, encode_chat

__all__ = ["ROLES", "chat_loop", "encode_chat"]


def chat_loop(model, tokenizer, *, system: str | None = None, stdin: TextIO | None = None,
              stdout: TextIO | None = None, **sampling) -> None:
    """Read user lines, answer each with the model (streamed), keep the conversation as context.

    Commands: `/reset` clears the history, `/quit` (or end of input) leaves.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    stop_ids = chat_stop_ids(tokenizer)
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
        reply = generate_text(model, tokenizer, encode_chat(tokenizer, history), stop_ids=stop_ids,
                              stream=lambda piece: (stdout.write(piece), stdout.flush()), **sampling)
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": reply})
