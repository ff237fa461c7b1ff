"""The chat format over the reserved role tokens, and the interactive `lmforge chat` loop.

    <|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

Role tokens are inserted by id, never parsed out of text: a user who types "<|end|>" sends
those characters, not a control token. A pretrained (not yet instruction-tuned) model has
never seen this format; SFT teaches it.
"""

from __future__ import annotations

import sys
from typing import TextIO

from lmforge.infer.generate import generate_text

ROLES = ("system", "user", "assistant")


def encode_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation; ends with `<|assistant|>` when a reply is to be generated."""
    end = tokenizer.token_to_id("<|end|>")
    ids: list[int] = []
    for m in messages:
        if m["role"] not in ROLES:
            raise ValueError(f"unknown chat role {m['role']!r}; expected one of {ROLES}")
        ids += [tokenizer.token_to_id(f"<|{m['role']}|>"), *tokenizer.encode(m["content"]), end]
    if add_generation_prompt:
        ids.append(tokenizer.token_to_id("<|assistant|>"))
    return ids


def chat_loop(model, tokenizer, *, system: str | None = None, stdin: TextIO | None = None,
              stdout: TextIO | None = None, **sampling) -> None:
    """Read user lines, answer each with the model (streamed), keep the conversation as context.

    Commands: `/reset` clears the history, `/quit` (or end of input) leaves.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    stop_ids = {tokenizer.token_to_id(t) for t in ("<|end|>", "<|user|>", "<|system|>")}
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
