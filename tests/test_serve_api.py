"""`lmforge serve`'s HTTP API in-process (FastAPI's TestClient, a tiny random GPT and BERT): the
replies are the ones `lmforge generate`/`chat` give (greedy and seeded), logprobs are the model's,
streams carry the same text as whole replies, and every bad request is OpenAI's error shape with
the right status code."""

from __future__ import annotations

import base64
import json
import logging

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from serve_helpers import make_bert_ckpt, make_gpt_ckpt

from lmforge.infer.chat import chat_reply
from lmforge.infer.generate import generate_text
from lmforge.serve.app import create_app
from lmforge.serve.protocol import ServeOptions
from lmforge.tokenizer.chat import chat_template
from lmforge.train.checkpoint import load_pretrained

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the king"}]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_api")
    return make_gpt_ckpt(root), make_bert_ckpt(root)


@pytest.fixture(scope="module")
def loaded(ckpts):
    return load_pretrained(ckpts[0])


@pytest.fixture(scope="module")
def client(ckpts, loaded):
    model, tokenizer = loaded
    with TestClient(create_app(ServeOptions(ckpt=str(ckpts[0]), max_body_bytes=4000), model=model,
                               tokenizer=tokenizer)) as c:
        yield c


def post(client, path, body, **kw):
    return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"}, **kw)


def events(response) -> list:
    """The data of each server-sent event ("[DONE]" stays a string)."""
    out = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_chat_greedy_reply_is_lmforge_chats(client, loaded):
    model, tokenizer = loaded
    r = post(client, "/v1/chat/completions", {"model": "tiny-gpt", "messages": MESSAGES, "temperature": 0,
                                              "max_tokens": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    template = chat_template(tokenizer)
    expected = chat_reply(model, template, MESSAGES, max_new_tokens=20, temperature=0)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny-gpt"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    prompt = template.encode(MESSAGES, add_generation_prompt=True)
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["total_tokens"] == len(prompt) + body["usage"]["completion_tokens"]
    assert 0 < body["usage"]["completion_tokens"] <= 20


def test_completions_n_choices_use_seed_seed_plus_one(client, loaded):
    model, tokenizer = loaded
    r = post(client, "/v1/completions", {"prompt": "the king", "n": 2, "seed": 5, "temperature": 0.9, "top_k": 20,
                                         "top_p": 0.95, "max_tokens": 16})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1]
    for i, choice in enumerate(body["choices"]):
        expected = generate_text(model, tokenizer, "the king", max_new_tokens=16, temperature=0.9, top_k=20,
                                 top_p=0.95, seed=5 + i)
        assert choice["text"] == expected
    assert body["choices"][0]["text"] != body["choices"][1]["text"]
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode("the king"))
    streamed = events(post(client, "/v1/completions", {"prompt": "the king", "n": 2, "seed": 5, "temperature": 0.9,
                                                       "top_k": 20, "top_p": 0.95, "max_tokens": 16, "stream": True}))
    for i, choice in enumerate(body["choices"]):  # the two choices' pieces interleave, each under its index
        pieces = [e["choices"][0]["text"] for e in streamed[:-1] if e["choices"][0]["index"] == i]
        assert "".join(pieces) == choice["text"]


