"""`lmforge eval` from the command line: bad task files and checkpoints give one line with file:line, exit 2."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from eval_helpers import make_checkpoint, write_task

from lmforge.cli import main
from lmforge.models import ModelConfig


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("evalcli"))[0]


def run_eval(capsys, ckpt, task, out, *extra: str) -> tuple[int, str, str]:
    code = main(["eval", "--ckpt", str(ckpt), "--task", str(task), "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


MC = {"context": "the king", "choices": [" my lord", " good sir"], "gold": 0}


@pytest.mark.parametrize("kind,items,raw,expected", [
    # a missing field, on the item's own line (line 3: after the header and one good item)
    ("multiple_choice", [MC, {"context": "x", "choices": ["a", "b"]}], None, r":3: missing field 'gold'"),
    ("binary", [{"question": "Is it?"}], None, r":2: missing field 'answer'"),
    ("generation", [{"prompt": "p"}], None, r":2: missing field 'reference' or 'references'"),
    # a label outside the declared label set
    ("classification", [{"text": "t", "label": "a"}, {"text": "u", "label": "c"}], None,
     r":3: label 'c' is not in the label set \['a', 'b'\]"),
    # empty references
    ("generation", [{"prompt": "p", "reference": "  "}], None, r":2: field 'reference' holds an empty reference"),
    ("generation", [{"prompt": "p", "references": ["ok", ""]}], None,
     r":2: field 'references' holds an empty reference"),
    ("qa", [{"question": "q", "answers": []}], None, r":2: field 'answers' must be a string or a non-empty list"),
    # wrong values
    ("binary", [{"question": "Is it?", "answer": "maybe"}], None,
     r":2: 'answer' is 'maybe'; a binary item's answer must be"),
    ("multiple_choice", [{**MC, "gold": 2}], None, r":2: 'gold' is 2; it must be the index \(0..1\)"),
    ("multiple_choice", [{**MC, "choices": ["only one"]}], None, r":2: 'choices' must be a list of 2 or more"),
    ("perplexity", [{"text": 5}], None, r":2: field 'text' must be a string, got int"),
    # broken lines
    ("perplexity", [{"text": "fine"}], ["{not json"], r":3: invalid JSON"),
    ("perplexity", [{"text": "fine"}], ["[1, 2]"], r":3: each line must be a JSON object"),
    ("perplexity", [{"text": "fine"}], ['{"task": {"kind": "perplexity"}}'],
     r":3: a task header .* may only be the first line"),
])
def test_bad_task_file_is_one_line_with_file_and_line(ckpt_dir, tmp_path, capsys, kind, items, raw, expected):
    header = {"kind": kind, **({"labels": ["a", "b"]} if kind == "classification" else {})}
    task = write_task(tmp_path / "task.jsonl", items, header, raw_lines=raw)
    code, _, err = run_eval(capsys, ckpt_dir, task, tmp_path / "out")
    assert code == 2
    line = one_error_line(err)
    assert str(task) in line
    assert re.search(expected, line), line
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_bad_header_and_kind(ckpt_dir, tmp_path, capsys):
    task = write_task(tmp_path / "t.jsonl", [{"text": "x"}])
    code, _, err = run_eval(capsys, ckpt_dir, task, tmp_path / "out")
    assert code == 2 and "no kind given; pass --kind" in one_error_line(err)
    task = write_task(tmp_path / "t.jsonl", [{"text": "x"}], {"kind": "perplexity"})
    code, _, err = run_eval(capsys, ckpt_dir, task, tmp_path / "out", "--kind", "qa")
    assert code == 2 and "the file says kind 'perplexity' but --kind is 'qa'" in one_error_line(err)
    task = write_task(tmp_path / "t.jsonl", [{"text": "x"}], {"kind": "perplexity", "lables": ["a"]})
    code, _, err = run_eval(capsys, ckpt_dir, task, tmp_path / "out")
    assert code == 2 and f"{task}:1: unknown header key 'lables'" in one_error_line(err)
    task = write_task(tmp_path / "t.jsonl", [{"text": "x"}], {"kind": "summarize"})
    code, _, err = run_eval(capsys, ckpt_dir, task, tmp_path / "out")
    assert code == 2 and "unknown task kind 'summarize'" in one_error_line(err)
    task = write_task(tmp_path / "t.jsonl", [], {"kind": "perplexity"})
    code, _, err = run_eval(capsys, ckpt_dir, task, tmp_path / "out")
    assert code == 2 and "no items" in one_error_line(err)
    code, _, err = run_eval(capsys, ckpt_dir, tmp_path / "missing.jsonl", tmp_path / "out")
    assert code == 2 and "missing.jsonl does not exist" in one_error_line(err)


def test_split_in_header_and_on_the_command_line_must_agree(ckpt_dir, tmp_path, capsys):
    task = write_task(tmp_path / "t.jsonl", [{"text": "x y z"}], {"kind": "perplexity", "split": "test"})
    code, _, err = run_eval(capsys, ckpt_dir, task, tmp_path / "out", "--split", "val")
    assert code == 2 and "the header says split 'test' but --split is 'val'" in one_error_line(err)


def test_checkpoint_without_tokenizer_is_one_line(ckpt_dir, tmp_path, capsys):
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, broken)
    (broken / "tokenizer.json").unlink()
    task = write_task(tmp_path / "t.jsonl", [{"text": "x"}], {"kind": "perplexity"})
    code, _, err = run_eval(capsys, broken, task, tmp_path / "out")
    assert code == 2 and f"{broken / 'tokenizer.json'} is missing" in one_error_line(err)
    code, _, err = run_eval(capsys, tmp_path / "nowhere", task, tmp_path / "out")
    assert code == 2 and "does not exist" in one_error_line(err)


def test_cli_prints_the_split_and_where_the_report_is(ckpt_dir, tmp_path, capsys):
    task = write_task(tmp_path / "mc.jsonl", [MC, MC], {"kind": "multiple_choice", "split": "test", "name": "demo mc"})
    code, out, _ = run_eval(capsys, ckpt_dir, task, tmp_path / "out", "--limit", "1")
    assert code == 0
    assert "demo_mc [multiple_choice, split: test, 1 items]: acc" in out
    assert f"report: {tmp_path / 'out' / 'report.md'}" in out
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["split"] == "test" and result["limit"] == 1 and len(result["predictions"]) == 1


def test_template_with_an_unknown_field_is_a_user_error(ckpt_dir, tmp_path, capsys):
    task = write_task(tmp_path / "t.jsonl", [{"question": "Is it?", "answer": "yes"}],
                      {"kind": "binary", "template": "Q: {query}\nA:"})
    code, _, err = run_eval(capsys, ckpt_dir, task, tmp_path / "out")
    assert code == 2 and "template 'Q: {query}\\nA:' cannot be filled" in one_error_line(err)


def test_sampled_generation_is_batched_and_per_item_seeded(tmp_path, capsys):
    """--temperature samples; a reply is the one `generate_text` gives its prompt alone with seed
    --seed + i, whatever --batch-size (each prompt is its own engine row); a negative temperature is exit 2."""
    from lmforge.infer.generate import generate_text

    ckpt, model, tok = make_checkpoint(tmp_path / "ck", block_size=48)
    prompts = ["KING:\nthe king my lord", "a", "ROMEO:\nwhat light through yonder", "my", "good sir, I pray thee now"]
    task = write_task(tmp_path / "g.jsonl", [{"prompt": p, "reference": "the king"} for p in prompts],
                      {"kind": "generation", "split": "test", "max_new_tokens": 10, "stop": ["\n"]})
    expected = [generate_text(model, tok, [tok.eos_id, *tok.encode(p)], max_new_tokens=10, temperature=0.9,
                              seed=5 + i, stop=["\n"]) for i, p in enumerate(prompts)]
    assert len(set(expected)) > 1
    for batch in ("1", "3", "16"):
        code, _, _ = run_eval(capsys, ckpt, task, tmp_path / f"out{batch}", "--temperature", "0.9", "--seed", "5",
                              "--batch-size", batch)
        result = json.loads((tmp_path / f"out{batch}" / "results.json").read_text())
        assert code == 0 and [p["prediction"] for p in result["predictions"]] == expected
        assert result["temperature"] == 0.9
    code, _, err = run_eval(capsys, ckpt, task, tmp_path / "bad", "--temperature", "-1")
    assert code == 2 and "--temperature must be >= 0" in one_error_line(err)


def test_generate_and_chat_on_an_encoder_checkpoint_are_one_line(tmp_path, capsys, monkeypatch):
    """A BERT reads but does not write text: generate and chat say so in one line, exit 2."""
    import io

    from lmforge.models import build_model
    from lmforge.train.checkpoint import save_checkpoint, tied_aliases

    root = make_checkpoint(tmp_path / "gpt")[0].parent  # for its tokenizer
    config = ModelConfig(arch="bert", vocab_size=320, n_layer=1, n_head=2, n_embd=32, block_size=32,
                         norm_position="post")
    model = build_model(config)
    ckpt = save_checkpoint(tmp_path / "bert", model.state_dict(), config.to_dict(), root / "tok" / "tokenizer.json",
                           None, drop=tied_aliases(model))
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "the king"]) == 2
    captured = capsys.readouterr()
    assert "does not write it" in one_error_line(captured.err) and "the king" not in captured.out
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", "--ckpt", str(ckpt)]) == 2
    assert "generate and chat need a GPT or encoder-decoder" in one_error_line(capsys.readouterr().err)
