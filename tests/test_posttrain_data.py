"""Post-training data: the JSONL formats read and validated line by line (FILE:LINE errors), the
content-hash split, and the ids/labels every objective trains on."""

import json

import pytest
from train_helpers import write_corpus

from lmforge.errors import UserError
from lmforge.posttrain.data import (
    IGNORE,
    Example,
    Pair,
    encode_example,
    encode_pair,
    read_pairs,
    read_sft,
    split_items,
)
from lmforge.tokenizer import Tokenizer, encode_chat
from lmforge.tokenizer.chat import chat_template
from lmforge.tokenizer.train import train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train_tokenizer(write_corpus(root / "c", docs=4), root / "tok", kind="bpe", vocab_size=320)
    return Tokenizer.load(root / "tok")


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "who?"},
                     {"role": "assistant", "content": "me"}], "id": 7}


def test_the_three_sft_formats(tmp_path):
    chat = read_sft(_write(tmp_path / "chat.jsonl", [CHAT, "", CHAT]))  # blank lines are skipped
    assert len(chat) == 2 and chat[0].messages == CHAT["messages"] and chat[0].where == f"{tmp_path}/chat.jsonl:1"
    assert chat[1].where.endswith(":3") and chat[0].prompt is None and chat[0].key == chat[1].key

    inst = read_sft(_write(tmp_path / "inst.jsonl", [{"instruction": "Add", "input": "2 and 2", "output": "4"},
                                                     {"instruction": "Say hi", "output": "hi"}]))
    assert inst[0].messages == [{"role": "user", "content": "Add\n\n2 and 2"}, {"role": "assistant", "content": "4"}]
    assert inst[1].messages[0] == {"role": "user", "content": "Say hi"}

    pc = read_sft(_write(tmp_path / "pc.jsonl", [{"prompt": "Once", "completion": " upon a time"}]))
    assert (pc[0].messages, pc[0].prompt, pc[0].completion) == (None, "Once", " upon a time")


@pytest.mark.parametrize("line, match", [
    ("{not json", r"bad.jsonl:2: "),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
     r"bad.jsonl:2: message 1 has unknown role 'bot'; use one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
     r"bad.jsonl:2: message 2 is an empty assistant reply"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"bad.jsonl:2: no assistant message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "y"}]}, r"bad.jsonl:2: message 2 is a system message"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, r"message 1 \(user\) needs a string"),
    ({"messages": []}, r"bad.jsonl:2: 'messages' must be a non-empty list"),
    ({"instruction": "x", "output": ""}, r"bad.jsonl:2: .*line 1 is chat; use one format per file"),
    ({"text": "x"}, r"bad.jsonl:2: no known fields \(has text\)"),
    ([1, 2], r"bad.jsonl:2: each line must be a JSON object"),
])
def test_bad_sft_lines_are_one_error_naming_file_and_line(tmp_path, line, match):
    with pytest.raises(UserError, match=match) as e:
        read_sft(_write(tmp_path / "bad.jsonl", [CHAT, line, CHAT]))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("line, match", [
    ({"instruction": "x"}, r"bad.jsonl:1: missing field 'output'"),
    ({"instruction": "x", "output": " "}, r"bad.jsonl:1: an empty output"),
    ({"instruction": "x", "input": 3, "output": "y"}, r"'input' must be a string"),
    ({"prompt": "x", "completion": ""}, r"bad.jsonl:1: an empty completion"),
    ({"prompt": 1, "completion": "y"}, r"'prompt' must be a string, got int"),
])
def test_bad_instruction_and_completion_lines(tmp_path, line, match):
    with pytest.raises(UserError, match=match):
        read_sft(_write(tmp_path / "bad.jsonl", [line]))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match=r"empty.jsonl: no examples"):
        read_sft(tmp_path / "empty.jsonl")


def test_preference_pairs(tmp_path):
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    pairs = read_pairs(_write(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"messages": turns, "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
    ]))
    assert pairs[0].messages == [{"role": "user", "content": "q"}] and (pairs[0].chosen, pairs[0].rejected) == (
        "good", "bad")
    assert pairs[1].messages == turns and pairs[1].chosen == "good" and pairs[1].where.endswith("p.jsonl:2")
    assert pairs[0].key != pairs[1].key


