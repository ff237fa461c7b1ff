"""`lmforge mcp` driven by the `mcp` SDK's own client: in memory (`mcp.Client(server)`) for the tools,
schemas, resources and errors, and over stdio against the real `lmforge mcp` subprocess. Every tool
answer is checked against lmforge's own functions on the same tiny checkpoints: `generate_text`,
`chat_reply`, `embed_texts`, `RagIndex.search`, `lmforge.eval.evaluate`."""

from __future__ import annotations

import json
import os
import shutil
import sys

import anyio
import numpy as np
import pytest
from eval_helpers import write_task
from mcp import Client, ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from serve_helpers import make_bert_ckpt, make_gpt_ckpt

from lmforge.infer.chat import chat_reply
from lmforge.infer.embed import embed_texts, max_seq_length
from lmforge.infer.generate import generate_text
from lmforge.mcp import MCPOptions, create_server
from lmforge.tokenizer.chat import chat_template
from lmforge.train.checkpoint import load_pretrained

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the king"}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run dir (checkpoints/best + summary.json + report.md) of a tiny GPT, a tiny BERT, a task file."""
    root = tmp_path_factory.mktemp("mcp")
    gpt, bert = make_gpt_ckpt(root), make_bert_ckpt(root)
    run = root / "run"
    shutil.copytree(gpt, run / "checkpoints" / "best")
    (run / "summary.json").write_text(json.dumps({"stage": "pretrain", "metrics": {"steps": 7}}))
    (run / "report.md").write_text("# tiny run\n")
    items = [{"context": "the king", "choices": [" is", " was", " of"], "gold": i % 3} for i in range(5)]
    task = write_task(root / "mc.jsonl", items, {"name": "mc", "kind": "multiple_choice", "split": "test"})
    return {"root": root, "run": run, "gpt": gpt, "bert": bert, "task": task}


@pytest.fixture(scope="module")
def server(setup):
    return create_server(MCPOptions(ckpt=str(setup["run"]), embedder=str(setup["bert"])))


@pytest.fixture(scope="module")
def gpt(setup):
    return load_pretrained(setup["gpt"])


def session(server, work):
    """Run `await work(client)` against `server` over the SDK's in-memory client; its result."""
    async def main():
        async with Client(server) as client:
            return await work(client)
    return anyio.run(main)


def call(server, tool: str, arguments: dict):
    return session(server, lambda c: c.call_tool(tool, arguments))


def test_tools_and_their_schemas(server):
    tools = {t.name: t for t in session(server, lambda c: c.list_tools()).tools}
    assert set(tools) == {"generate", "chat", "embed", "evaluate"}  # no --index: no search tool
    gen = tools["generate"]
    assert gen.input_schema["required"] == ["prompt"]
    assert {"prompt", "max_tokens", "temperature", "top_p", "seed", "stop"} <= set(gen.input_schema["properties"])
    assert gen.input_schema["properties"]["max_tokens"]["minimum"] == 1
    assert set(gen.output_schema["required"]) == {"text", "tokens", "finish_reason"}
    assert tools["chat"].input_schema["required"] == ["messages"]
    assert "reply" in tools["chat"].output_schema["properties"]
    assert tools["embed"].input_schema["required"] == ["texts"]
    assert "vectors" in tools["embed"].output_schema["properties"]
    assert set(tools["evaluate"].input_schema["properties"]) == {"task", "limit", "fewshot", "cot"}
    assert all(t.output_schema and t.description for t in tools.values())


def test_generate_greedy_and_seeded_equal_generate_text(server, gpt):
    model, tokenizer = gpt
    r = call(server, "generate", {"prompt": "the king", "max_tokens": 12, "temperature": 0})
    assert not r.is_error, r.content
    assert r.structured_content == {"text": generate_text(model, tokenizer, "the king", 12, temperature=0.0),
                                    "tokens": 12, "finish_reason": "length"}  # this model never writes eos
    assert json.loads(r.content[0].text) == r.structured_content
    r = call(server, "generate", {"prompt": "the king", "max_tokens": 12, "temperature": 1.0, "top_p": 0.9,
                                  "seed": 3})
    assert r.structured_content["text"] == generate_text(model, tokenizer, "the king", 12, temperature=1.0,
                                                         top_p=0.9, seed=3)


