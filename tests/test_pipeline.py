"""`lmforge run PIPELINE.yaml` and the reproducibility record.

Cheap shell stages (`sh -c`, their inputs and outputs named) test the order, the skipping and the
selection flags; real lmforge stages (tokenizer train -> tokenize on a few KB) test the record that
summary.json carries, an interrupted stage and `--reproduce`. Bad pipelines are refused before
anything runs, naming the stage and the line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import write_corpus

from lmforge import fsutil
from lmforge.cli import main
from lmforge.pipeline import graph, load_pipeline, run_pipeline, state
from lmforge.pipeline.runner import reproduce, stage_argv

REPO = Path(__file__).resolve().parents[1]


def _shell_pipeline(tmp_path: Path) -> Path:
    """a -> b -> c, and x on its own; listed out of order. Each appends its name to `log`."""
    (tmp_path / "src.txt").write_text("hello\n")
    (tmp_path / "other.txt").write_text("other\n")
    file = tmp_path / "p.yaml"
    file.write_text("""\
vars:
  d: .
stages:
  c:
    shell: cat ${d}/b.txt ${d}/b.txt > ${d}/c.txt && echo c >> ${d}/log
    inputs: ["${d}/b.txt"]
    outputs: ["${d}/c.txt"]
  b:
    shell: tr a-z A-Z < ${d}/a.txt > ${d}/b.txt && echo b >> ${d}/log
    inputs: ["${d}/a.txt"]
    outputs: ["${d}/b.txt"]
  a:
    shell: cut -c1-3 ${d}/src.txt > ${d}/a.txt && echo a >> ${d}/log
    inputs: ["${d}/src.txt"]
    outputs: ["${d}/a.txt"]
  x:
    shell: cp ${d}/other.txt ${d}/x.txt && echo x >> ${d}/log
    inputs: ["${d}/other.txt"]
    outputs: ["${d}/x.txt"]
""")
    return file


def _log(tmp_path: Path) -> list[str]:
    log = tmp_path / "log"
    out = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return out


def test_order_skip_and_only_downstream_reruns(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    file = _shell_pipeline(tmp_path)
    assert run_pipeline(file) == {"a": "run", "b": "run", "c": "run", "x": "run"}
    assert _log(tmp_path) == ["a", "b", "c", "x"]  # dependencies first, file order otherwise
    assert (tmp_path / "c.txt").read_text() == "HEL\nHEL\n"
    assert set(run_pipeline(file).values()) == {"up to date"}
    assert _log(tmp_path) == []
    os.utime(tmp_path / "src.txt", (1, 1))  # a new mtime, the same content: still up to date
    assert set(run_pipeline(file).values()) == {"up to date"}
    (tmp_path / "src.txt").write_text("help\n")  # a's input changes, but a's output stays "hel"
    assert run_pipeline(file) == {"a": "run", "b": "up to date", "c": "up to date", "x": "up to date"}
    (tmp_path / "src.txt").write_text("world\n")
    capsys.readouterr()
    assert run_pipeline(file) == {"a": "run", "b": "run", "c": "run", "x": "up to date"}
    assert _log(tmp_path) == ["a", "a", "b", "c"]
    assert "run (why: input src.txt changed)" in capsys.readouterr().out
    (tmp_path / "b.txt").write_text("tampered\n")  # an output changed by hand: its readers re-run
    assert run_pipeline(file)["c"] == "run"


def test_force_from_until_and_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    file = _shell_pipeline(tmp_path)
    plan = run_pipeline(file, dry_run=True)
    assert plan == {"a": "run", "b": "run", "c": "run", "x": "run"} and _log(tmp_path) == []
    assert not (tmp_path / "a.txt").exists()  # a dry run runs nothing
    assert run_pipeline(file, until="b") == {"a": "run", "b": "run", "c": "not selected", "x": "not selected"}
    assert _log(tmp_path) == ["a", "b"]
    assert run_pipeline(file, start="b") == {"a": "not selected", "b": "up to date", "c": "run",
                                             "x": "not selected"}
    run_pipeline(file)
    _log(tmp_path)
    assert run_pipeline(file, force=["b"])["b"] == "run"
    assert _log(tmp_path) == ["b"]  # b's output came out the same: c stays up to date
    (tmp_path / "src.txt").write_text("other words\n")
    capsys.readouterr()
    assert run_pipeline(file, dry_run=True) == {"a": "run", "b": "run", "c": "run", "x": "up to date"}
    out = capsys.readouterr().out
    assert "a  run (why: input src.txt changed)" in out and "b  run (why: after a runs" in out
    assert _log(tmp_path) == [] and (tmp_path / "a.txt").read_text() == "hel\n"


def test_the_demo_pipelines_derive_their_dag_from_the_flags(tmp_path):
    """No inputs:/outputs: in the shipped pipelines: every edge comes from the commands' own flags."""
    run = str(tmp_path / "demo")
    demo = load_pipeline(REPO / "configs/pipelines/demo.yaml", {"run": run})
    ios = graph.build_graph(demo)
    assert ios["fetch"].deps == [] and ios["prepare"].deps == ["fetch"]
    assert sorted(ios["tokenize"].deps) == ["prepare", "tokenizer"]
    assert ios["pretrain"].deps == ["tokenize"]  # through --set data.tokens=DIR
    assert ios["pretrain"].resumable and ios["pretrain"].outputs == [graph.norm(f"{run}/model")]
    assert sorted(ios["eval"].deps) == ["pretrain", "tasks"] and ios["sample"].deps == ["pretrain"]
    assert ios["sample"].outputs == [graph.norm(f"{run}/sample.txt")]
    chat = graph.build_graph(load_pipeline(REPO / "configs/pipelines/chat.yaml", {"run": run}))
    assert chat["sft"].deps == ["sft-data"]  # ${chat}/data/sft.jsonl: the deepest output that holds it
    assert sorted(chat["dpo"].deps) == ["sft", "sft-data"]
    assert sorted(chat["compare"].deps) == ["dpo", "sft", "sft-data"]


