"""The interactive `lmforge chat` loop, and one chat reply (`chat_reply`, also `lmforge generate --chat`).

The chat format is the checkpoint's `lmforge.tokenizer.chat.chat_template`, the one SFT trained
on: lmforge's role tokens (inserted by id, never parsed out of text), or the jinja template a
converted model ships. A reply ends at the template's end-of-turn token (`<|end|>`,
`<|im_end|>`, `<|eot_id|>`, ...) or eos. `encode_chat` is importable from here too.

Prompting (`lmforge chat --system TEXT|FILE --fewshot FILE`): the system message can be read from
a file (`system_text`), and example exchanges from a JSONL file (`load_fewshot_messages`) open the
conversation, after the system message and before the first user line, through the same chat
template; `/reset` goes back to them. Without these flags the conversation starts empty, as before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from lmforge.errors import UserError
from lmforge.infer.generate import generate_text
from lmforge.tokenizer.chat import ROLES, ChatTemplate, chat_template, encode_chat

__all__ = ["ROLES", "chat_loop", "chat_reply", "encode_chat", "load_fewshot_messages", "system_text"]


def system_text(value: str | None) -> str | None:
    """`--system`: the text itself, or the contents of the file it names (an existing file wins)."""
    if value is None:
        return None
    path = Path(value)
    try:
        is_file = len(value) < 4096 and "\n" not in value and path.is_file()
    except OSError:
        is_file = False
    if not is_file:
        return value
    try:
        return path.read_text(encoding="utf-8").rstrip("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--system {value}: cannot read the file ({type(e).__name__}); give UTF-8 text") from None


def load_fewshot_messages(path: str | Path) -> list[dict[str, str]]:
    """Example exchanges from a JSONL file, in order, as chat messages (user, assistant, user, ...).

    Each line is one exchange: `{"user": "...", "assistant": "..."}`, or `{"messages": [{"role":
    "user", "content": ...}, {"role": "assistant", ...}, ...]}` (user and assistant turns that
    alternate, starting with user and ending with assistant). Anything else is a one-line UserError
    naming file:line.
    """
    from lmforge.data.readers import iter_jsonl_objects

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--fewshot {path} does not exist; give a JSONL file of example exchanges")
    messages: list[dict[str, str]] = []
    for lineno, record in iter_jsonl_objects(path):
        messages += _exchange(record, f"{path}:{lineno}")
    if not messages:
        raise UserError(f"{path}: no example exchanges; write one {{\"user\": ..., \"assistant\": ...}} per line")
    return messages


def _exchange(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    if set(record) == {"user", "assistant"}:
        turns = [{"role": "user", "content": record["user"]}, {"role": "assistant", "content": record["assistant"]}]
    elif set(record) == {"messages"} and isinstance(record["messages"], list):
        turns = record["messages"]
    else:
        raise UserError(f"{where}: an example exchange is {{\"user\": ..., \"assistant\": ...}} or "
                        f"{{\"messages\": [...]}}; got the keys {sorted(record)}")
    for k, turn in enumerate(turns):
        role = "user" if k % 2 == 0 else "assistant"
        if not isinstance(turn, dict) or turn.get("role") != role or set(turn) != {"role", "content"}:
            raise UserError(f"{where}: turn {k + 1} must be {{\"role\": \"{role}\", \"content\": ...}} "
                            "(user and assistant alternate, starting with user)")
        if not isinstance(turn["content"], str) or not turn["content"].strip():
            raise UserError(f"{where}: turn {k + 1} ({role}) needs a non-empty string content")
    if not turns or len(turns) % 2:
        raise UserError(f"{where}: an example exchange must end with the assistant's reply")
    return [dict(turn) for turn in turns]


def chat_reply(model: Any, template: ChatTemplate, messages: Sequence[dict[str, str]], *,
               stream: Callable[[str], None] | None = None, **sampling) -> str:
    """The assistant's next reply to `messages`, generated after the template's generation prompt
    and ended by its stop ids (not included in the text)."""
    return generate_text(model, template.tokenizer, template.encode(messages, add_generation_prompt=True),
                         stop_ids=template.stop_ids, stream=stream, **sampling)


def chat_loop(model, tokenizer, *, system: str | None = None, stdin: TextIO | None = None,
              stdout: TextIO | None = None, fewshot: Sequence[dict[str, str]] | None = None, **sampling) -> None:
    """Read user lines, answer each with the model (streamed), keep the conversation as context.

    `fewshot`: example messages (`load_fewshot_messages`) that open the conversation after the system
    message. Commands: `/reset` clears the history (back to the system message and the examples),
    `/quit` (or end of input) leaves.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    template = chat_template(tokenizer)
    opening: list[dict[str, str]] = ([{"role": "system", "content": system}] if system else []) + list(fewshot or [])
    history = list(opening)
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
            history = list(opening)
            continue
        history.append({"role": "user", "content": message})
        stdout.write("model> ")
        stdout.flush()
        reply = chat_reply(model, template, history, stream=lambda piece: (stdout.write(piece), stdout.flush()),
                           **sampling)
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": reply})
