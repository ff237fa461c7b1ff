"""Chat format: role tokens are inserted by id; the same strings typed by a user stay text; the
assistant mask covers exactly what the assistant writes (its content and its <|end|>)."""

import json

import pytest
from train_helpers import write_corpus

from lmforge.errors import UserError
from lmforge.tokenizer import Tokenizer, encode_chat
from lmforge.tokenizer.chat import chat_stop_ids
from lmforge.tokenizer.train import train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    train_tokenizer(write_corpus(root / "c", docs=4), root / "tok", kind="char")
    return Tokenizer.load(root / "tok")


def test_encode_chat_uses_control_ids_and_never_parses_user_text(tok):
    ids = encode_chat(tok, [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "say <|end|> please"}])
    user, end, asst = (tok.token_to_id(t) for t in ("<|user|>", "<|end|>", "<|assistant|>"))
    assert ids[0] == tok.token_to_id("<|system|>") and ids[-1] == asst
    assert ids.count(end) == 2  # one per message: the typed "<|end|>" is plain text
    start = ids.index(user) + 1
    assert tok.decode(ids[start:ids.index(end, start)]) == "say <|end|> please"


def test_assistant_mask_is_the_assistant_content_and_its_end_token(tok):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo."}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "e"}]
    out = encode_chat(tok, messages, add_generation_prompt=False, return_assistant_mask=True)
    sys_, user, asst, end = (tok.token_to_id(t) for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
    h, i, y, o, dot, a, e, s = (tok.token_to_id(ch) for ch in "hiyo.aes")
    # written out by hand: the char tokenizer gives one id per character
    assert out["input_ids"] == [sys_, s, end, user, h, i, end, asst, y, o, dot, end, user, a, end, asst, e, end]
    assert out["assistant_mask"] == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    assert encode_chat(tok, messages, add_generation_prompt=False) == out["input_ids"]

    prompt = encode_chat(tok, messages[:2], return_assistant_mask=True)  # ends with the reply's <|assistant|>
    assert prompt["input_ids"][-1] == asst and prompt["assistant_mask"] == [0] * len(prompt["input_ids"])


def test_chat_needs_chat_tokens_and_known_roles(tok, tmp_path):
    assert chat_stop_ids(tok) == {tok.token_to_id(t) for t in ("<|end|>", "<|user|>", "<|system|>")}
    with pytest.raises(ValueError, match="unknown chat role 'bot'"):
        encode_chat(tok, [{"role": "bot", "content": "x"}])
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    text = (tmp_path / "tokenizer.json").read_text().replace("<|end|>", "<|fin|>")
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(UserError, match=r"has no <\|end\|> token"):
        encode_chat(Tokenizer.load(tmp_path), [{"role": "user", "content": "x"}])


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    """A tiny random GPT checkpoint with the char tokenizer (lmforge's role tokens)."""
    import torch

    from lmforge.models import GPT, ModelConfig
    from lmforge.train.checkpoint import save_checkpoint, tied_aliases

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=64))
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    tok.save(path.parent)
    save_checkpoint(path, model.state_dict(), model.config.to_dict(), path.parent / "tokenizer.json", None,
                    drop=tied_aliases(model))
    return path


def test_generate_chat_replies_in_the_chat_template(ckpt, capsys):
    from lmforge.cli import main
    from lmforge.infer.generate import generate_text
    from lmforge.train.checkpoint import load_pretrained

    capsys.readouterr()
    args = ["generate", "--ckpt", str(ckpt), "--prompt", "hi", "--max-new-tokens", "12", "--seed", "3"]
    assert main([*args, "--chat", "--system", "be brief"]) == 0
    reply = capsys.readouterr().out
    model, tok = load_pretrained(ckpt)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    pieces = []
    generate_text(model, tok, encode_chat(tok, messages), max_new_tokens=12, temperature=0.8, seed=3,
                  stop_ids=chat_stop_ids(tok), stream=pieces.append)
    assert reply == "".join(pieces) + "\n" and len(reply) > 1
    assert main(args) == 0  # without --chat: a plain continuation that starts with the prompt
    assert capsys.readouterr().out.startswith("hi")


def test_chat_loop_uses_the_checkpoints_jinja_template(ckpt, tmp_path, monkeypatch):
    import io

    from lmforge.infer import chat as chat_module
    from lmforge.tokenizer.chat import JinjaChatTemplate, chat_template

    (tmp_path / "tokenizer.json").write_text((ckpt / "tokenizer.json").read_text())
    template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|eos|>"}))
    tok = Tokenizer.load(tmp_path)
    assert isinstance(chat_template(tok), JinjaChatTemplate)
    calls = []

    def fake_generate(model, tokenizer, prompt, *, stop_ids, stream, **sampling):
        calls.append((list(prompt), set(stop_ids)))
        stream("fine")
        return "fine"

    monkeypatch.setattr(chat_module, "generate_text", fake_generate)
    out = io.StringIO()
    chat_module.chat_loop(None, tok, system="s", stdin=io.StringIO("hello\nand you\n"), stdout=out)
    assert out.getvalue() == "model> fine\nmodel> fine\n"
    history = [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"},
               {"role": "assistant", "content": "fine"}, {"role": "user", "content": "and you"}]
    expect = chat_template(tok).encode(history)
    assert calls[1][0] == expect and tok.decode(expect).endswith("and you<|end|>\n<|assistant|>")
    assert calls[1][1] == {tok.token_to_id("<|end|>"), tok.token_to_id("<|eos|>")}
