"""benchmarks/serve_load.py's bookkeeping against a tiny scripted server on 127.0.0.1 (counts, 429
retries, lost requests, token and latency figures), its percentiles and memory slope by hand, and
benchmarks/hf_server.py (the transformers peer) driven by the official openai client."""

import asyncio
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import serve_load  # noqa: E402

GAP = 0.02  # seconds between the scripted server's tokens


def scripted_app():
    """Replies by the user message: "busy N" -> N 429s (Retry-After 0.05) then a reply; "fail" -> 500;
    "broken" -> a stream cut before [DONE]; otherwise max_tokens content chunks GAP apart + usage."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    refused: dict[str, int] = {}

    async def chat(request):
        body = await request.json()
        text = body["messages"][-1]["content"]
        if text.startswith("busy") and refused.get(text, 0) < int(text.split()[1]):
            refused[text] = refused.get(text, 0) + 1
            return JSONResponse({"error": {"message": "queue full"}}, status_code=429, headers={"Retry-After": "0.05"})
        if text == "fail":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)

        async def events():
            n = 2 if text == "broken" else body["max_tokens"]
            for i in range(n):
                await asyncio.sleep(GAP)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': f't{i}'}}]})}\n\n"
            if text == "broken":
                return
            usage = {"completion_tokens": n, "prompt_tokens": len(text)}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture(scope="module")
def url():
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(scripted_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def opts(**kw):
    return {"max_tokens": 4, "temperature": 1.0, "top_p": 1.0, "requests": 2, "run_timeout": 30.0,
            "request_timeout": 10.0, "max_retries": 10, **kw}


def test_percentile_and_slope_by_hand():
    assert serve_load.percentile([], 50) is None
    assert serve_load.percentile([7.0], 99) == 7.0
    assert serve_load.percentile([4, 1, 3, 2], 50) == 2.5  # rank 1.5: between 2 and 3
    assert serve_load.percentile([4, 1, 3, 2], 99) == pytest.approx(3.97)  # rank 2.97: 3 + 0.97 * (4 - 3)
    assert serve_load.percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert serve_load.slope_per_minute([(0, 100.0), (30, 101.0), (60, 102.0)]) == pytest.approx(2.0)
    assert serve_load.slope_per_minute([(0, 5.0), (10, 9.0), (20, 5.0)]) == pytest.approx(0.0)
    assert serve_load.slope_per_minute([(0, 5.0)]) is None


def test_summary_of_hand_made_records():
    r1 = serve_load.Record(0, 0, 10, sent=0.0, attempt=0.0, first=0.1, done=0.5, chunk_times=[0.1, 0.2, 0.4],
                           tokens=3, status=200)
    r2 = serve_load.Record(1, 0, 12, sent=0.0, attempt=0.3, first=0.6, done=1.0, chunk_times=[0.6, 0.7],
                           tokens=2, retries=2, status=200)
    r3 = serve_load.Record(2, 0, 8, status=500)
    r3.fail("HTTP 500: boom")
    r4 = serve_load.Record(3, 0, 8, retries=3, status=429)
    r4.fail("gave up after 3 429s", "429")
    s = serve_load.summarize([r1, r2, r3, r4], wall=2.0)
    assert (s["requests"], s["ok"], s["errors"], s["retries_429"], s["lost"]) == (4, 2, 1, 5, 2)
    assert s["tokens"] == 5 and s["tokens_per_s"] == 2.5 and s["tokens_per_request"] == 2.5
    # TTFT 0.1 and 0.3 (from the answered attempt); ITL gaps 0.1, 0.2, 0.1
    assert s["ttft_p50_s"] == pytest.approx(0.2) and s["ttft_p99_s"] == pytest.approx(0.298)
    assert s["itl_p50_s"] == pytest.approx(0.1) and s["itl_p99_s"] == pytest.approx(0.198)
    assert s["first_errors"] == ["HTTP 500: boom", "gave up after 3 429s"]


def test_load_generator_counts_against_a_scripted_server(url):
    prompts = [{"content": "hello", "prompt_tokens": 5}, {"content": "busy 2", "prompt_tokens": 4},
               {"content": "fail", "prompt_tokens": 3}, {"content": "broken", "prompt_tokens": 3}]
    # one client, 4 requests: its walk through the prompts is 0, 1, 2, 3
    records, wall = asyncio.run(serve_load.run_clients(url, prompts, 1, opts(requests=4)))
    by = {prompts[r.index]["content"]: r for r in records}
    assert len(records) == 4 and wall > 0
    assert by["hello"].ok and by["hello"].tokens == 4 and len(by["hello"].itl) == 3
    hello = by["hello"]  # the first chunk is sent a GAP after the request, the last 4 GAPs after
    assert hello.ttft >= GAP and hello.done - hello.attempt >= 4 * GAP and min(hello.itl) >= 0
    assert by["busy 2"].ok and by["busy 2"].retries == 2 and by["busy 2"].attempt - by["busy 2"].sent >= 0.1
    assert by["fail"].cause == "error" and "500" in by["fail"].error
    assert by["broken"].cause == "error" and "[DONE]" in by["broken"].error
    s = serve_load.summarize(records, wall)
    assert (s["ok"], s["errors"], s["retries_429"], s["lost"], s["tokens"]) == (2, 2, 2, 2, 8)
    assert s["prompt_tokens_differ"] == 1  # the server counts "busy 2" as 6 tokens, the client said 4


def test_many_clients_and_lost_requests(url):
    prompts = [{"content": "hello", "prompt_tokens": 3}]
    done = []
    records, _ = asyncio.run(serve_load.run_clients(url, prompts, 5, opts(requests=3), progress=done.append))
    assert len(done) == len(records) == 15 and all(r.ok and r.tokens == 4 for r in records)
    assert sorted((r.client, r.index) for r in records) == [(c, j) for c in range(5) for j in range(3)]
    # a 429 the client may not retry (max_retries 1 of 3 needed) is lost, and so is what the run's time cuts off
    records, _ = asyncio.run(serve_load.run_clients(url, [{"content": "busy 3", "prompt_tokens": 4}], 1,
                                                    opts(requests=1, max_retries=1)))
    assert records[0].cause == "429" and records[0].retries == 2
    records, _ = asyncio.run(serve_load.run_clients(url, prompts, 2, opts(requests=50, run_timeout=1.0)))
    s = serve_load.summarize(records, 1.0)  # 100 requests of >= 4 GAPs each cannot finish in 1 s
    assert s["lost"] >= 1 and s["errors"] == 0 and all(r.cause == "time" for r in records if not r.ok)
    assert 0 < s["ok"] < 100


def test_soak_clients_send_until_the_time_is_up(url):
    records, wall = asyncio.run(serve_load.run_clients(url, [{"content": "hello", "prompt_tokens": 3}], 3,
                                                       opts(requests=0), seconds=0.5))
    # each request takes ~4 x GAP: a client sends several in 0.5 s, the last one sent before the time was up
    sent = [r.sent for r in records]
    assert all(r.ok for r in records) and len(records) >= 6 and max(sent) < min(sent) + 0.5
    assert 0.5 <= wall < 3.0  # then the clients stop (requests=0 would send none without `seconds`)
    assert serve_load.rss_mb(os.getpid()) > 10


def test_ratios_against_the_goals():
    assert serve_load.ratios({})["scaling_16_vs_1"] is None
    results = {"lmforge": {1: {"tokens_per_s": 10.0, "ttft_p99_s": 0.1, "errors": 0, "lost": 0},
                           16: {"tokens_per_s": 50.0, "ttft_p99_s": 0.4, "errors": 0, "lost": 0},
                           64: {"tokens_per_s": 55.0, "ttft_p99_s": 2.0, "errors": 1, "lost": 2}},
               "hf": {16: {"tokens_per_s": 20.0}}}
    q = serve_load.ratios(results)
    assert q == {"scaling_16_vs_1": 5.0, "lmforge_vs_peer_16": 2.5, "p99_ttft_16_s": 0.4, "most_clients": 64,
                 "errors_at_most": 1, "lost_at_most": 2}


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """benchmarks/hf_server.py's peer on a tiny random GPT (char tokenizer) converted by to_hf; the lmforge side."""
    import hf_server
    import torch
    from train_helpers import write_corpus

    from lmforge.export.hf import to_hf
    from lmforge.models import GPT, ModelConfig
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.tok import SPECIAL_TOKENS
    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.train.checkpoint import load_pretrained, save_checkpoint, tied_aliases

    root = tmp_path_factory.mktemp("peer")
    train_tokenizer(write_corpus(root / "c", docs=4), root / "tok", kind="char")
    tok = Tokenizer.load(root / "tok")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64))
    with torch.no_grad():  # tied: the control tokens' logits 0, the letters' spread out, so greedy writes letters
        model.tok_embeddings.weight.mul_(20)[[tok.token_to_id(t) for t in SPECIAL_TOKENS]] = 0
    save_checkpoint(root / "ckpt", model.state_dict(), model.config.to_dict(), root / "tok" / "tokenizer.json", None,
                    drop=tied_aliases(model))
    to_hf(root / "ckpt", root / "hf")
    return hf_server.load_peer(root / "hf"), load_pretrained(root / "ckpt"), root


