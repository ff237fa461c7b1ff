"""The chat format over the reserved role tokens, and the interactive `lmforge chat` loop.

    <|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

A pretrained (not yet instruction-tuned) model has never seen this format; SFT teaches it.
"""

from __future__ import annotations

import sys
from typing import TextIO

from lmforge.infer.generate import generate_text


def format_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
    return text + ("<|assistant|>" if add_generation_prompt else "")


def chat_loop(model, tokenizer, *, system: str | None = None, stdin: TextIO = sys.stdin,
              stdout: TextIO = sys.stdout, **sampling) -> None:
    """Read user lines, answer each with the model (streamed), keep the conversation as context.

    Commands: `/reset` clears the history, `/quit` (or end of input) leaves.
    """
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
        reply = generate_text(model, tokenizer, format_chat(history), stop=["<|end|>", "<|user|>"],
                              stream=lambda piece: (stdout.write(piece), stdout.flush()), **sampling)
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": reply})
