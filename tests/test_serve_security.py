"""A live `lmforge serve` under abuse: bad requests of every kind (a 100 MB body included) each get
their status code and OpenAI's error shape while a good stream goes on undisturbed; a full queue is
429 with Retry-After; a client that leaves frees its slot; SIGTERM drains (the running stream
finishes, new requests get 503, exit code 0); it binds 127.0.0.1 by default; bad settings are
one-line errors."""

from __future__ import annotations

import json
import select
import signal
import socket
import threading
import time

import httpx
import pytest
from serve_helpers import make_gpt_ckpt, running_server

from lmforge.cli import build_parser, main
from lmforge.serve.protocol import ServeOptions

KEY = "k-secure"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 300  # tokens of a stream that stays in flight while the test does other things


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_gpt_ckpt(tmp_path_factory.mktemp("serve_security"), block_size=1024)


@pytest.fixture(scope="module")
def server(ckpt):
    args = ["--ckpt", str(ckpt), "--api-key", KEY, "--max-batch", "1", "--max-queue", "1",
            "--max-body-bytes", "100000", "--max-tokens", "1000", "--model-name", "tiny"]
    with running_server(args) as s:
        yield s


class Stream(threading.Thread):
    """A streamed chat request read in the background: its chunks, [DONE], and when each came."""

    def __init__(self, url: str, max_tokens: int = LONG) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.leave = threading.Event()  # set: close the connection mid-stream
        self.chunks: list[dict] = []
        self.done = False
        self.status = None
        self.first = threading.Event()
        self.finished_at = None
        self.start()

    def run(self) -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "the king"}], "max_tokens": self.max_tokens,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    self.done = True
                    break
                self.chunks.append(json.loads(line[6:]))
                if self.text():
                    self.first.set()  # the first token has come: the request is running
                if self.leave.is_set():
                    break  # leaving the block closes the connection mid-stream
        self.finished_at = time.monotonic()
        self.first.set()

    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content", "") for c in self.chunks if c["choices"])

    def finish_reason(self) -> str | None:
        return next((c["choices"][0]["finish_reason"] for c in self.chunks if c["choices"][0]["finish_reason"]), None)


