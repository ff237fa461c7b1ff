"""The chat format over the reserved role tokens, shared by `lmforge chat`, SFT and serving.

    <|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

Role tokens are inserted by id, never parsed out of text: a user who types "<|end|>" sends
those characters, not a control token. A pretrained (not yet instruction-tuned) model has
never seen this format; SFT teaches it, learning only what the assistant writes: the
`assistant_mask` of `encode_chat` is 1 on each assistant message's content and the `<|end|>`
that closes it (the model must learn to stop), 0 on role tokens and on everyone else's text.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
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


# ---- one template for training, chat, generate and serving --------------------------------------

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.43 saves a single template here
# lmforge's own format as a jinja chat template, for `convert to-hf`: transformers' apply_chat_template
# then gives the ids `encode_chat` gives (the role tokens are control tokens of the tokenizer)
LMFORGE_JINJA = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplate:
    """The chat format of one tokenizer: how a conversation becomes ids, and which ids end a reply.

    `encode(messages, add_generation_prompt, return_assistant_mask)` has `encode_chat`'s return
    shapes; `end_id` is the end-of-turn token that closes an assistant reply (trained, so the model
    learns to stop); `stop_ids` end generation; `render` is the text the ids come from (None when
    the format inserts its control tokens by id and has no text form).
    """

    kind = "lmforge"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.end_id = chat_token_id(tokenizer, END)
        self.stop_ids = chat_stop_ids(tokenizer)

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str | None:
        """None: lmforge's role tokens are inserted by id, there is no text that tokenizes to them."""
        return None

    def encode(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True,
               return_assistant_mask: bool = False) -> list[int] | dict[str, list[int]]:
        return encode_chat(self.tokenizer, messages, add_generation_prompt, return_assistant_mask)

    def encode_reply(self, messages: Sequence[dict[str, str]], reply: str) -> tuple[list[int], list[int]]:
        """(prompt ids ending with the generation prompt, reply ids ending with the end-of-turn token):
        what DPO and the reward model score; prompt + reply are the ids of the whole conversation."""
        whole = self.encode([*messages, {"role": "assistant", "content": reply}], add_generation_prompt=False,
                            return_assistant_mask=True)
        ids, mask = whole["input_ids"], whole["assistant_mask"]
        end = max(i for i, m in enumerate(mask) if m) + 1
        prompt = self.encode(messages, add_generation_prompt=True)
        if ids[:len(prompt)] == prompt and len(prompt) < end:
            return prompt, ids[len(prompt):end]
        start = end  # the prompt's tokens merge with the reply's: cut where the reply's mask starts
        while start > 0 and mask[start - 1]:
            start -= 1
        return ids[:start], ids[start:end]