@pytest.mark.parametrize("line, match", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, r"p.jsonl:2: 'chosen' equals 'rejected'"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "a"}, r"'chosen' equals"),
    ({"prompt": "q", "chosen": "a"}, r"p.jsonl:2: missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, r"p.jsonl:2: no 'prompt' or 'messages'"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, r"p.jsonl:2: an empty 'chosen' reply"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, r"exactly one assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, r"p.jsonl:2: the prompt 'messages' end with an assistant message"),
    ({"messages": [{"role": "judge", "content": "q"}], "chosen": "a", "rejected": "b"}, r"unknown role 'judge'"),
])
def test_bad_pairs(tmp_path, line, match):
    with pytest.raises(UserError, match=match):
        read_pairs(_write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, line]))


def test_split_is_by_content_of_the_prompt_side():
    items = [Example([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}], None, None,
                     f"f:{i}", json.dumps([{"content": f"q{i}", "role": "user"}])) for i in range(2000)]
    train, val = split_items(items, "train"), split_items(items, "val")
    assert len(train) + len(val) == 2000 and not {id(x) for x in train} & {id(x) for x in val}
    assert 60 <= len(val) <= 140  # 5% of 2000 = 100, binomial sd ~10
    assert split_items(items[::-1], "val") == val[::-1]  # order does not matter
    assert len(split_items(items, "val", val_fraction=0.5)) > 800 and split_items(items, "val", 0.0) == []
    same = [Pair([{"role": "user", "content": "q"}], "a", f"b{i}", f"f:{i}", "k") for i in range(50)]
    assert len(split_items(same, "train")) in (0, 50)  # one key, one split
    with pytest.raises(ValueError):
        split_items(items, "test")


def test_encode_example_labels_only_replies_and_their_end(tok):
    template = chat_template(tok)
    ex = Example(CHAT["messages"], None, None, "f:1", "k")
    ids, labels = encode_example(template, ex)
    ref = encode_chat(tok, CHAT["messages"], add_generation_prompt=False, return_assistant_mask=True)
    assert ids == ref["input_ids"]
    assert labels == [i if m else IGNORE for i, m in zip(ids, ref["assistant_mask"])]
    end = tok.token_to_id("<|end|>")
    trained = [i for i in labels if i != IGNORE]
    assert trained == [*tok.encode("hello"), end, *tok.encode("me"), end]  # both replies, each with its <|end|>

    ids, labels = encode_example(tok, Example(None, "Once", " upon", "f:2", "k"))  # the tokenizer will do here
    prompt = tok.encode("Once")
    assert ids == [*prompt, *tok.encode(" upon"), tok.eos_id]
    assert labels == [IGNORE] * len(prompt) + [*tok.encode(" upon"), tok.eos_id]


def test_encode_pair_prompt_then_replies(tok):
    template = chat_template(tok)
    pair = Pair([{"role": "user", "content": "q?"}], "yes indeed", "no", "f:1", "k")
    prompt, chosen, rejected = encode_pair(template, pair)
    assert prompt == encode_chat(tok, pair.messages, add_generation_prompt=True)
    for reply, ids in (("yes indeed", chosen), ("no", rejected)):
        whole = encode_chat(tok, [*pair.messages, {"role": "assistant", "content": reply}], add_generation_prompt=False)
        assert prompt + ids == whole and ids[-1] == template.end_id


def test_encode_with_a_jinja_template_names_the_line(tok, tmp_path):
    (tmp_path / "tokenizer.json").write_text(tok.backend.to_str())
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                "{% endif %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|eos|>"}))
    jinja = chat_template(Tokenizer.load(tmp_path))
    ex = Example(CHAT["messages"][1:], None, None, "data.jsonl:4", "k")
    ids, labels = encode_example(jinja, ex)
    trained = [i for i in labels if i != IGNORE]
    assert tok.decode(trained) == "hello<|end|>me<|end|>" and trained[-1] == tok.token_to_id("<|end|>")
    with pytest.raises(UserError, match=r"^data.jsonl:5: .*no system role"):
        encode_example(jinja, Example(CHAT["messages"], None, None, "data.jsonl:5", "k"))
