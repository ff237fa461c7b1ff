"""Knowledge distillation (`objective: distill`, `lmforge distill`): the KD loss against a hand
computation and trl's GKD loss, alpha=0 as plain next-token training, the command end to end,
exact resume, and bad input."""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import make_token_dir, tiny_config, write_corpus

from lmforge.cli import main
from lmforge.compress.distill import distill
from lmforge.config import load_config
from lmforge.errors import Interrupted, UserError
from lmforge.models import GPT
from lmforge.models.config import ModelConfig
from lmforge.train import checkpoint as ckpt
from lmforge.train.loop import pretrain
from lmforge.train.objectives.distill import Distill, kd_loss, layer_map

STUDENT = ["model.n_layer=1", "model.n_embd=16", "model.n_head=2", "train.max_steps=6", "train.eval_every=3"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(token dir, a tiny teacher run (2 x 32) trained on it)."""
    root = tmp_path_factory.mktemp("distill")
    tokens = make_token_dir(root)
    teacher = root / "teacher"
    pretrain(tiny_config(tokens, "train.max_steps=15", "train.eval_every=15"), teacher)
    return tokens, teacher


# ---- the loss ------------------------------------------------------------------------------------


def test_kd_loss_equals_a_hand_computation():
    # position 0: teacher logits (2, 0, 0), student (1, 0, -1), T = 2:
    #   p = softmax((1, 0, 0)) = (e, 1, 1) / (e + 2) = (0.5761169, 0.2119416, 0.2119416)
    #   q = softmax((0.5, 0, -0.5))                 = (0.5064804, 0.3071959, 0.1863237)
    #   KL(p || q) = sum p log(p / q) = 0.0228542;  T^2 * KL = 0.0914167
    # position 1 has target -100: not counted, however far apart the two are there
    student = torch.tensor([[[1.0, 0.0, -1.0], [9.0, -9.0, 0.0]]])
    teacher = torch.tensor([[[2.0, 0.0, 0.0], [-9.0, 9.0, 0.0]]])
    targets = torch.tensor([[0, -100]])
    assert kd_loss(student, teacher, targets, 2.0).item() == pytest.approx(0.0914167, abs=1e-6)
    # position 1 counted too: teacher (0, 1, 1)/2 -> (0.2326965, 0.3836517, 0.3836517), student (0, 3, 0)/2 ->
    # (0.1542808, 0.6914385, 0.1542808): KL 0.2191352; the mean over both, times 4: 0.4839787
    student[0, 1], teacher[0, 1] = torch.tensor([0.0, 3.0, 0.0]), torch.tensor([0.0, 1.0, 1.0])
    assert kd_loss(student, teacher, torch.tensor([[0, 2]]), 2.0).item() == pytest.approx(0.4839787, abs=1e-6)
    assert kd_loss(student, student, torch.tensor([[0, 2]]), 3.0).item() == pytest.approx(0.0, abs=1e-7)


def trl_generalized_jsd_loss():
    """trl's `GKDTrainer.generalized_jsd_loss`, read from its source: importing trl (transformers'
    Trainer) costs tens of seconds on this machine, the function needs only torch."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("trl")
    file = Path(spec.origin).parent / "experimental" / "gkd" / "gkd_trainer.py" if spec else None
    if file is None or not file.is_file():
        pytest.skip("trl's GKD trainer is not installed")
    tree = ast.parse(file.read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "generalized_jsd_loss")
    node.decorator_list = []
    namespace = {"torch": torch, "F": torch.nn.functional}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(file), "exec"), namespace)
    return namespace["generalized_jsd_loss"]


def test_kd_loss_equals_trl_gkd_forward_kl():
    """trl's GKD loss with beta=0 is KL(teacher || student) at temperature T, averaged over the
    tokens whose label is not -100 (without the T^2 factor)."""
    reference = trl_generalized_jsd_loss()
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 11, generator=g) * 3, torch.randn(3, 5, 11, generator=g) * 3
    targets = torch.randint(0, 11, (3, 5), generator=g)
    targets[0, :2] = targets[2, 4] = -100
    for temperature in (1.0, 2.0, 4.0):
        theirs = reference(student, teacher, labels=targets, beta=0.0, temperature=temperature)
        assert kd_loss(student, teacher, targets, temperature).item() == pytest.approx(
            temperature ** 2 * theirs.item(), rel=1e-5)