def test_stream_carries_the_same_reply_and_usage_last(client):
    request = {"messages": MESSAGES, "temperature": 0, "max_tokens": 24}
    whole = post(client, "/v1/chat/completions", request).json()
    r = post(client, "/v1/chat/completions", {**request, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    data = events(r)
    assert data[-1] == "[DONE]"
    chunks = data[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == whole["choices"][0]["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert finishes == [whole["choices"][0]["finish_reason"]]


def test_completion_stream_without_usage(client):
    r = post(client, "/v1/completions", {"prompt": "my lord", "temperature": 0, "max_tokens": 10, "stream": True})
    data = events(r)
    whole = post(client, "/v1/completions", {"prompt": "my lord", "temperature": 0, "max_tokens": 10}).json()
    assert data[-1] == "[DONE]" and all("usage" not in c for c in data[:-1])
    assert "".join(c["choices"][0]["text"] for c in data[:-1]) == whole["choices"][0]["text"]


def test_logprobs_are_the_models(client, loaded):
    model, tokenizer = loaded
    template = chat_template(tokenizer)
    prompt = template.encode(MESSAGES, add_generation_prompt=True)
    with torch.no_grad():
        reference = model(torch.tensor([prompt]))[0][0, -1].float().log_softmax(-1)
    best = torch.topk(reference, 3)
    r = post(client, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 0, "max_tokens": 3,
                                              "logprobs": True, "top_logprobs": 3})
    reply = r.json()["choices"][0]
    first = reply["logprobs"]["content"][0]
    assert first["token"] == tokenizer.decode([int(best.indices[0])])
    assert first["logprob"] == pytest.approx(float(best.values[0]), abs=1e-4)
    assert [t["logprob"] for t in first["top_logprobs"]] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert first["top_logprobs"][0]["token"] == first["token"] and first["bytes"] == list(first["token"].encode())
    assert bytes(b for t in reply["logprobs"]["content"] for b in t["bytes"]).decode() == reply["message"]["content"]

    ids = tokenizer.encode("the king")
    with torch.no_grad():
        reference = model(torch.tensor([ids]))[0][0, -1].float().log_softmax(-1)
    r = post(client, "/v1/completions", {"prompt": "the king", "temperature": 0, "max_tokens": 4, "logprobs": 2})
    logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] == pytest.approx(float(reference.max()), abs=1e-4)
    assert len(logprobs["top_logprobs"][0]) <= 2 and logprobs["text_offset"][0] == 0
    assert "".join(logprobs["tokens"]) == r.json()["choices"][0]["text"]  # readable tokens: one char each
    assert logprobs["text_offset"] == list(range(4))


def test_ignore_eos_writes_max_tokens(client, loaded):
    model, tokenizer = loaded
    eos = tokenizer.eos_id
    with torch.no_grad():  # a prompt whose greedy next token is eos: a reply that ends at once
        model.lm_head.weight[eos] += 50 * model.lm_head.weight[tokenizer.token_to_id("k")]
    try:
        ended = post(client, "/v1/completions", {"prompt": "the k", "temperature": 0, "max_tokens": 8}).json()
        ignored = post(client, "/v1/completions", {"prompt": "the k", "temperature": 0, "max_tokens": 8,
                                                   "ignore_eos": True}).json()
    finally:
        with torch.no_grad():
            model.lm_head.weight[eos] -= 50 * model.lm_head.weight[tokenizer.token_to_id("k")]
    assert ended["choices"][0]["finish_reason"] == "stop" and ended["usage"]["completion_tokens"] == 1
    assert ignored["choices"][0]["finish_reason"] == "length" and ignored["usage"]["completion_tokens"] == 8


def test_stop_strings_and_length(client):
    whole = post(client, "/v1/completions", {"prompt": "the king", "temperature": 0, "max_tokens": 30}).json()
    text = whole["choices"][0]["text"]
    assert whole["choices"][0]["finish_reason"] == "length" and len(text) > 8, text
    stop = text[6:8]
    r = post(client, "/v1/completions", {"prompt": "the king", "temperature": 0, "max_tokens": 30,
                                         "stop": [stop, "never seen"]}).json()
    assert r["choices"][0] == {**r["choices"][0], "text": text[:text.index(stop)], "finish_reason": "stop"}
    r = post(client, "/v1/completions", {"prompt": "the king", "temperature": 0, "max_completion_tokens": 4}).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 4


def test_models_health_metrics_and_the_request_log(client, caplog):
    assert client.get("/health").json() == {"status": "ok", "model": "tiny-gpt"}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-gpt"]
    with caplog.at_level(logging.INFO, logger="lmforge.serve"):
        post(client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5})
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "lmforge.serve"]
    record = next(r for r in records if r.get("route") == "/v1/chat/completions")
    assert record["status"] == 200 and record["id"].startswith("chatcmpl-") and record["model"] == "tiny-gpt"
    assert record["prompt_tokens"] > 0 and 0 < record["completion_tokens"] <= 5 and record["e2e_s"] >= 0
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "lmforge:" in metrics.text
    page = client.get("/")  # the chat page: no key, never inside another site's frame
    assert page.status_code == 200 and "<html" in page.text.lower() and page.headers["x-frame-options"] == "DENY"
    assert client.get("/static/chat.js").status_code == 200


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    return error