def check_error(response: httpx.Response, status: int, word: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    assert word in error["message"], error["message"]


def raw_post(port: int, headers: list[str], chunks, limit: int = 150_000_000) -> tuple[int, int]:
    """POST over a bare socket, sending body chunks until the server answers; (status, bytes sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {KEY}",
                "Content-Type: application/json", *headers]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0] or sent > limit:
                break  # the server has answered (or closed)
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        reply = b""
        while b"\r\n" not in reply:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    return int(reply.split(b" ")[1]), sent


def test_bad_requests_while_a_good_stream_is_in_flight(server):
    url, stream = server.url, Stream(server.url)
    assert stream.first.wait(30) and stream.status == 200
    chat = url + "/v1/chat/completions"
    good = [{"role": "user", "content": "hi"}]
    cases = [  # content, status, a word the message names
        (b'{"messages": [', 400, "not valid JSON"),
        (json.dumps({"model": "tiny"}).encode(), 400, "messages"),
        (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "messages[0].role"),
        (json.dumps({"messages": good, "max_tokens": 0}).encode(), 400, "max_tokens"),
        (json.dumps({"messages": good, "max_tokens": 10 ** 12}).encode(), 400, "max_tokens"),
        (json.dumps({"messages": good, "n": 1000}).encode(), 400, "n:"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * 2000}]}).encode(), 400, "1024"),
        (b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', 400, "UTF-8"),
        (json.dumps({"messages": good, "model": "nonexistent"}).encode(), 404, "nonexistent"),
        (json.dumps({"messages": good, "pad": "x" * 200_000}).encode(), 413, "limit"),
    ]
    for content, status, word in cases:
        check_error(httpx.post(chat, content=content, headers=AUTH), status, word)
    check_error(httpx.post(chat, json={"messages": good}), 401, "API key")
    check_error(httpx.post(chat, json={"messages": good}, headers={"Authorization": "Bearer nope"}), 401, "API key")
    check_error(httpx.get(url + "/v1/unknown", headers=AUTH), 404, "no such route")

    status, sent = raw_post(server.port, ["Content-Length: 100000000"], iter(lambda: b"x" * 65536, None))
    assert status == 413 and sent < 10_000_000  # answered from the header, not after reading 100 MB

    def chunked():
        while True:
            yield b"10000\r\n" + b" " * 0x10000 + b"\r\n"

    status, sent = raw_post(server.port, ["Transfer-Encoding: chunked"], chunked())
    assert status == 413 and sent < 10_000_000  # counted while reading: stopped soon after 100 kB

    stream.join(60)
    assert stream.done and stream.finish_reason() == "length" and len(stream.text()) == LONG
    assert httpx.post(chat, json={"messages": good, "max_tokens": 3}, headers=AUTH).status_code == 200
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(f"lmforge:{name}{{")))


def test_full_queue_is_429_and_a_client_that_leaves_frees_its_slot(server):
    generated = metric(server, "generation_tokens_total")
    endless = Stream(server.url, max_tokens=1000)  # --max-batch 1: it holds the only slot
    assert endless.first.wait(30)
    queued = Stream(server.url, max_tokens=5)  # --max-queue 1: it fills the queue
    deadline = time.monotonic() + 10
    while metric(server, "num_requests_waiting") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    busy = httpx.post(server.url + "/v1/chat/completions", headers=AUTH,
                      json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    check_error(busy, 429, "busy")
    assert int(busy.headers["retry-after"]) >= 1 and not queued.first.is_set()
    endless.leave.set()  # the client goes away: its slot is free at the next step
    queued.join(30)
    assert queued.done and queued.finish_reason() == "length"
    assert metric(server, "num_requests_running") == 0
    assert metric(server, "generation_tokens_total") - generated < 1000  # the endless one stopped early
    left = [r for r in server.log_records() if r.get("error") == "client disconnected"]
    assert left and left[-1]["status"] == 200 and left[-1]["completion_tokens"] < 1000


def wait_for(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_client_that_leaves_before_its_whole_reply_cancels_it(server):
    generated = metric(server, "generation_tokens_total")
    body = json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        started = wait_for(lambda: metric(server, "generation_tokens_total") > generated)
        assert started, select.select([sock], [], [], 0)[0] and sock.recv(4096)  # else: what the server said
    assert wait_for(lambda: metric(server, "num_requests_running") == 0)
    assert metric(server, "generation_tokens_total") - generated < 1000


def test_sigterm_drains_then_exits_0(server):
    stream = Stream(server.url)
    assert stream.first.wait(30)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    try:
        r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH,
                       json={"messages": [{"role": "user", "content": "x"}]}, timeout=10)
        check_error(r, 503, "shutting down")
    except httpx.ConnectError:
        assert stream.finished_at is not None  # already drained and closed
    stream.join(60)
    assert stream.done and stream.finish_reason() == "length" and len(stream.text()) == LONG
    assert server.process.wait(30) == 0
    assert any("draining" in line for line in server.lines)


def test_loopback_by_default_and_one_line_startup_errors(ckpt, tmp_path, capsys):
    assert ServeOptions(ckpt="x").host == "127.0.0.1"
    assert build_parser().parse_args(["serve", "--ckpt", "x"]).host == "127.0.0.1"
    assert main(["serve", "--ckpt", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"not loaded")
    assert main(["serve", "--ckpt", str(tmp_path / "pickle")]) == 2  # safetensors only
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--ckpt", str(ckpt), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen" in err and len(err.strip().splitlines()) == 2
    assert main(["serve", "--ckpt", str(ckpt), "--max-batch", "0"]) == 2
    assert main(["serve", "--ckpt", str(ckpt), "--adapter", "nodir"]) == 2


def test_a_checkpoint_that_fails_to_load_ends_the_server_with_exit_2(ckpt, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    assert main(["serve", "--ckpt", str(broken), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "broken" in err.splitlines()[0]  # the listening line, then the error