def test_generate_stop_string_ends_the_text(server, gpt):
    model, tokenizer = gpt
    full = generate_text(model, tokenizer, "the", 16, temperature=0.0)
    stop = full[5:7]
    r = call(server, "generate", {"prompt": "the", "max_tokens": 16, "temperature": 0, "stop": [stop]})
    expected = generate_text(model, tokenizer, "the", 16, temperature=0.0, stop=[stop])
    assert r.structured_content["text"] == expected == full[:full.index(stop)]
    assert r.structured_content["finish_reason"] == "stop"


def test_chat_equals_chat_reply(server, gpt):
    model, tokenizer = gpt
    r = call(server, "chat", {"messages": MESSAGES, "max_tokens": 10, "temperature": 0})
    assert not r.is_error, r.content
    expected = chat_reply(model, chat_template(tokenizer), MESSAGES, max_new_tokens=10, temperature=0.0)
    assert r.structured_content["reply"] == expected


def test_embed_equals_embed_texts(server, setup):
    texts = ["the king is dead", "long live the king", "a"]
    r = call(server, "embed", {"texts": texts})
    assert not r.is_error, r.content
    model, tokenizer = load_pretrained(setup["bert"])
    expected = embed_texts(model, tokenizer, texts, max_length=max_seq_length(setup["bert"], model.config))
    got = np.array(r.structured_content["vectors"])
    assert got.shape == expected.shape and r.structured_content["dim"] == expected.shape[1]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_evaluate_with_fewshot_equals_lmforge_eval_fewshot(server, setup, tmp_path):
    from lmforge.eval import evaluate

    pool = [{"context": "the queen", "choices": [" is", " was", " of"], "gold": i % 3} for i in range(4)]
    write_task(tmp_path / "pool.jsonl", pool, {"kind": "multiple_choice", "split": "train"})
    items = [{"context": "the king", "choices": [" is", " was", " of"], "gold": i % 3} for i in range(5)]
    task = write_task(tmp_path / "mc.jsonl", items, {"name": "mc", "kind": "multiple_choice", "split": "test",
                                                     "fewshot": "pool.jsonl"})
    r = call(server, "evaluate", {"task": str(task), "fewshot": 2})
    assert not r.is_error, r.content
    expected = evaluate(setup["run"], [task], tmp_path / "eval", fewshot=2, progress=False)["tasks"][0]["metrics"]
    zero = evaluate(setup["run"], [task], tmp_path / "eval0", progress=False)["tasks"][0]["metrics"]
    assert r.structured_content["tasks"][0]["metrics"] == json.loads(json.dumps(expected))
    assert expected != zero  # the shots reached the prompts
    r = call(server, "evaluate", {"task": str(task), "fewshot": 9})
    assert r.is_error and "fewer than --fewshot 9" in r.content[0].text


def test_evaluate_equals_lmforge_eval(server, setup, tmp_path):
    from lmforge.eval import evaluate

    r = call(server, "evaluate", {"task": str(setup["task"]), "limit": 4})
    assert not r.is_error, r.content
    expected = evaluate(setup["run"], [setup["task"]], tmp_path / "eval", limit=4, progress=False)
    (task,) = r.structured_content["tasks"]
    assert task["kind"] == "multiple_choice" and task["split"] == "test"
    assert task["metrics"] == json.loads(json.dumps(expected["tasks"][0]["metrics"]))
    assert task["metrics"]["n"] == 4


def test_model_card_resources(server, setup):
    async def work(client):
        listed = {str(r.uri): r for r in (await client.list_resources()).resources}
        texts = {uri: (await client.read_resource(uri)).contents[0].text for uri in listed}
        return listed, texts

    listed, texts = session(server, work)
    assert set(listed) == {"lmforge://model/config", "lmforge://model/summary", "lmforge://model/report"}
    assert json.loads(texts["lmforge://model/config"]) == json.loads(
        (setup["run"] / "checkpoints" / "best" / "config.json").read_text())
    assert json.loads(texts["lmforge://model/summary"])["metrics"] == {"steps": 7}
    assert texts["lmforge://model/report"] == "# tiny run\n"
    assert listed["lmforge://model/config"].mime_type == "application/json"


