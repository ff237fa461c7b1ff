"""The command line end to end, and bad input: one line naming the file/key, exit code 2."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import write_corpus

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """corpus -> tokenizer -> tokens -> a short pretrain, all through the CLI."""
    tmp = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(tmp / "corpus")
    assert main(["tokenizer", "train", "--input", str(corpus), "--out", str(tmp / "tok"), "--kind", "bpe",
                 "--vocab-size", "300"]) == 0
    tokenize = ["tokenize", "--tokenizer", str(tmp / "tok"), "--input", str(corpus), "--out", str(tmp / "tokens")]
    assert main(tokenize) == 0
    sets = [f"data.tokens={tmp / 'tokens'}", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
            "model.block_size=32", "train.max_steps=12", "train.eval_every=6", "train.eval_steps=2",
            "train.batch_size=4", "train.precision=fp32"]
    args = ["pretrain", str(ROOT / "configs" / "nano.yaml"), "--out", str(tmp / "run")]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    return tmp / "run"


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("error: ")
    return err[0]


def test_generate_and_chat(run_dir, capsys, monkeypatch):
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "KING:", "--max-new-tokens", "20", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("KING:") and len(first) > len("KING:\n")
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "KING:", "--max-new-tokens", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n/reset\nwho art thou\n"))
    assert main(["chat", "--ckpt", str(run_dir), "--max-new-tokens", "8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2


def test_long_prompt_is_truncated_with_a_warning(run_dir, capsys):
    with pytest.warns(UserWarning, match="longer than the context"):
        assert main(["generate", "--ckpt", str(run_dir), "--prompt", "the king " * 40, "--max-new-tokens", "4"]) == 0


def test_config_typo(run_dir, capsys):
    assert main(["pretrain", str(ROOT / "configs" / "nano.yaml"), "--set", "train.lerning_rate=1"]) == 2
    assert "did you mean train" in error_line(capsys)


def test_missing_and_truncated_checkpoint(run_dir, tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in error_line(capsys)
    bad = tmp_path / "bad"
    shutil.copytree(run_dir / "checkpoints" / "best", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:100])
    assert main(["generate", "--ckpt", str(bad)]) == 2
    assert "model.safetensors" in error_line(capsys)
    (bad / "model.safetensors").unlink()
    assert main(["generate", "--ckpt", str(bad)]) == 2
    assert "model.safetensors" in error_line(capsys)


def test_tokenizer_that_does_not_match_the_model(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(run_dir / "checkpoints" / "best", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] = 64  # the tokenizer has 300 tokens
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", "--ckpt", str(bad)]) == 2
    assert "tokenizer.json" in error_line(capsys)


def test_resume_without_checkpoint(tmp_path, run_dir, capsys):
    tokens = run_dir.parent / "tokens"
    assert main(["pretrain", str(ROOT / "configs" / "nano.yaml"), "--out", str(tmp_path / "new"), "--resume",
                 "--set", f"data.tokens={tokens}"]) == 2
    assert "--resume" in error_line(capsys)


@pytest.mark.parametrize("case", ["empty", "binary", "utf8"])
def test_bad_corpus(tmp_path, capsys, case):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if case == "binary":
        (corpus / "a.txt").write_text("fine text\n")
        (corpus / "b.txt").write_bytes(b"\x7fELF\x00\x00\x01binary")
    elif case == "utf8":
        (corpus / "a.txt").write_bytes("good line\nbad \xff byte\n".encode("latin-1"))
    assert main(["tokenizer", "train", "--input", str(corpus), "--out", str(tmp_path / "tok")]) == 2
    line = error_line(capsys)
    assert str(corpus) in line
    assert not (tmp_path / "tok").exists()  # nothing half-written


def test_debug_shows_the_traceback(tmp_path):
    from lmforge.errors import UserError

    with pytest.raises(UserError):
        main(["--debug", "generate", "--ckpt", str(tmp_path / "missing")])


def test_python_m_lmforge_entry_point():
    command = [sys.executable, "-m", "lmforge", "pretrain", "configs/nano.yaml", "--set", "model.n_layers=2"]
    proc = subprocess.run(command,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --set model.n_layers=2: unknown config key model.n_layers; "
                                   "did you mean model.n_layer?")


def test_plan_and_embed_option_mistakes_are_one_line(tmp_path, capsys):
    """--lora-targets without a rank, an output file embed cannot write: exit 2 before any work;
    the GPU type is matched without regard to case."""
    assert main(["plan", "nano", "--lora-targets", "attn"]) == 2
    assert "--lora-targets needs --lora-rank" in error_line(capsys)
    assert main(["plan", "nano", "--gpu-type", "h100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compute"]["gpu_type"] == "H100"
    assert main(["embed", "--ckpt", str(tmp_path / "nowhere"), "--text", "x", "--out", str(tmp_path / "v.txt")]) == 2
    assert "write vectors to FILE.npy" in error_line(capsys) and not (tmp_path / "v.txt").exists()


def _into_closed_pipe(args: list[str]) -> subprocess.CompletedProcess:
    """Run `python -m lmforge ARGS` with stdout a pipe whose reader has already left."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader leaves before the command writes a byte: every write breaks
    try:
        return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=ROOT, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=180)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [
    ["plan", "nano"],
    ["plan", "nano", "--json"],
    ["--help"],
    ["diagnose", "{run}", "--json"],
    ["diagnose", "{run}"],
    ["generate", "--ckpt", "{run}", "--max-new-tokens", "50", "--seed", "0"],
])
def test_every_command_exits_quietly_into_a_closed_pipe(run_dir, args):
    """`lmforge diagnose RUN --json | head` printed a BrokenPipeError traceback: no command may."""
    proc = _into_closed_pipe([a.format(run=run_dir) for a in args])
    assert proc.stderr == "", proc.stderr[-2000:]
    assert proc.returncode in (0, 1), proc.returncode