class JinjaChatTemplate(ChatTemplate):
    """A converted model's own chat template (jinja), rendered as transformers' `apply_chat_template`
    renders it and tokenized as it tokenizes the text (control tokens in the template's text are
    parsed; no special tokens added), so the ids are the ones the model was tuned on.

    The assistant mask comes from character spans: each assistant message's content is located in
    the rendered text (by rendering the conversation once more with a marker in its place) and the
    tokens overlapping it, plus the control token that closes the turn (and whitespace before it),
    are marked. Control-token strings inside a message's content stay text (as in lmforge's own
    format; transformers keeps them text only with `sanitize_control_tokens=True`): only then do
    the ids differ from transformers' default, which would parse them.
    """

    kind = "jinja"

    def __init__(self, tokenizer: Any, source: str, special_tokens: dict[str, str], where: str) -> None:
        import tokenizers

        self.tokenizer, self.where, self.special_tokens = tokenizer, where, special_tokens
        self.template = compile_jinja(source, where)
        self._parser = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())  # parses control tokens
        self._parser.encode_special_tokens = False
        self._parser.no_truncation()
        self._parser.no_padding()
        self._control = {t.content: i for i, t in self._parser.get_added_tokens_decoder().items() if t.special}
        self._control_ids = set(self._control.values())
        eos = special_tokens.get("eos_token")
        eos_id = self._control.get(eos) if eos else None
        self.end_id = self._probe_end_id(eos_id)
        self.stop_ids = {self.end_id} | ({eos_id} if eos_id is not None else set())

    def _probe_end_id(self, eos_id: int | None) -> int:
        """The control token that closes an assistant turn in this template (`<|im_end|>`, `<|eot_id|>`, `</s>`)."""
        try:
            out = self.encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                              add_generation_prompt=False, return_assistant_mask=True)
            closing = [i for i, m in zip(out["input_ids"], out["assistant_mask"]) if m and i in self._control_ids]
        except UserError:
            closing = []
        if closing:
            return closing[-1]
        if eos_id is None:
            raise UserError(f"{self.where}: the chat template closes an assistant turn with no control token "
                            "and the tokenizer has no eos_token; fix the template or set eos_token")
        return eos_id

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        import jinja2

        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers does
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise UserError(f"{self.where}: the chat template refused this conversation: {e}") from None

    def encode(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True,
               return_assistant_mask: bool = False) -> list[int] | dict[str, list[int]]:
        text = self.render(messages, add_generation_prompt)
        spans = self.content_spans(messages, text, add_generation_prompt)
        ids, offsets = self._tokenize(text, [s for s in spans if s is not None])
        if not return_assistant_mask:
            return ids
        mask = [0] * len(ids)
        for m, span in zip(messages, spans):
            if m.get("role") == "assistant":
                if span is None:
                    raise UserError(f"{self.where}: cannot find an assistant reply in the rendered chat template "
                                    "(it drops or rewrites the reply); use lmforge's own chat format")
                self._mark_reply(mask, ids, offsets, span, text)
        return {"input_ids": ids, "assistant_mask": mask}

    def content_spans(self, messages: Sequence[dict[str, str]], text: str,
                      add_generation_prompt: bool) -> list[tuple[int, int] | None]:
        """(start, end) of each message's content in `text` as the template wrote it (e.g. trimmed),
        found by rendering once more with a marker in its place: the text after the (last) marker
        is the text after the content. None where the content cannot be located so."""
        spans: list[tuple[int, int] | None] = []
        for i, m in enumerate(messages):
            mark = f"\ue000{i}\ue001"
            probe = self.render([*messages[:i], {**m, "content": mark}, *messages[i + 1:]], add_generation_prompt)
            at = probe.rfind(mark)
            tail = probe[at + len(mark):]
            end = len(text) - len(tail)
            if at < 0 or not text.endswith(tail):
                spans.append(None)
            elif probe.count(mark) == 1 and text[:at] == probe[:at] and end >= at:
                spans.append((at, end))
            else:  # the content also appears elsewhere (e.g. in a tojson dump): find it written as is
                content = m.get("content") or ""
                found = next((c for c in (content, content.strip()) if c and text[:end].endswith(c)), None)
                spans.append((end - len(found), end) if found is not None else None)
        return spans

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of `text` as transformers tokenizes it; control tokens that lie
        inside a message's content are re-encoded as text."""
        enc = self._parser.encode(text, add_special_tokens=False)
        injected = [(s, e) for i, (s, e) in zip(enc.ids, enc.offsets)
                    if i in self._control_ids and any(a <= s and e <= b for a, b in spans)]
        if not injected:
            return list(enc.ids), list(enc.offsets)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        cuts = sorted({0, len(text), *(p for span in spans for p in span)})
        for a, b in zip(cuts, cuts[1:]):
            inside = any(s <= a and b <= e for s, e in spans)
            self._parser.encode_special_tokens = inside
            piece = self._parser.encode(text[a:b], add_special_tokens=False)
            self._parser.encode_special_tokens = False
            ids += piece.ids
            offsets += [(s + a, e + a) for s, e in piece.offsets]
        return ids, offsets

    def _mark_reply(self, mask: list[int], ids: list[int], offsets: list[tuple[int, int]],
                    span: tuple[int, int], text: str) -> None:
        """Mark the tokens overlapping the reply `span`, and after it the control token that closes
        the turn with any whitespace-only tokens before it."""
        start, end = span
        after = []
        for k, (s, e) in enumerate(offsets):
            if e > start and s < end:
                mask[k] = 1
            elif s >= end and e > s:
                after.append(k)
        for k in after:
            s, e = offsets[k]
            if ids[k] in self._control_ids:
                for j in range(after[0], k + 1):
                    mask[j] = 1
                return
            if text[s:e].strip():
                return