@pytest.mark.parametrize(("tool", "arguments", "message"), [
    ("generate", {}, "generate: prompt: Field required"),
    ("generate", {"prompt": 3}, "generate: prompt: Input should be a valid string"),
    ("generate", {"prompt": "x", "max_tokens": 0}, "generate: max_tokens: Input should be greater than or equal to 1"),
    ("generate", {"prompt": "x", "temperature": "hot"}, "generate: temperature: Input should be a valid number"),
    ("generate", {"prompt": "x" * 200}, "generate: prompt: 200 tokens, over the model's context of 63"),
    ("chat", {"messages": [{"role": "king", "content": "hi"}]}, "chat: messages.0.role: Input should be"),
    ("chat", {"messages": []}, "chat: messages: List should have at least 1 item"),
    ("embed", {"texts": "not a list"}, "embed: texts: Input should be a valid list"),
    ("evaluate", {"task": "/no/such/task.jsonl"}, "evaluate: task: /no/such/task.jsonl does not exist"),
    ("evaluate", {"task": "TASK", "limit": 0}, "evaluate: limit: Input should be greater than or equal to 1"),
    ("search", {"query": "king"}, "Unknown tool: search"),
])
def test_bad_arguments_are_one_line_tool_errors(server, setup, tool, arguments, message):
    arguments = {k: str(setup["task"]) if v == "TASK" else v for k, v in arguments.items()}

    async def work(client):
        bad = await client.call_tool(tool, arguments)
        good = await client.call_tool("generate", {"prompt": "a", "max_tokens": 2})  # still serving
        return bad, good

    bad, good = session(server, work)
    assert bad.is_error and bad.content[0].text.startswith(message), bad.content[0].text
    assert "\n" not in bad.content[0].text
    assert not good.is_error and good.structured_content["tokens"] == 2


def test_a_bad_task_file_line_is_a_tool_error(server, tmp_path):
    task = write_task(tmp_path / "bad.jsonl", [{"context": "x", "choices": ["a"], "gold": 5}],
                      {"kind": "multiple_choice"})
    r = call(server, "evaluate", {"task": str(task)})
    assert r.is_error and r.content[0].text.startswith("evaluate: ") and "bad.jsonl:2" in r.content[0].text


def test_an_encoder_checkpoint_serves_embed_and_evaluate_only(setup):
    encoder = create_server(MCPOptions(ckpt=str(setup["bert"])))
    names = {t.name for t in session(encoder, lambda c: c.list_tools()).tools}
    assert names == {"embed", "evaluate"}
    r = call(encoder, "embed", {"texts": ["king"]})
    assert not r.is_error and len(r.structured_content["vectors"][0]) == 16


def test_stdio_subprocess(setup, gpt):
    """The real `lmforge mcp` over stdio: list the tools, one generation, one bad call (still serving after)."""
    model, tokenizer = gpt
    params = StdioServerParameters(command=sys.executable, args=["-m", "lmforge", "mcp", "--ckpt", str(setup["gpt"])],
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})

    async def main():
        with anyio.fail_after(60):
            async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
                return await calls(client)

    async def calls(client):
        await client.initialize()
        tools = await client.list_tools()
        good = await client.call_tool("generate", {"prompt": "the king", "max_tokens": 8, "temperature": 0})
        bad = await client.call_tool("generate", {"prompt": "x", "max_tokens": "many"})
        again = await client.call_tool("generate", {"prompt": "a", "max_tokens": 3, "temperature": 0})
        return tools, good, bad, again

    tools, good, bad, again = anyio.run(main)
    assert {t.name for t in tools.tools} == {"generate", "chat", "evaluate"}  # no encoder, no index
    assert good.structured_content["text"] == generate_text(model, tokenizer, "the king", 8, temperature=0.0)
    assert bad.is_error and bad.content[0].text.startswith("generate: max_tokens: Input should be a valid integer")
    assert again.structured_content["text"] == generate_text(model, tokenizer, "a", 3, temperature=0.0)