BAD = {
    "cycle": ("stages:\n  a:\n    shell: cp y x\n    inputs: [y]\n    outputs: [x]\n"
              "  b:\n    shell: cp x y\n    inputs: [x]\n    outputs: [y]\n", ":2: stage a: the stages form a cycle"),
    "name twice": ("stages:\n  a: tokenizer train --input c --out t1\n  a: tokenizer train --input c --out t2\n",
                   ":3: stage name 'a' used twice (first at line 2)"),
    "shared output": ("stages:\n  a: tokenizer train --input c --out t\n  b: tokenizer train --input c --out t\n",
                      ":3: stage b: writes t, which stage a writes too"),
    "unknown command": ("stages:\n  a: tokenizer trian --input c --out t\n",
                        ":2: stage a: argument tok_command: invalid choice: 'trian'"),
    "unknown argument": ("stages:\n  x:\n    shell: mkdir c\n    outputs: [c]\n  a:\n    cmd: tokenizer train "
                         "--input c --out t --bogus 10\n", ":6: stage a: unrecognized arguments: --bogus 10 "
                         "(in: lmforge tokenizer train --input c --out t --bogus 10)"),
    "undefined variable": ("vars:\n  run: r\nstages:\n  a: tokenizer train --input ${run}/c --out ${runs}/t\n",
                           ":4: undefined variable ${runs}; define it under vars: or pass --var runs=VALUE"),
    "unknown key": ("stages:\n  a:\n    cmd: tokenizer train --input c --out t\n    output: [t]\n",
                    ":4: stage a: unknown key 'output'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pipelines_exit_2_naming_stage_and_line_before_anything_runs(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text, expected = BAD[case]
    (tmp_path / "p.yaml").write_text(text)
    assert main(["run", "p.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: p.yaml:") and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]  # nothing written


def _real_pipeline(tmp_path: Path) -> Path:
    corpus = write_corpus(tmp_path / "corpus", docs=4)
    # ~3 MB more of the same characters: tokenizing takes long enough (about a second) to be interrupted
    text = "".join(p.read_text() for p in sorted(corpus.iterdir()))
    (corpus / "long.txt").write_text(text * 500)
    file = tmp_path / "real.yaml"
    file.write_text("vars:\n  run: out\nstages:\n"
                    "  tokens: tokenize --tokenizer ${run}/tok --input corpus --out ${run}/tokens --val-fraction 0.2\n"
                    "  tok: tokenizer train --kind char --input corpus --out ${run}/tok\n")
    return file


def _interrupt_at(tmp_path: Path, header: str, working: str = "tokenize:") -> tuple[int, str]:
    """Run `lmforge run real.yaml` and press Ctrl-C (SIGINT to it) once the stage announced by `header`
    shows that it works (its progress line, `working`): not a fixed delay, which a fast stage outruns."""
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "run", "real.yaml"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, started = [], False
    for line in proc.stdout:
        seen.append(line)
        started = started or line.startswith(header)
        if started and line.startswith(working):
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + rest


def test_real_stages_record_skip_resume_after_ctrl_c_and_reproduce(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _real_pipeline(tmp_path)
    rc, out = _interrupt_at(tmp_path, "== [2/2] tokens")
    assert rc == 130 and "stage tokens interrupted; `lmforge run real.yaml` starts again at it" in out, out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tok"]  # nothing half-written
    assert run_pipeline("real.yaml") == {"tok": "up to date", "tokens": "run"}  # it starts again there
    summary = json.loads((tmp_path / "out/tokens/summary.json").read_text())
    record = summary["pipeline"]
    assert record["stage"] == "tokens" and record["argv"][:3] == ["tokenize", "--tokenizer", "out/tok"]
    assert record["inputs"] == {"out/tok": state.HashCache().tree("out/tok"),
                                "corpus": fsutil.tree_sha256("corpus")}
    rep = summary["reproduce"]
    assert rep["argv"] == record["argv"] and rep["command"] == "lmforge " + " ".join(record["argv"])
    assert rep["cwd"] == str(tmp_path) and rep["host"]["cpu"]
    assert set(run_pipeline("real.yaml").values()) == {"up to date"}
    before = state.HashCache().tree("out/tokens")
    created = summary["created"], (tmp_path / "out/tokens/summary.json").stat().st_mtime_ns
    assert reproduce("out/tokens") == record["argv"]
    again = json.loads((tmp_path / "out/tokens/summary.json").read_text())
    assert (again["created"], (tmp_path / "out/tokens/summary.json").stat().st_mtime_ns) != created  # it ran
    assert state.HashCache().tree("out/tokens") == before  # the same output, byte for byte
    assert set(run_pipeline("real.yaml").values()) == {"up to date"}  # and still the pipeline's


def test_an_interrupted_training_stage_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """The runner's decision (no training here): checkpoints of the same record and no finished summary
    -> --resume instead of --overwrite; another command or a finished run -> no resume."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokens").mkdir()
    (tmp_path / "p.yaml").write_text("stages:\n  train: pretrain nano --out run --overwrite --set data.tokens=tokens\n")
    pipeline = load_pipeline("p.yaml")
    sio, stage = graph.build_graph(pipeline)["train"], pipeline.stages[0]
    record = state.make_record(pipeline.path, stage, sio, state.HashCache())
    assert state.verdict(stage, sio, record, forced=False).why == "no output run"
    state.mark_started("run", record)  # what the runner writes before a training stage starts
    ckpt = tmp_path / "run/checkpoints/step_000020"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"")
    v = state.verdict(stage, sio, record, forced=False)
    assert v.run and v.resume and "step 20" in v.why
    argv = stage_argv(stage, v.resume)
    assert argv[-1] == "--resume" and "--overwrite" not in argv and argv[1:3] == ["-m", "lmforge"]
    changed = dict(record, argv=[*record["argv"], "--set", "train.lr=1e-3"])
    assert not state.verdict(stage, sio, changed, forced=False).resume
    (tmp_path / "run/summary.json").write_text(json.dumps({"pipeline": record}))  # it finished
    assert state.verdict(stage, sio, record, forced=False) == state.Verdict(False, "up to date")


def test_summary_records_how_to_reproduce_it(tmp_path, monkeypatch):
    fsutil.source_revision.cache_clear()
    monkeypatch.setenv(fsutil.PIPELINE_ENV, json.dumps({"stage": "s", "argv": ["x"]}))
    fsutil.set_invocation(["data", "prepare", "--input", "a b.txt", "--out", "o"])
    try:
        summary = fsutil.write_summary(tmp_path, "data prepare")
    finally:
        fsutil.set_invocation(None)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    rep = summary["reproduce"]
    assert rep["command"] == "lmforge data prepare --input 'a b.txt' --out o" and rep["cwd"] == os.getcwd()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a source checkout: its commit (and whether src/lmforge has edits)
        assert rep["git_commit"] == head.stdout.strip() and isinstance(rep["git_dirty"], bool)
    assert rep["host"]["hostname"] == os.uname().nodename and rep["host"]["cpu"]
    assert summary["pipeline"] == {"stage": "s", "argv": ["x"]}
    monkeypatch.setenv(fsutil.PIPELINE_ENV, "not json")
    summary = fsutil.write_summary(tmp_path, "data prepare")
    assert "pipeline" not in summary and summary["reproduce"]["argv"] is None  # no CLI call recorded


def test_an_output_inside_its_own_input_does_not_make_it_stale(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/a.txt").write_text("a\n")
    (tmp_path / "p.yaml").write_text("stages:\n  all:\n    shell: cat notes/*.txt > notes/all.out\n"
                                     "    inputs: [notes]\n    outputs: [notes/all.out]\n")
    assert run_pipeline("p.yaml") == {"all": "run"}
    assert run_pipeline("p.yaml") == {"all": "up to date"}
    (tmp_path / "notes/b.txt").write_text("b\n")
    assert run_pipeline("p.yaml") == {"all": "run"} and (tmp_path / "notes/all.out").read_text() == "a\nb\n"


@pytest.mark.slow
def test_a_real_training_stage_interrupted_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from train_helpers import make_token_dir

    monkeypatch.chdir(tmp_path)
    make_token_dir(tmp_path)
    tiny = ("--set model.n_layer=2 --set model.n_head=2 --set model.n_embd=32 --set model.block_size=32 "
            "--set train.batch_size=4 --set train.max_steps=60 --set train.eval_every=20 --set train.eval_steps=2 "
            "--set train.precision=fp32 --set train.threads=1")
    (tmp_path / "real.yaml").write_text(f"stages:\n  train: pretrain nano --out run --overwrite "
                                        f"--set data.tokens=tokens {tiny}\n")
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "run", "real.yaml"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "run/metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "starts again at it (from its checkpoint)" in out, out
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    stopped = summary["metrics"]["steps"]
    assert summary["metrics"]["stop_reason"] == "interrupted" and "pipeline" not in summary and stopped < 60
    assert run_pipeline("real.yaml") == {"train": "run"}
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["metrics"]["steps"] == 60 and summary["reproduce"]["argv"][-1] == "--resume"
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # one curve, continued where it stopped
    assert run_pipeline("real.yaml") == {"train": "up to date"}