BAD = [  # body, status, a word the one-line message names
    (b'{"messages": [', 400, "not valid JSON"),
    (b'[1, 2]', 400, "JSON object"),
    (b'{"messages": "\xff\xfe"}', 400, "UTF-8"),
    ({"model": "tiny-gpt"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ({"messages": MESSAGES, "n": 100}, 400, "n:"),
    ({"messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ({"messages": MESSAGES, "temperature": 5}, 400, "temperature"),
    ({"messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    ({"messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ({"messages": MESSAGES, "stop": 5}, 400, "stop"),
    ({"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "the king " * 20}]}, 400, "context"),
    ({"messages": MESSAGES, "model": "gpt-4"}, 404, "gpt-4"),
]


@pytest.mark.parametrize("body,status,word", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_chat_requests(client, body, status, word):
    content = body if isinstance(body, bytes) else json.dumps(body)
    error = error_of(client.post("/v1/chat/completions", content=content), status)
    assert word in error["message"]


def test_bad_completion_and_embedding_requests_and_routes(client):
    assert "prompt" in error_of(post(client, "/v1/completions", {"max_tokens": 3}), 400)["message"]
    assert "prompt" in error_of(post(client, "/v1/completions", {"prompt": "k " * 40}), 400)["message"]
    assert error_of(post(client, "/v1/completions", {"prompt": "a", "model": "x"}), 404)["code"] == "model_not_found"
    assert "embedding" in error_of(post(client, "/v1/embeddings", {"input": "a"}), 400)["message"]
    assert "no such route" in error_of(client.get("/v1/nope"), 404)["message"]
    error_of(client.get("/v1/chat/completions"), 405)


def test_body_limit_by_length_and_by_counting(client):
    big = json.dumps({"messages": MESSAGES, "pad": "x" * 5000})
    assert error_of(client.post("/v1/chat/completions", content=big), 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the server counts while reading
        for _ in range(50):
            yield b" " * 1000

    error_of(client.post("/v1/chat/completions", content=chunked()), 413)
    assert client.get("/health").status_code == 200


def test_queue_full_is_429_with_retry_after(client, monkeypatch):
    from lmforge.serve.scheduler import QueueFull

    def full(request):
        raise QueueFull(2.5)

    monkeypatch.setattr(client.app.state.backend.scheduler, "submit", full)
    r = post(client, "/v1/chat/completions", {"messages": MESSAGES})
    assert error_of(r, 429)["code"] == "queue_full" and r.headers["retry-after"] == "3"


def test_draining_and_loading_are_503(client, ckpts, monkeypatch):
    backend = client.app.state.backend
    monkeypatch.setattr(backend, "draining", True)
    assert error_of(post(client, "/v1/chat/completions", {"messages": MESSAGES}), 503)
    assert client.get("/health").json()["status"] == "draining"
    monkeypatch.undo()

    import threading

    from lmforge.serve.app import Backend
    release = threading.Event()
    monkeypatch.setattr(Backend, "load", lambda self: release.wait(30))
    with TestClient(create_app(ServeOptions(ckpt=str(ckpts[0])))) as loading:
        assert loading.get("/health").status_code == 503 and loading.get("/health").json()["status"] == "loading"
        assert "loading" in error_of(loading.get("/v1/models"), 503)["message"]
        release.set()


def test_api_key_and_cors(ckpts, loaded):
    model, tokenizer = loaded
    options = ServeOptions(ckpt=str(ckpts[0]), api_key="s3cret", cors_origins=["http://page.example"])
    with TestClient(create_app(options, model=model, tokenizer=tokenizer)) as c:
        assert error_of(c.get("/v1/models"), 401)["code"] == "invalid_api_key"
        assert error_of(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert error_of(c.get("/v1/nope", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200  # any case
        assert error_of(c.get("/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
        assert error_of(c.get("/v1/models", headers={"Authorization": "Bearer s3cret2"}), 401)
        assert c.get("/health").status_code == 200  # no key needed outside /v1
        preflight = {"Origin": "http://page.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}
        r = c.options("/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://page.example"
        r = c.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(ServeOptions(ckpt=str(ckpts[0])), model=model, tokenizer=tokenizer)) as c:
        r = c.get("/v1/models", headers={"Origin": "http://page.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # CORS off by default


def test_embeddings_of_an_encoder_and_beside_a_generator(ckpts, loaded):
    bert, bert_tokenizer = load_pretrained(ckpts[1])
    texts = ["the king", "my lord shall speak"]
    expected = []
    for text in texts:
        ids = torch.tensor([[bert_tokenizer.bos_id, *bert_tokenizer.encode(text), bert_tokenizer.eos_id]])
        with torch.no_grad():
            expected.append(torch.nn.functional.normalize(bert.embed(ids), dim=-1)[0].numpy())
    with TestClient(create_app(ServeOptions(ckpt=str(ckpts[1])), model=bert, tokenizer=bert_tokenizer)) as c:
        body = post(c, "/v1/embeddings", {"model": "tiny-bert", "input": texts}).json()
        assert body["object"] == "list" and body["model"] == "tiny-bert"
        np.testing.assert_allclose([d["embedding"] for d in body["data"]], expected, atol=1e-5)
        assert body["usage"]["prompt_tokens"] == sum(len(t) + 2 for t in texts)  # char tokens + [CLS] [SEP]
        packed = post(c, "/v1/embeddings", {"input": texts[0], "encoding_format": "base64"}).json()
        vector = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(vector, expected[0], atol=1e-5)
        assert "embedding model" in error_of(post(c, "/v1/chat/completions", {"messages": MESSAGES}), 400)["message"]
        assert error_of(post(c, "/v1/embeddings", {"input": [1, 2]}), 400)["param"] == "input"
    model, tokenizer = loaded
    options = ServeOptions(ckpt=str(ckpts[0]), embedder=str(ckpts[1]))
    with TestClient(create_app(options, model=model, tokenizer=tokenizer)) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny-gpt", "tiny-bert"]
        body = post(c, "/v1/embeddings", {"model": "tiny-bert", "input": texts}).json()
        np.testing.assert_allclose([d["embedding"] for d in body["data"]], expected, atol=1e-5)
        assert error_of(post(c, "/v1/embeddings", {"model": "tiny-gpt", "input": "a"}), 400)["param"] == "model"
        assert post(c, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}).status_code == 200


def test_adapters_are_models_picked_by_name(ckpts, tmp_path):
    import copy

    from lmforge.adapters import AdapterOptions, apply_adapter, load_adapter, save_adapter

    base, tokenizer = load_pretrained(ckpts[0])
    options = AdapterOptions(method="lora", lora_rank=4, lora_alpha=8.0, lora_targets=["qkv", "mlp"])
    tuned = apply_adapter(copy.deepcopy(base), options)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    adapter = save_adapter(tmp_path / "poet", tuned, options, ckpts[0])
    expected = {name: generate_text(model, tokenizer, "the king", max_new_tokens=12, temperature=0)
                for name, model in (("tiny-gpt", load_pretrained(ckpts[0])[0]),
                                    ("poet", load_adapter(load_pretrained(ckpts[0])[0], adapter).eval()))}
    assert expected["poet"] != expected["tiny-gpt"]
    app = create_app(ServeOptions(ckpt=str(ckpts[0]), adapters={"poet": str(adapter)}), model=base,
                     tokenizer=tokenizer)
    with TestClient(app) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny-gpt", "poet"]
        for name, text in expected.items():
            r = post(c, "/v1/completions", {"model": name, "prompt": "the king", "max_tokens": 12, "temperature": 0})
            assert r.json()["choices"][0]["text"] == text and r.json()["model"] == name
        assert error_of(post(c, "/v1/completions", {"model": "prose", "prompt": "a"}), 404)["param"] == "model"


def test_the_limits_are_the_servers_settings(ckpts, loaded):
    model, tokenizer = loaded
    options = ServeOptions(ckpt=str(ckpts[0]), max_prompt_tokens=10, max_tokens_limit=5, max_n=3)
    with TestClient(create_app(options, model=model, tokenizer=tokenizer)) as c:
        error = error_of(post(c, "/v1/completions", {"prompt": "the king speaks"}), 400)
        assert "15 tokens" in error["message"] and "--max-prompt-tokens" in error["message"]
        assert error["code"] == "context_length_exceeded"
        too_many = post(c, "/v1/completions", {"prompt": "a", "max_tokens": 6})
        assert "--max-tokens 5" in error_of(too_many, 400)["message"]
        assert error_of(post(c, "/v1/completions", {"prompt": ["a", "b"], "n": 2}), 400)["param"] == "prompt"
        r = post(c, "/v1/completions", {"prompt": ["the", "king"], "temperature": 0}).json()
        assert [c["index"] for c in r["choices"]] == [0, 1] and r["usage"]["completion_tokens"] == 10  # default: 5
        assert [c["text"] for c in r["choices"]] == [generate_text(model, tokenizer, p, max_new_tokens=5, temperature=0)
                                                     for p in ("the", "king")]


def test_a_chinese_stream_never_carries_a_broken_character(tmp_path):
    """A random GPT on a byte-level BPE that leaves most Chinese characters split into byte tokens:
    its replies are full of byte sequences that never form a character. Every streamed piece is
    whole characters, and the pieces join up to lmforge generate's text."""
    from data_helpers import write_jsonl

    from lmforge.infer.generate import generate
    from lmforge.models import GPT, ModelConfig
    from lmforge.tokenizer.train import train_tokenizer

    poems = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"]
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "poems.jsonl", [{"text": p} for p in poems * 3])
    tokenizer = train_tokenizer(tmp_path / "corpus", tmp_path / "bpe", kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    whole = torch.tensor([any("\u4e00" <= ch <= "\u9fff" for ch in tokenizer.decode([i]))
                          for i in range(tokenizer.vocab_size)])
    with torch.no_grad():  # whole characters likelier: replies mix them with broken byte sequences
        model.lm_head.weight[whole] *= 6.0
    prompt, eos = tokenizer.encode("床前明月光"), tokenizer.eos_id
    broken = chinese = 0
    with TestClient(create_app(ServeOptions(ckpt=str(tmp_path / "zh")), model=model, tokenizer=tokenizer)) as c:
        for seed in range(4):
            request = {"prompt": "床前明月光", "max_tokens": 30, "seed": seed, "stream": True}
            pieces = [e["choices"][0]["text"] for e in events(post(c, "/v1/completions", request))[:-1]]
            assert not any("\ufffd" in p for p in pieces)
            ids = [i for i in generate(model, prompt, 30, seed=seed, stop_ids={eos}) if i != eos]
            expected = tokenizer.decode(ids)
            broken += "\ufffd" in expected  # what a decode of the whole reply shows
            assert "".join(pieces) == expected.replace("\ufffd", "")
            chinese += sum("\u4e00" <= ch <= "\u9fff" for ch in expected)
    assert broken and chinese >= 3  # broken byte sequences and whole characters both occurred