def compile_jinja(source: str, where: str = "chat template") -> Any:
    """A jinja2 template compiled as transformers compiles chat templates (see `sandbox`)."""
    import jinja2

    try:
        return sandbox().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{where}: the chat template is not valid jinja (line {e.lineno}: {e.message}); "
                        "fix or remove it") from None


@functools.cache
def sandbox() -> Any:
    """transformers' chat-template environment: an immutable sandbox, trim_blocks and lstrip_blocks,
    loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII and HTML
    characters, `dict`, a `namespace` refusing underscore names, `{% generation %}` blocks."""
    import json
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # `{% generation %}...{% endgeneration %}` renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateDict:  # `dict(...)` and `dict.fromkeys(...)`, nothing else of the type
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=TemplateDict(), namespace=_namespace_type())
    return env


@functools.cache
def _namespace_type() -> type:
    """jinja's `namespace`, refusing underscore attributes (as transformers' sandbox)."""
    import jinja2.utils

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")

    return Namespace


def read_hf_chat_template(directory: str | Path) -> tuple[str | None, dict[str, str], str]:
    """(jinja source or None, special-token strings, where) of a HF tokenizer directory:
    `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template` (a string, or a list
    of named templates: the "default" one); bos_token/eos_token/... from tokenizer_config.json,
    then special_tokens_map.json."""
    directory = Path(directory)
    config_file = directory / TOKENIZER_CONFIG
    config = _read_json(config_file)
    specials: dict[str, str] = {}
    for source in (config, _read_json(directory / "special_tokens_map.json")):
        for name in SPECIAL_TOKEN_NAMES:
            value = source.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and name not in specials:
                specials[name] = value
    jinja_file = directory / TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), specials, str(jinja_file)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise UserError(f"{config_file}: chat_template must be a string or a list of named templates with a "
                        "'default'; fix or remove it")
    return template, specials, f"{config_file} chat_template"


def _read_json(path: Path) -> dict[str, Any]:
    import json

    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); fix or remove it") from None
    return data if isinstance(data, dict) else {}


def chat_template(tokenizer: Any) -> ChatTemplate:
    """The chat format of `tokenizer`: the jinja `chat_template` shipped next to its tokenizer.json
    (a converted model's tokenizer_config.json or chat_template.jinja), else lmforge's role tokens.

    A tokenizer with neither is a one-line UserError (prompt/completion data needs no template).
    """
    source = getattr(tokenizer, "source", None)
    directory = Path(source).parent if source and Path(source).is_file() else None
    if directory is not None:
        template, specials, where = read_hf_chat_template(directory)
        if template is not None and not (template == LMFORGE_JINJA and tokenizer.token_to_id(END) is not None):
            return JinjaChatTemplate(tokenizer, template, specials, where)  # (lmforge's own, back from to-hf: by id)
    if tokenizer.token_to_id(END) is None:
        raise UserError(f"{source or 'this tokenizer'} has no chat format: neither lmforge's role tokens nor a "
                        f"chat_template in {TOKENIZER_CONFIG} next to it; use prompt/completion data, or a model "
                        "that ships a chat template")
    return ChatTemplate(tokenizer)