def test_pretrain_refuses_a_run_that_cannot_fit(run_dir, capsys, monkeypatch):
    """`--set model.block_size=100000`: refused before allocating, with both numbers; --force goes
    past the check (to the next one: the tiny tokens dir holds fewer tokens than one window)."""
    import re
    import time

    from lmforge.train import fit

    monkeypatch.setattr(fit, "available_memory", lambda device: (8 * 2**30, "MemAvailable in /proc/meminfo"))
    args = ["pretrain", "nano", "--out", str(run_dir.parent / "huge"), "--set",
            f"data.tokens={run_dir.parent / 'tokens'}",
            "--set", "model.block_size=100000", "--set", "train.precision=fp32"]
    t0 = time.perf_counter()
    assert main(args) == 2
    line = error_line(capsys)
    assert time.perf_counter() - t0 < 30
    need, have = (float(x) for x in re.findall(r"([\d.]+) GiB", line))
    assert need > have == 8.0 and "--force" in line, line
    with pytest.warns(UserWarning, match="one training step is predicted to take about"):
        assert main(args + ["--force"]) == 2
    line = error_line(capsys)
    assert "model.block_size" in line and "GiB" not in line, line
    assert not (run_dir.parent / "huge" / "checkpoints").exists()


def test_parser_and_help_do_not_import_torch():
    # `lmforge --help`, `lmforge X --help` and `lmforge run`'s up-to-date checks only build the parser:
    # importing torch there cost seconds per command (the quantize/prune argument defaults did)
    code = ("import sys, lmforge.cli as c; p = c.build_parser(); p.parse_args(['quantize', '--ckpt', 'x', "
            "'--method', 'int4', '--out', 'y']); p.parse_args(['prune', '--ckpt', 'x', '--method', 'heads', "
            "'--sparsity', '0.5', '--out', 'y']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
