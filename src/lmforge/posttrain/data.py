"""Post-training data: the JSONL formats, validated line by line, and their ids and labels.

One example per line, one format per file:

- chat:        {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
               (multi-turn; the loss is on every assistant message and the end-of-turn token after it);
- instruction: {"instruction": "...", "input": "..." (optional), "output": "..."}
               (becomes user = instruction [+ "\\n\\n" + input], assistant = output);
- prompt/completion: {"prompt": "...", "completion": "..."} (plain text, no chat template;
               the loss is on the completion and the eos token after it);
- preference pairs (`read_pairs`): {"prompt": "..." or "messages": [prompt turns], "chosen": ..., "rejected": ...}
               where chosen/rejected are strings or trl-style lists of one assistant message.

Every line is checked before anything trains: a line that is not JSON, a missing field, an
unknown role, an empty assistant reply, chosen == rejected, a file mixing formats are each one
`UserError("FILE:LINE: what is wrong; what to do")`. Other keys on a line (ids, tags) are ignored.

The split key (`Example.key`, `Pair.key`) is the prompt side of an example (every message but
the assistant replies, or the prompt text), so examples that share a question share a split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.readers import iter_jsonl_objects
from lmforge.data.split import assign_split
from lmforge.errors import UserError
from lmforge.tokenizer.tok import EOS

ROLES = ("system", "user", "assistant")
IGNORE = -100  # label of a position without loss
FORMATS = "chat {'messages': [...]}, instruction {'instruction', 'output'} or {'prompt', 'completion'}"


@dataclass
class Example:
    """One SFT example: `messages` (chat and instruction lines) or `prompt` + `completion`."""

    messages: list[dict] | None
    prompt: str | None
    completion: str | None
    where: str  # "file:line"
    key: str  # content key of the prompt side, for the train/val split


@dataclass
class Pair:
    """One preference pair: the prompt turns (a `prompt` string is one user turn) and two replies."""

    messages: list[dict]
    chosen: str
    rejected: str
    where: str
    key: str


# ---- reading ------------------------------------------------------------------------------------


def read_sft(path: str | Path) -> list[Example]:
    """Every example of an SFT JSONL file (chat, instruction or prompt/completion, one format per file)."""
    examples, first = [], None
    for lineno, record in iter_jsonl_objects(path):
        where = f"{path}:{lineno}"
        kind = sft_format(record, where)
        if first is None:
            first = (kind, lineno)
        elif kind != first[0]:
            raise UserError(f"{where}: a {kind} line, but line {first[1]} is {first[0]}; use one format per file")
        examples.append(_example(kind, record, where))
    if not examples:
        raise UserError(f"{path}: no examples; write one JSON object per line ({FORMATS})")
    return examples


def sft_format(record: dict[str, Any], where: str) -> str:
    """"chat", "instruction" or "prompt/completion": which format a line is in."""
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "prompt" in record or "completion" in record:
        return "prompt/completion"
    keys = ", ".join(sorted(record)) or "none"
    raise UserError(f"{where}: no known fields (has {keys}); write {FORMATS}")


def _example(kind: str, record: dict[str, Any], where: str) -> Example:
    if kind == "chat":
        messages = check_messages(record.get("messages"), where, need_reply=True)
        return Example(messages, None, None, where, _key([m for m in messages if m["role"] != "assistant"]))
    if kind == "instruction":
        instruction = _text(record, "instruction", where)
        output = _text(record, "output", where, what="an empty output (the reply to train on)")
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise UserError(f"{where}: 'input' must be a string, got {type(extra).__name__}; fix the line")
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Example(messages, None, None, where, _key(messages[:1]))
    prompt = _text(record, "prompt", where, allow_empty=True)
    completion = _text(record, "completion", where, what="an empty completion (the text to train on)")
    return Example(None, prompt, completion, where, _key(prompt))


def read_pairs(path: str | Path) -> list[Pair]:
    """Every preference pair of a JSONL file: {"prompt" or "messages", "chosen", "rejected"}."""
    pairs = []
    for lineno, record in iter_jsonl_objects(path):
        pairs.append(_pair(record, f"{path}:{lineno}"))
    if not pairs:
        raise UserError(f"{path}: no preference pairs; write one JSON object per line with 'prompt' (or "
                        "'messages'), 'chosen' and 'rejected'")
    return pairs


def _pair(record: dict[str, Any], where: str) -> Pair:
    if "messages" in record:
        messages = check_messages(record["messages"], where, need_reply=False)
        if messages[-1]["role"] == "assistant":
            raise UserError(f"{where}: the prompt 'messages' end with an assistant message; end them with the user "
                            "turn that chosen/rejected answer")
    elif "prompt" in record:
        messages = [{"role": "user", "content": _text(record, "prompt", where)}]
    else:
        raise UserError(f"{where}: no 'prompt' or 'messages' (the prompt of the pair); add one")
    chosen, rejected = _reply(record, "chosen", where), _reply(record, "rejected", where)
    if chosen == rejected:
        raise UserError(f"{where}: 'chosen' equals 'rejected'; a preference pair needs two different replies")
    return Pair(messages, chosen, rejected, where, _key(messages))


def _reply(record: dict[str, Any], name: str, where: str) -> str:
    """A reply given as a string or as a trl-style list of one assistant message."""
    value = record.get(name)
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise UserError(f"{where}: '{name}' as a list must hold exactly one assistant message "
                            "[{\"role\": \"assistant\", \"content\": ...}]; or give the reply as a string")
        value = value[0].get("content")
        record = {name: value}
    return _text(record, name, where, what=f"an empty '{name}' reply")


def check_messages(messages: Any, where: str, *, need_reply: bool) -> list[dict[str, str]]:
    """Validated chat messages ({"role", "content"} copies): known roles, string contents, a system
    message only first, non-empty assistant replies, at least one reply when `need_reply`."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            raise UserError(f"{where}: message {i} is not an object; write {{\"role\": ..., \"content\": ...}}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{where}: message {i} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if role == "system" and i > 1:
            raise UserError(f"{where}: message {i} is a system message; only the first message may be one")
        if not isinstance(content, str):
            raise UserError(f"{where}: message {i} ({role}) needs a string 'content'; fix the line")
        if role == "assistant" and not content.strip():
            raise UserError(f"{where}: message {i} is an empty assistant reply; write the reply or drop the line")
        out.append({"role": role, "content": content})
    if need_reply and not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: no assistant message (nothing to train on); add the assistant's reply")
    return out


def _text(record: dict[str, Any], name: str, where: str, *, what: str | None = None,
          allow_empty: bool = False) -> str:
    value = record.get(name)
    if value is None:
        raise UserError(f"{where}: missing field '{name}'; add it")
    if not isinstance(value, str):
        raise UserError(f"{where}: '{name}' must be a string, got {type(value).__name__}; fix the line")
    if not allow_empty and not value.strip():
        raise UserError(f"{where}: {what or f'an empty {name!r}'}; write it or drop the line")
    return value


def _key(content: Any) -> str:
    return json.dumps(content, ensure_ascii=False, sort_keys=True)


def split_items(items: Sequence[Any], split: str, val_fraction: float = 0.05) -> list[Any]:
    """The items (Examples or Pairs) of `split` ("train" or "val"): a content hash of `.key` puts
    `val_fraction` of the keys in val, the same on every machine and for every file order."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    want = 0 if split == "train" else 1
    return [it for it in items if assign_split(it.key, (1.0 - val_fraction, val_fraction))[0] == want]


# ---- encoding -----------------------------------------------------------------------------------


def encode_example(template: Any, example: Example) -> tuple[list[int], list[int]]:
    """(ids, labels) of an example: labels are the ids on assistant content and the end-of-turn
    token after each reply (chat), or on the completion and eos (prompt/completion), -100 elsewhere.

    `template` is a `lmforge.tokenizer.chat.ChatTemplate`; for prompt/completion data (no
    template used) the tokenizer itself will do.
    """
    tokenizer = getattr(template, "tokenizer", template)
    if example.messages is None:
        eos = tokenizer.special_id_or_none(EOS)
        if eos is None and getattr(template, "special_tokens", {}).get("eos_token"):  # a converted model's eos
            eos = tokenizer.token_to_id(template.special_tokens["eos_token"])
        if eos is None:
            raise UserError(f"{example.where}: {tokenizer.source} has no end-of-sequence token to end the "
                            "completion with; use chat data with the model's chat template")
        prompt, completion = tokenizer.encode(example.prompt), [*tokenizer.encode(example.completion), eos]
        return prompt + completion, [IGNORE] * len(prompt) + completion
    if not hasattr(template, "encode_reply"):
        raise TypeError("chat examples need a ChatTemplate (lmforge.tokenizer.chat.chat_template(tokenizer))")
    try:
        out = template.encode(example.messages, add_generation_prompt=False, return_assistant_mask=True)
    except UserError as e:
        raise UserError(f"{example.where}: {e}") from None
    ids = out["input_ids"]
    return ids, [i if m else IGNORE for i, m in zip(ids, out["assistant_mask"])]


def encode_pair(template: Any, pair: Pair) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids ending with the generation prompt, chosen ids, rejected ids), each reply ending
    with the end-of-turn token; prompt + reply are the ids of the whole conversation."""
    try:
        prompt, chosen = template.encode_reply(pair.messages, pair.chosen)
        prompt_r, rejected = template.encode_reply(pair.messages, pair.rejected)
    except UserError as e:
        raise UserError(f"{pair.where}: {e}") from None
    if prompt_r != prompt:
        raise UserError(f"{pair.where}: the chat template tokenizes the prompt differently before 'chosen' and "
                        "'rejected'; use lmforge's own chat format for this data")
    return prompt, chosen, rejected
