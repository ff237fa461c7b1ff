"""The README's curl examples work as printed: each command between `<!-- serve-curl -->` markers runs
against a live `lmforge serve` (only the port is changed) and answers what OpenAI's API answers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from serve_helpers import make_gpt_ckpt, running_server

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- serve-curl -->\n```bash\n(.*?)```\n<!-- /serve-curl -->", text, re.S)
    assert block, "README.md has no <!-- serve-curl --> block"
    commands = block.group(1).replace("\\\n", " ").strip().splitlines()
    assert all(c.startswith("curl ") for c in commands)
    return commands


def sse_data(output: str) -> list:
    events = [line[len("data: "):] for line in output.splitlines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_readme_curl_examples_work_as_printed(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 5
    with running_server(["--ckpt", str(make_gpt_ckpt(tmp_path, block_size=128))]) as server:
        outputs = []
        for command in commands:
            assert "127.0.0.1:8000" in command
            done = subprocess.run(["bash", "-c", command.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (command, done.stderr)
            outputs.append(done.stdout)
    checked = 0
    for command, output in zip(commands, outputs):
        if command.endswith("/health"):
            assert json.loads(output) == {"status": "ok", "model": "tiny-gpt"}
        elif command.endswith("/v1/models"):
            assert [m["id"] for m in json.loads(output)["data"]] == ["tiny-gpt"]
        elif '"stream": true' in command:
            data = sse_data(output)
            assert data[-1] == "[DONE]" and data[0]["object"] == "chat.completion.chunk"
            assert data[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        elif "/v1/chat/completions" in command:
            body = json.loads(output)
            assert body["object"] == "chat.completion" and 0 < body["usage"]["completion_tokens"] <= 40
        elif "/v1/completions" in command:
            body = json.loads(output)
            assert body["object"] == "text_completion" and 0 < body["usage"]["completion_tokens"] <= 40
        elif "/metrics" in command:
            assert re.fullmatch(r'lmforge:generation_tokens_total\{model_name="tiny-gpt"\} \d+\.0\n', output), output
            assert float(output.split()[-1]) >= 3  # the three generations above
        else:
            continue
        checked += 1
    assert checked == len(commands)