def test_layer_map_meets_at_the_last_block():
    assert layer_map(2, 4) == [1, 3]
    assert layer_map(3, 6) == [1, 3, 5]
    assert layer_map(4, 4) == [0, 1, 2, 3]


def test_teacher_equal_to_the_student_leaves_only_the_labels(setup):
    """A teacher with the student's own weights: KL and hidden MSE are 0, the loss is (1 - alpha) * CE;
    another teacher of the same width gives both parts > 0."""
    tokens, _ = setup
    cfg = tiny_config(tokens, "objective=distill", "distill.alpha=0.3", "distill.hidden_weight=2.0")
    model_cfg = ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": 64})
    torch.manual_seed(0)
    student = GPT(model_cfg).train()
    ids = torch.randint(0, 64, (2, 16))
    batch = {"input_ids": ids, "targets": torch.roll(ids, -1, 1)}
    objective = Distill(cfg, None, model_cfg, {"teacher": copy.deepcopy(student)})
    ce = student(batch["input_ids"], batch["targets"])[1]
    assert objective.loss(student, batch).item() == pytest.approx(0.7 * ce.item(), rel=1e-6)
    parts = objective.step_metrics()
    assert parts["kd_loss"] == pytest.approx(0.0, abs=1e-6) and parts["hidden_loss"] == pytest.approx(0.0, abs=1e-6)
    other = Distill(cfg, None, model_cfg, {"teacher": GPT(model_cfg)})
    loss = other.loss(student, batch)
    parts = other.step_metrics()
    assert parts["kd_loss"] > 0 and parts["hidden_loss"] > 0
    expected = 0.3 * parts["kd_loss"] + 0.7 * parts["ce_loss"] + 2.0 * parts["hidden_loss"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---- runs ------------------------------------------------------------------------------------------


def test_alpha_zero_is_plain_next_token_training(setup, tmp_path):
    """alpha=0: every step's loss and every val loss equal a `pretrain` run's of the same student."""
    tokens, teacher = setup
    pretrain(tiny_config(tokens, *STUDENT), tmp_path / "scratch")
    distill(tiny_config(tokens, *STUDENT, "distill.alpha=0"), tmp_path / "kd", teacher=teacher)
    plain, kd = records(tmp_path / "scratch"), records(tmp_path / "kd")
    assert [r["loss"] for r in kd] == [r["loss"] for r in plain]
    assert [r.get("val_loss") for r in kd] == [r.get("val_loss") for r in plain]
    assert all(r["kd_loss"] > 0 and r["ce_loss"] == r["loss"] for r in kd)


def test_distill_command_end_to_end(setup, tmp_path, capsys):
    """A recipe without data.tokens trains on the teacher's token dir; the run loads as a checkpoint
    and its summary records stage distill and the teacher."""
    tokens, teacher = setup
    recipe = tmp_path / "student.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32},
        "train": {"batch_size": 4, "max_steps": 6, "eval_every": 3, "eval_steps": 2, "warmup_steps": 2,
                  "precision": "fp32", "threads": 1},
        "distill": {"temperature": 2.0, "alpha": 0.7}}))
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher), str(recipe), "--out", str(out)]) == 0
    assert "done: distilled 6 steps" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "distill"
    assert summary["inputs"]["teacher"]["path"] == str(ckpt.resolve_checkpoint(teacher))
    assert Path(summary["inputs"]["tokens"]["path"]) == tokens
    assert summary["config"]["objective"] == "distill" and summary["config"]["distill"]["alpha"] == 0.7
    assert {"final_kd_loss", "final_ce_loss"} <= set(summary["metrics"])
    last = records(out)[-1]
    assert last["loss"] == pytest.approx(0.7 * last["kd_loss"] + 0.3 * last["ce_loss"], rel=1e-4)
    model, tokenizer = ckpt.load_pretrained(out)
    assert model.config.n_embd == 16 and "teacher" not in "".join(model.state_dict())
    assert model(torch.tensor([tokenizer.encode("the king")]))[0].shape[-1] == model.config.vocab_size