def test_search_and_the_index_resources(setup):
    """--index: search gives RagIndex.search's hits; embed uses the index's embedder; the index's files are
    resources."""
    from lmforge.rag import RagIndex, build_index

    docs = setup["root"] / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "macbeth.txt").write_text("Macbeth met three witches on the heath. They hailed him king.")
    (docs / "hamlet.txt").write_text("The king is dead. Hamlet saw the ghost on the wall. Ophelia sang.")
    build_index([docs], setup["bert"], setup["root"] / "index", size=16, overlap=4, overwrite=True)
    server = create_server(MCPOptions(ckpt=str(setup["gpt"]), index=str(setup["root"] / "index")))
    index = RagIndex.open(setup["root"] / "index")

    async def work(client):
        tools = {t.name for t in (await client.list_tools()).tools}
        results = {m: await client.call_tool("search", {"query": "the witches", "k": 3, "mode": m})
                   for m in ("dense", "bm25", "hybrid")}
        bad = await client.call_tool("search", {"query": "x", "mode": "sparse"})
        results["embed"] = await client.call_tool("embed", {"texts": ["the witches", "a ghost"]})
        resources = {str(r.uri) for r in (await client.list_resources()).resources}
        summary = (await client.read_resource("lmforge://index/summary")).contents[0].text
        return tools, results, bad, resources, summary

    tools, results, bad, resources, summary = session(server, work)
    assert tools == {"generate", "chat", "embed", "search", "evaluate"}
    np.testing.assert_allclose(results.pop("embed").structured_content["vectors"],
                               index.model(["the witches", "a ghost"]), atol=1e-6)  # the index's own embedder
    for mode, r in results.items():
        hits = [h.to_dict() for h in index.search("the witches", 3, mode=mode)]
        assert r.structured_content == {"query": "the witches", "mode": mode, "hits": json.loads(json.dumps(hits))}
    assert results["bm25"].structured_content["hits"][0]["source"].endswith("macbeth.txt")
    assert bad.is_error and bad.content[0].text.startswith("search: mode: Input should be 'dense', 'bm25' or 'hybrid'")
    assert {"lmforge://index/summary", "lmforge://index/config", "lmforge://model/config"} <= resources
    assert json.loads(summary) == json.loads((setup["root"] / "index" / "summary.json").read_text())


@pytest.mark.slow
def test_streamable_http_subprocess(setup, gpt):
    """`lmforge mcp --transport http --port 0`: the SDK's client at the URL it prints lists the tools and generates."""
    import re
    import subprocess

    model, tokenizer = gpt
    process = subprocess.Popen([sys.executable, "-m", "lmforge", "mcp", "--ckpt", str(setup["gpt"]), "--transport",
                                "http", "--port", "0"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = process.stderr.readline()
        url = re.search(r"(http://\S+/mcp)", line).group(1)

        async def main():
            with anyio.fail_after(60):
                async with Client(url) as client:
                    tools = await client.list_tools()
                    good = await client.call_tool("generate", {"prompt": "the", "max_tokens": 6, "temperature": 0})
                    bad = await client.call_tool("generate", {"prompt": 1})
                    return tools, good, bad

        tools, good, bad = anyio.run(main)
    finally:
        process.terminate()
        code = process.wait(30)
    assert code == 0  # SIGTERM: a clean shutdown
    assert {t.name for t in tools.tools} == {"generate", "chat", "evaluate"}
    assert good.structured_content["text"] == generate_text(model, tokenizer, "the", 6, temperature=0.0)
    assert bad.is_error and bad.content[0].text == "generate: prompt: Input should be a valid string (got 1)"


def test_concurrent_calls_each_get_their_own_answer(server, gpt):
    """Calls in flight together (the SDK runs each in a worker thread) are served one by one on the model."""
    model, tokenizer = gpt
    seeds = [1, 2, 3]

    async def work(client):
        results = {}

        async def one(seed):
            results[seed] = await client.call_tool("generate", {"prompt": "the", "max_tokens": 8, "temperature": 1.0,
                                                                "seed": seed})
        async with anyio.create_task_group() as group:
            for seed in seeds:
                group.start_soon(one, seed)
        return results

    results = session(server, work)
    for seed in seeds:
        assert results[seed].structured_content["text"] == generate_text(model, tokenizer, "the", 8, temperature=1.0,
                                                                         seed=seed)


def test_cli_refuses_what_cannot_load_in_one_line(setup, tmp_path, capsys):
    from lmforge.cli import main

    cases = [(["--ckpt", str(tmp_path / "nothing")], "does not exist"),
             (["--ckpt", str(setup["gpt"]), "--index", str(tmp_path)], "not a RAG index"),
             (["--ckpt", str(setup["gpt"]), "--embedder", str(setup["gpt"])], "has no sentence embeddings")]
    for args, words in cases:
        assert main(["mcp", *args]) == 2
        err = capsys.readouterr()
        assert err.out == "" and words in err.err and err.err.count("\n") == 1, err
