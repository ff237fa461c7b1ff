"""Experiment tracking (`train.loggers`) and `lmforge runs list/compare`.

The tracked numbers are read back with each backend's own reader (TensorBoard's EventAccumulator,
MLflow's client) and must equal metrics.jsonl record for record."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
from train_helpers import make_token_dir, tiny_config

from lmforge.cli import main
from lmforge.errors import Interrupted, UserError
from lmforge.train.loop import pretrain
from lmforge.train.report import read_metrics

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_dir(tmp_path_factory.mktemp("track"))


def tb_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def mlflow_history(run_dir, key):
    import mlflow

    state = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    client = mlflow.tracking.MlflowClient(tracking_uri=state["tracking_uri"])
    return state["run_id"], client, [(m.step, m.value) for m in client.get_metric_history(state["run_id"], key)]


def test_tensorboard_and_mlflow_receive_exactly_the_logged_metrics(tokens, tmp_path):
    out = tmp_path / "runs" / "a"
    pretrain(tiny_config(tokens, "train.max_steps=12", "train.eval_every=4", "train.loggers=[tensorboard, mlflow]"),
             out)
    records = read_metrics(out / "metrics.jsonl")
    losses = [(r["step"], r["loss"]) for r in records]
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert len(losses) == 12 and len(vals) == 3
    for tag, want in (("loss", losses), ("val_loss", vals)):
        got = tb_scalars(out, tag)
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # float32 in event files
    run_id, client, history = mlflow_history(out, "loss")
    assert sorted(history) == losses
    run = client.get_run(run_id)
    assert run.data.params["train.max_steps"] == "12" and run.data.params["model.n_embd"] == "32"
    assert run.data.metrics["final/final_val_loss"] == json.loads((out / "summary.json").read_text())[
        "metrics"]["final_val_loss"]
    assert (tmp_path / "runs" / "mlflow.db").is_file()  # default store: beside the run dir, no server
    assert "report.md" in {a.path for a in client.list_artifacts(run_id)}


def test_a_resumed_run_continues_the_same_tracking_run_without_duplicates(tokens, tmp_path):
    out = tmp_path / "r"
    cfg = ("train.max_steps=10", "train.eval_every=5", "train.loggers=[tensorboard, mlflow]")

    def ctrl_c(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        pretrain(tiny_config(tokens, *cfg), out, on_step=ctrl_c)
    first_id = json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"]
    pretrain(tiny_config(tokens, *cfg), out, resume=True)
    records = read_metrics(out / "metrics.jsonl")
    assert [s for s, _ in tb_scalars(out, "loss")] == list(range(1, 11))
    run_id, _, history = mlflow_history(out, "loss")
    assert run_id == first_id
    assert sorted(history) == [(r["step"], r["loss"]) for r in records]


def test_a_backend_that_is_not_installed_is_one_line_before_anything_runs(tokens, tmp_path, capsys):
    if "wandb" in sys.modules or __import__("importlib").util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    out = tmp_path / "nope"
    code = main(["pretrain", "nano", "--out", str(out), "--set", f"data.tokens={tokens}",
                 "--set", "train.loggers=[wandb]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "train.loggers" in err and "pip install wandb" in err and len(err.splitlines()) == 1
    assert not out.exists()
    with pytest.raises(UserError, match="unknown logger 'tensorbord'"):
        tiny_config(tokens, "train.loggers=[tensorbord]")


def test_wandb_gets_the_config_each_record_and_the_final_summary(tokens, tmp_path, monkeypatch):
    """wandb is not a dependency: a stand-in module records the calls lmforge makes to it."""
    fake = tmp_path / "fake" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "calls = []\n"
        "class Run:\n"
        "    id = 'abc123'\n"
        "    def __init__(self): self.summary = {}\n"
        "    def log(self, values, step): calls.append(('log', step, dict(values)))\n"
        "    def finish(self): calls.append(('finish',))\n"
        "def init(**kw):\n"
        "    calls.append(('init', kw)); r = Run(); globals()['run'] = r; return r\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    out = tmp_path / "w"
    pretrain(tiny_config(tokens, "train.max_steps=4", "train.eval_every=2", "train.loggers=[wandb]",
                         "train.experiment=proj"), out)
    import wandb

    init = wandb.calls[0]
    assert init[0] == "init" and init[1]["project"] == "proj" and init[1]["config"]["train"]["max_steps"] == 4
    logged = [(c[1], c[2]["loss"]) for c in wandb.calls if c[0] == "log"]
    assert logged == [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl")]
    assert wandb.run.summary["final_val_loss"] == json.loads((out / "summary.json").read_text())[
        "metrics"]["final_val_loss"]
    assert wandb.calls[-1] == ("finish",)
    monkeypatch.delitem(sys.modules, "wandb")


def test_runs_list_and_compare(tokens, tmp_path, capsys):
    root = tmp_path / "runs"
    pretrain(tiny_config(tokens, "train.max_steps=6", "train.eval_every=3"), root / "lr3")
    pretrain(tiny_config(tokens, "train.max_steps=6", "train.eval_every=3", "train.lr=1e-2"), root / "lr10")
    capsys.readouterr()
    assert main(["runs", "list", str(root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["run"] for r in rows) == [str(root / "lr10"), str(root / "lr3")]
    assert all(r["stage"] == "pretrain" and r["steps"] == 6 for r in rows)
    png = tmp_path / "cmp.png"
    assert main(["runs", "compare", str(root / "lr3"), str(root / "lr10"), "--out", str(png), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config_diff"] == {"train.lr": [3e-3, 1e-2]}  # the only key set differently
    finals = [json.loads((root / n / "summary.json").read_text())["metrics"]["final_val_loss"] for n in ("lr3", "lr10")]
    assert result["final"]["final_val_loss"] == finals
    assert png.stat().st_size > 10_000
    assert main(["runs", "compare", str(root / "lr3"), str(tmp_path)]) == 2
    assert "not a training run dir" in capsys.readouterr().err