def openai_client(app):
    import httpx
    import openai

    return openai.AsyncOpenAI(api_key="x", base_url="http://peer/v1",
                              http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)))


def test_hf_peer_speaks_openai_streaming_from_lmforges_prompt_ids(peer):
    import hf_server

    from lmforge.infer.generate import generate
    from lmforge.tokenizer import encode_chat

    hf_peer, (model, tok), _ = peer
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "speak of love"}]
    ids = encode_chat(tok, messages)
    assert hf_server.check_request(hf_peer, {"messages": messages}) == ids  # the ids lmforge serve builds

    async def ask():
        client = openai_client(hf_server.create_app(hf_peer))
        stream = await client.chat.completions.create(model="m", messages=messages, max_tokens=9, temperature=0.8,
                                                      stream=True, stream_options={"include_usage": True},
                                                      extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        greedy = await client.chat.completions.create(model="m", messages=messages, max_tokens=9, temperature=0)
        return chunks, greedy

    chunks, greedy = asyncio.run(ask())
    assert chunks[-1].usage.completion_tokens == 9 and chunks[-1].usage.prompt_tokens == len(ids)  # ignore_eos: 9
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # greedy: transformers' generate on the converted model writes what lmforge's own generate writes
    want = list(generate(model, ids, 9, temperature=0, stop_ids=set(hf_peer.stop_ids)))
    assert greedy.choices[0].message.content == tok.decode(want, skip_special_tokens=True) != ""
    assert (greedy.usage.prompt_tokens, greedy.usage.completion_tokens) == (len(ids), len(want))


@pytest.mark.slow
def test_serve_load_drives_lmforge_serve_and_the_peer(peer, tmp_path, capsys):
    """The whole script with tiny arguments: both servers started, measured and stopped (~1 min)."""
    _, _, root = peer
    (tmp_path / "texts.txt").write_text("the king shall speak of love\n\nand death upon this night, my lord\n")
    out = tmp_path / "serve.json"
    assert serve_load.main(["--ckpt", str(root / "ckpt"), "--hf-dir", str(root / "hf"), "--clients", "1,2",
                            "--peer-clients", "2", "--requests", "2", "--max-tokens", "4", "--num-prompts", "6",
                            "--texts", str(tmp_path / "texts.txt"), "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    for server, clients in (("lmforge", "1"), ("lmforge", "2"), ("hf", "2")):
        s = results[server][clients]
        assert (s["ok"], s["errors"], s["lost"], s["prompt_tokens_differ"]) == (2 * int(clients), 0, 0, 0), s
        assert 0 < s["tokens_per_request"] <= 4 and s["tokens_per_s"] > 0, (server, s)
        # a random char-level model may write only byte-fallback tokens that never form a character:
        # lmforge sends no text for them (no broken characters), so a run can have no first content chunk
        assert s["ttft_p50_s"] is None or s["ttft_p50_s"] > 0, (server, s)
    assert results["hf"]["2"]["ttft_p50_s"] > 0  # the peer streams whatever it decodes
    assert results["hf"]["2"]["tokens_per_request"] == 4  # ignore_eos
    assert "lmforge        2" in capsys.readouterr().out
