"""`lmforge chat --url`: the chat REPL against a live `lmforge serve` on 127.0.0.1 (a tiny GPT overfit
on known chat turns). Reference: the official `openai` client's replies to the same conversations."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import pytest
from serve_chat_helpers import (
    ABILITIES,
    CONVERSATION,
    ENDLESS_MAX_TOKENS,
    GREETING,
    chat_checkpoint,
    endless_checkpoint,
)
from serve_helpers import running_server

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.serve.client import api_base, chat_remote, stream_chat

KEY = "client-test-key"


@pytest.fixture(scope="module")
def server():
    with running_server(["--ckpt", str(chat_checkpoint()), "--api-key", KEY, "--max-tokens", "1000"]) as s:
        yield s


def openai_reply(url: str, messages: list[dict], max_tokens: int = 120) -> str:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    out = client.chat.completions.create(model="ckpt", messages=messages, temperature=0, max_tokens=max_tokens)
    return out.choices[0].message.content


def test_chat_url_is_the_chat_repl_against_the_server(server):
    """The CLI, as a user runs it: replies streamed after `model> `, the history kept, /reset, /quit."""
    lines = "Hi there\nWhat can you do?\n/reset\nHi there\n/quit\nnever read\n"
    run = subprocess.run([sys.executable, "-m", "lmforge", "chat", "--url", server.url, "--api-key", KEY,
                          "--greedy", "--max-new-tokens", "120"], input=lines, capture_output=True, text=True,
                         timeout=300, encoding="utf-8")
    assert run.returncode == 0, run.stderr
    first = openai_reply(server.url, CONVERSATION[:1])
    second = openai_reply(server.url, [*CONVERSATION[:1], {"role": "assistant", "content": first},
                                       CONVERSATION[2]])
    assert (first, second) == (GREETING, ABILITIES)  # the trained turns, Chinese included
    assert run.stdout == f"model> {first}\nmodel> {second}\nmodel> {first}\n"  # after /reset: the first turn again


def test_chat_url_fewshot_opens_every_request(server, tmp_path):
    """`chat --url --fewshot FILE`: the example exchanges open the conversation sent to the server (after
    --system), and /reset keeps them — the replies equal the openai client's for the same messages."""
    shots = tmp_path / "shots.jsonl"
    shots.write_text(json.dumps({"user": CONVERSATION[0]["content"], "assistant": GREETING}) + "\n", encoding="utf-8")
    lines = f"{CONVERSATION[2]['content']}\n/reset\n{CONVERSATION[2]['content']}\n"
    run = subprocess.run([sys.executable, "-m", "lmforge", "chat", "--url", server.url, "--api-key", KEY, "--greedy",
                          "--max-new-tokens", "120", "--fewshot", str(shots)], input=lines, capture_output=True,
                         text=True, timeout=300, encoding="utf-8")
    assert run.returncode == 0, run.stderr
    with_shots = openai_reply(server.url, [*CONVERSATION[:1], {"role": "assistant", "content": GREETING},
                                           CONVERSATION[2]])
    alone = openai_reply(server.url, [CONVERSATION[2]])
    assert with_shots == ABILITIES and alone != with_shots  # the examples change the reply
    assert run.stdout == f"model> {with_shots}\nmodel> {with_shots}\n"


def test_replies_stream_in_pieces_and_errors_are_one_line(server):
    pieces = list(stream_chat(server.url, {"messages": CONVERSATION[:1], "temperature": 0, "max_tokens": 120},
                              KEY))
    assert len(pieces) > 5 and "".join(pieces) == GREETING

    stdin = io.StringIO("x" * 400 + "\nHi there\n")  # longer than the model's context (256 tokens): a 400
    stdout, stderr = io.StringIO(), io.StringIO()
    chat_remote(server.url + "/v1/", api_key=KEY, stdin=stdin, stdout=stdout, stderr=stderr, max_new_tokens=120,
                temperature=0.0)
    assert stdout.getvalue() == f"model> \nmodel> {GREETING}\n"  # the failed turn left the history as it was
    error = stderr.getvalue()
    assert error.startswith("error: HTTP 400: ") and error.count("\n") == 1


def test_closing_the_stream_frees_the_slot():
    import httpx

    with running_server(["--ckpt", str(endless_checkpoint()), "--max-tokens", str(ENDLESS_MAX_TOKENS)]) as server:
        before = len(chat_records(server))  # a model whose replies run to max_tokens: this one takes seconds
        stream = stream_chat(server.url, {"messages": [{"role": "user", "content": "go on"}], "temperature": 0,
                                          "max_tokens": ENDLESS_MAX_TOKENS})
        got = [next(stream) for _ in range(5)]
        stream.close()  # what Ctrl-C during a reply does
        assert len(got) == 5
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(chat_records(server)) == before:
            time.sleep(0.1)
        records = chat_records(server)
        assert len(records) == before + 1 and 5 <= records[-1]["completion_tokens"] < ENDLESS_MAX_TOKENS
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert 'lmforge:num_requests_running{model_name="tiny-gpt"} 0.0' in metrics


def chat_records(server) -> list[dict]:
    """The server's request log lines for /v1/chat/completions so far."""
    return [r for r in server.log_records() if r.get("route") == "/v1/chat/completions"]


def test_bad_key_and_unreachable_server_exit_2(server, capsys):
    assert main(["chat", "--url", server.url, "--api-key", "wrong-key"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HTTP 401" in err and "invalid API key" in err and "--api-key" in err

    with socket_free_port() as port:
        assert main(["chat", "--url", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach" in err

    assert main(["chat", "--url", server.url, "--ckpt", "somewhere"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["chat"]) == 2
    assert "--ckpt DIR" in capsys.readouterr().err
    with pytest.raises(UserError, match="has no model 'other'"):
        chat_remote(server.url, api_key=KEY, model="other", stdin=io.StringIO(""))


def test_api_base():
    assert api_base("http://h:1") == api_base("http://h:1/") == api_base("http://h:1/v1/") == "http://h:1/v1"
    with pytest.raises(UserError, match="not a URL"):
        api_base("localhost:8000")


class socket_free_port:
    """A port nothing listens on (bound, never listening, so nothing else takes it meanwhile)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


def test_start_waits_while_the_model_loads(monkeypatch):
    import lmforge.serve.client as client

    answers = [client.RemoteError("HTTP 503: the model is still loading; retry later")] * 2 + [["m"]]

    def fake_list_models(url, api_key=None, timeout=30.0):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(client, "list_models", fake_list_models)
    monkeypatch.setattr(client.time, "sleep", lambda s: None)
    stdout = io.StringIO()
    chat_remote("http://127.0.0.1:1", stdin=io.StringIO("/quit\n"), stdout=stdout)
    assert answers == [] and stdout.getvalue() == ""
    answers[:] = [client.RemoteError("HTTP 401: bad key")]
    with pytest.raises(UserError, match="HTTP 401: bad key; pass --api-key KEY"):
        chat_remote("http://127.0.0.1:1", stdin=io.StringIO(""))
