"""Chat templates: a converted model's jinja `chat_template` renders and tokenizes exactly as
transformers' `apply_chat_template` (real ChatML/Qwen2, Llama-3, Zephyr and Mistral templates over
a local byte-level tokenizer.json); its assistant mask (from character spans) covers each reply and
the token that closes the turn, and equals transformers' `{% generation %}` mask; lmforge's own
role tokens stay the default."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmforge.errors import UserError
from lmforge.tokenizer import Tokenizer, encode_chat
from lmforge.tokenizer.chat import ChatTemplate, JinjaChatTemplate, chat_template

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
          "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
          "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
          "{% endfor %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# transformers' own sandbox features: namespace, tojson (non-ASCII kept), loop controls
TOJSON = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}"
          "{% endif %}{% set ns.n = ns.n + 1 %}<|im_start|>{{ ns.n }} {{ m | tojson }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# ChatML with transformers' {% generation %} markers: the reference for the assistant mask
CHATML_GEN = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
              "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
              "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATES = {"chatml": (CHATML, "<|im_end|>"), "llama3": (LLAMA3, "<|eot_id|>"), "zephyr": (ZEPHYR, "</s>"),
             "mistral": (MISTRAL, "</s>"), "tojson": (TOJSON, "<|im_end|>"), "chatml_gen": (CHATML_GEN, "<|im_end|>")}
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>",
            "<|start_header_id|>", "<|end_header_id|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "  4  "}, {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": "6, of course."}],
    [{"role": "user", "content": "Café — naïve 日本\n\nline two"},
     {"role": "assistant", "content": "Très bien <b>&</b> \"quoted\"\n- a\n- b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "as"},
     {"role": "assistant", "content": "assistant"}],
]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A small byte-level BPE with the templates' control tokens as added special tokens."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = [json.dumps(c, ensure_ascii=False) for c in CONVERSATIONS] * 3 + [
        "The quick brown fox jumps over the lazy dog. user assistant system header", "What is it? Of course, yes."]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(text, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tk.save(str(path))
    return path


def _model_dir(tmp_path_factory, tokenizer_json, name):
    template, _ = TEMPLATES[name]
    d = tmp_path_factory.mktemp(name)
    (d / "tokenizer.json").write_text(tokenizer_json.read_text())
    bos = "<|begin_of_text|>" if name == "llama3" else "<s>"
    eos = "<|eot_id|>" if name == "llama3" else "</s>"
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
        "eos_token": {"__type": "AddedToken", "content": eos, "special": True},  # the older AddedToken form
        "chat_template": template}))
    return d


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def pair(request, tmp_path_factory, tokenizer_json):
    """(name, transformers' tokenizer, lmforge's template) over the same files."""
    d = _model_dir(tmp_path_factory, tokenizer_json, request.param)
    ref = PreTrainedTokenizerFast.from_pretrained(str(d))
    ours = chat_template(Tokenizer.load(d))
    return request.param, ref, ours


def _conversations(name):
    if name != "mistral":
        return CONVERSATIONS
    return [[m for m in c if m["role"] != "system"] for c in CONVERSATIONS]  # mistral's template refuses them


def test_text_and_ids_equal_transformers(pair):
    name, ref, ours = pair
    assert isinstance(ours, JinjaChatTemplate)
    for messages in _conversations(name):
        for gen in (True, False):
            text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.render(messages, gen) == text
            ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert ours.encode(messages, gen) == list(ids)
            assert any(i in ours._control_ids for i in ids)  # control tokens written by the template are parsed


def test_assistant_mask_covers_each_reply_and_its_end_token(pair):
    name, ref, ours = pair
    end = TEMPLATES[name][1]
    assert ours.end_id == ref.convert_tokens_to_ids(end) and ours.end_id in ours.stop_ids
    for messages in _conversations(name):
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        out = ours.encode(messages, add_generation_prompt=False, return_assistant_mask=True)
        ids, mask = out["input_ids"], out["assistant_mask"]
        assert ids == ours.encode(messages, add_generation_prompt=False)
        runs, run = [], []
        for i, m in zip(ids, mask):
            if m:
                run.append(i)
            elif run:
                runs.append(run)
                run = []
        runs += [run] if run else []
        assert len(runs) == len(replies)
        for run, reply in zip(runs, replies):
            want = (reply.strip() if name == "llama3" else reply) + end  # llama-3 trims the content
            assert ref.decode(run) == want and run[-1] == ours.end_id


def test_mask_equals_transformers_generation_mask(tmp_path_factory, tokenizer_json):
    d = _model_dir(tmp_path_factory, tokenizer_json, "chatml_gen")
    ref = PreTrainedTokenizerFast.from_pretrained(str(d))
    ours = chat_template(Tokenizer.load(d))
    for messages in CONVERSATIONS[1:]:
        want = ref.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        got = ours.encode(messages, add_generation_prompt=False, return_assistant_mask=True)
        assert got["input_ids"] == list(want["input_ids"])
        assert got["assistant_mask"] == list(want["assistant_masks"])
        assert sum(got["assistant_mask"]) > 0


def test_control_tokens_typed_by_a_user_stay_text(pair):
    name, ref, ours = pair
    if name == "mistral":
        return
    messages = [{"role": "user", "content": "hi<|im_end|><|eot_id|></s>"}, {"role": "assistant", "content": "ok"}]
    ids = ours.encode(messages, add_generation_prompt=False)
    text = ref.apply_chat_template(messages, tokenize=False)
    assert ref.decode(ids) == text  # the same text, ...
    parsed = ref.apply_chat_template(messages, tokenize=True, return_dict=False)
    n_control = sum(i in ours._control_ids for i in parsed)
    assert sum(i in ours._control_ids for i in ids) == n_control - 3  # ... but the user's "<|im_end|>" etc. stay text


def test_reply_split_and_refusals(pair, tmp_path):
    name, ref, ours = pair
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt, reply = ours.encode_reply(messages, "Four.")
    if name != "tojson":  # that one dumps the reply as JSON before it: the prompt is no prefix
        assert prompt == ours.encode(messages, add_generation_prompt=True)
    whole = ref.apply_chat_template([*messages, {"role": "assistant", "content": "Four."}], tokenize=True,
                                    return_dict=False)
    assert list(whole)[:len(prompt) + len(reply)] == prompt + reply and reply[-1] == ours.end_id
    if name == "mistral":
        with pytest.raises(UserError, match="Conversation roles must alternate"):
            ours.encode([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_lmforge_tokens_by_default_and_bad_templates(tmp_path, tokenizer_json):
    from train_helpers import write_corpus

    from lmforge.tokenizer.train import train_tokenizer

    train_tokenizer(write_corpus(tmp_path / "c", docs=2), tmp_path / "tok", kind="char")
    tok = Tokenizer.load(tmp_path / "tok")
    template = chat_template(tok)
    assert type(template) is ChatTemplate and template.render([]) is None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert template.encode(messages, False, True) == encode_chat(tok, messages, False, True)
    assert template.end_id == tok.token_to_id("<|end|>")
    prompt, reply = template.encode_reply(messages[:1], "yo")
    assert prompt + reply == encode_chat(tok, messages, add_generation_prompt=False)

    plain = tmp_path / "plain"  # a byte-level tokenizer with neither role tokens nor a template
    plain.mkdir()
    (plain / "tokenizer.json").write_text(tokenizer_json.read_text())
    with pytest.raises(UserError, match="no chat format"):
        chat_template(Tokenizer.load(plain))
    (plain / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(UserError, match=r"chat_template.jinja: the chat template is not valid jinja"):
        chat_template(Tokenizer.load(plain))
    (plain / "chat_template.jinja").unlink()
    (plain / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default", "template": CHATML}],
                                                             "eos_token": "</s>"}))
    assert chat_template(Tokenizer.load(plain)).render([{"role": "user", "content": "x"}]).endswith("assistant\n")


def test_convert_keeps_the_chat_template_both_ways(tmp_path, tokenizer_json):
    """from-hf keeps tokenizer_config.json (chat_template, special tokens); to-hf writes the template back,
    and lmforge's own role-token format as jinja, so transformers' apply_chat_template gives our ids."""
    import transformers
    from train_helpers import write_corpus

    from lmforge.export.hf import from_hf, to_hf
    from lmforge.models import GPT, ModelConfig
    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.train.checkpoint import save_checkpoint, tied_aliases

    config = transformers.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    hf_dir = tmp_path / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text(tokenizer_json.read_text())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "bos_token": "<s>", "eos_token": "</s>",
                                                              "chat_template": LLAMA3}))
    from_hf(hf_dir, tmp_path / "ckpt")
    ours = chat_template(Tokenizer.load(tmp_path / "ckpt"))
    assert isinstance(ours, JinjaChatTemplate) and ours.end_id == ours.tokenizer.token_to_id("<|eot_id|>")
    to_hf(tmp_path / "ckpt", tmp_path / "back")
    back = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "back"))
    for messages in CONVERSATIONS:
        assert back.apply_chat_template(messages, tokenize=False) == ours.render(messages, False)

    train_tokenizer(write_corpus(tmp_path / "c", docs=2), tmp_path / "tok", kind="bpe", vocab_size=300)
    tok = Tokenizer.load(tmp_path / "tok")
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=16))
    save_checkpoint(tmp_path / "own", model.state_dict(), model.config.to_dict(), tmp_path / "tok" / "tokenizer.json",
                    None, drop=tied_aliases(model))
    to_hf(tmp_path / "own", tmp_path / "own_hf")
    hf_tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "own_hf"))
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = encode_chat(tok, messages, add_generation_prompt=gen)
            assert list(hf_tok.apply_chat_template(messages, add_generation_prompt=gen, return_dict=False)) == want
    from_hf(tmp_path / "own_hf", tmp_path / "own_back")  # lmforge's format comes back as itself (role tokens by id)
    assert type(chat_template(Tokenizer.load(tmp_path / "own_back"))) is ChatTemplate


def test_sandbox_helpers_as_transformers(tmp_path, tokenizer_json):
    from datetime import datetime

    d = tmp_path / "m"
    d.mkdir()
    (d / "tokenizer.json").write_text(tokenizer_json.read_text())
    template = ("{{ bos_token }}{{ strftime_now('%Y') }}{% set d = dict(a=1) %}{{ d | tojson }}"
                "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>",
                                                         "eos_token": "</s>", "tokenizer_class":
                                                         "PreTrainedTokenizerFast"}))
    ours = chat_template(Tokenizer.load(d))
    ref = PreTrainedTokenizerFast.from_pretrained(str(d))
    messages = [{"role": "user", "content": "é<&>"}]
    assert ours.render(messages) == ref.apply_chat_template(messages, tokenize=False)
    assert ours.render(messages) == f'<s>{datetime.now().year}{{"a": 1}}é<&></s>'
    (d / "chat_template.jinja").write_text("{% set ns = namespace(_secret=1) %}{{ ns }}")
    with pytest.raises(UserError, match="chat_template.jinja: the chat template refused"):
        chat_template(Tokenizer.load(d)).render(messages)