def test_resume_equals_uninterrupted(setup, tmp_path):
    tokens, teacher = setup
    args = (*STUDENT, "distill.temperature=3")
    distill(tiny_config(tokens, *args), tmp_path / "straight", teacher=teacher)

    def ctrl_c(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        distill(tiny_config(tokens, *args), tmp_path / "resumed", teacher=teacher, on_step=ctrl_c)
    assert ckpt.latest_checkpoint(tmp_path / "resumed").name == "step_000002"
    distill(tiny_config(tokens, *args), tmp_path / "resumed", teacher=teacher, resume=True)
    a, b = records(tmp_path / "straight"), records(tmp_path / "resumed")
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "kd_loss", "ce_loss", "val_loss"):
        assert abs(a[-1][key] - b[-1][key]) <= 1e-6


# ---- bad input ---------------------------------------------------------------------------------------


def test_options_are_checked_at_load():
    for bad, match in (("distill.temperature=0", "temperature"), ("distill.alpha=1.5", "alpha"),
                       ("distill.alpha=-0.1", "alpha"), ("distill.hidden_weight=-1", "hidden_weight")):
        with pytest.raises(UserError, match=match):
            load_config(None, [bad])


def test_pretrain_refuses_objective_distill(setup, tmp_path):
    tokens, _ = setup
    with pytest.raises(UserError, match="lmforge distill --teacher"):
        pretrain(tiny_config(tokens, *STUDENT, "objective=distill"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys):
    tokens, teacher = setup
    other = tmp_path / "other"  # a teacher copy carrying another tokenizer
    ckpt_dir = ckpt.resolve_checkpoint(teacher)
    other.mkdir()
    for f in ckpt_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    from lmforge.tokenizer.train import train_tokenizer

    corpus = write_corpus(tmp_path / "corpus2", docs=2)
    (corpus / "extra.txt").write_text("zebra quux 0123456789 XYZ")
    train_tokenizer(corpus, tmp_path / "tok2", kind="char")
    (other / "tokenizer.json").write_bytes((tmp_path / "tok2" / "tokenizer.json").read_bytes())
    sets = [f"data.tokens={tokens}", "model.block_size=32", *STUDENT]
    base = [x for s in sets for x in ("--set", s)]
    cases = [
        (["--teacher", str(tmp_path / "missing")], "does not exist"),
        (["--teacher", str(other)], "is not the student's data tokenizer"),
        (["--teacher", str(teacher), "--set", "distill.temperature=0"], "distill.temperature"),
        (["--teacher", str(teacher), "--set", "distill.alpha=2"], "distill.alpha"),
        (["--teacher", str(teacher), "--set", "distill.hidden_weight=1"], "model.n_embd (16)"),
    ]
    for i, (argv, match) in enumerate(cases):
        out = tmp_path / f"run{i}"
        capsys.readouterr()
        assert main(["distill", *argv, "nano", "--out", str(out), *base]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
        assert not out.exists()


@pytest.mark.slow
def test_two_processes_match_one_under_ddp(setup, tmp_path):
    """`lmforge distill` under torchrun (DDP, gloo): each process holds its own teacher replica; the
    losses (and kd_loss) equal one process's with the same global batch."""
    import subprocess
    import sys

    tokens, teacher = setup
    sets = [f"data.tokens={tokens}", "model.block_size=32", *STUDENT, "train.grad_accum=2", "train.precision=fp32",
            "train.threads=1", "train.warmup_steps=2"]

    def run(launcher: list[str], out: Path, *extra: str) -> list[dict]:
        cmd = [*launcher, "distill", "--teacher", str(teacher), "nano", "--out", str(out)]
        for s in (*sets, *extra):
            cmd += ["--set", s]
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return records(out)

    one = run([sys.executable, "-m", "lmforge"], tmp_path / "one", "train.batch_size=4")
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "lmforge"], tmp_path / "two", "train.batch_size=2", "train.parallel=ddp")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 and abs(a["kd_loss"] - b["kd_loss"]) <= 1e-4, (a, b)
    assert abs(one[-1]["val_loss"] - two[-1]["val_loss"]) <= 1e-4
