"""The same pretrain command under torchrun: DDP and FSDP2 on CPU (gloo) match one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import make_token_dir

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmforge"]
SINGLE = [sys.executable, "-m", "lmforge"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_dir(tmp_path_factory.mktemp("tok"))


def args(tokens: Path, out: Path, batch: int, *extra: str) -> list[str]:
    sets = [f"data.tokens={tokens}", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
            "model.block_size=32", f"train.batch_size={batch}", "train.grad_accum=2", "train.max_steps=8",
            "train.warmup_steps=2", "train.lr=3e-3", "train.eval_every=4", "train.eval_steps=2",
            "train.precision=fp32", "train.threads=1", *extra]
    cmd = ["pretrain", "configs/nano.yaml", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tokens, tmp_path, parallel):
    single, multi = tmp_path / "single", tmp_path / "multi"
    run(SINGLE + args(tokens, single, 4))  # global batch 4 x 2 accum x 1 process
    run(TORCHRUN + args(tokens, multi, 2, f"train.parallel={parallel}"))  # 2 x 2 accum x 2 processes
    a, b = metrics(single), metrics(multi)
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-4, (x, y)
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) <= 1e-4

    # a checkpoint saved by 2 ranks resumes in 1 process, and the reverse
    run(SINGLE + args(tokens, multi, 4, "train.max_steps=10") + ["--resume"])
    run(TORCHRUN + args(tokens, single, 2, "train.max_steps=10", f"train.parallel={parallel}") + ["--resume"])
    a, b = metrics(single), metrics(multi)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
    for x, y in zip(a[8:], b[8:]):
        assert abs(x["loss"] - y["loss"]) <= 1e-4, (x, y)


def test_contrastive_bert_trains_under_ddp(tokens, tmp_path):
    """The SimCSE loss leaves the MLM head without gradients: DDP must not wait for them."""
    out = tmp_path / "ddp"
    run(TORCHRUN + args(tokens, out, 2, "train.parallel=ddp", "model.arch=bert", "model.norm_position=post",
                        "model.dropout=0.1", "objective=contrastive"))
    assert [r["step"] for r in metrics(out)] == list(range(1, 9))


def test_a_worker_that_left_its_group_exits_with_its_code_and_all_its_output():
    # torchrun workers end with os._exit (see distributed.leave_process); what they printed to
    # a pipe must still arrive, and the exit code must be the command's
    code = ("import sys, lmforge.train.distributed as d, lmforge.cli as cli\n"
            "d.left_process_group = True\n"
            "print('x' * 5000, end='')\n"
            "sys.argv = ['lmforge', 'plan', 'nano']\n"
            "cli.entry()\n"
            "raise SystemExit(99)  # not reached: entry() ends the process\n")
    proc = python_c(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("x" * 5000) and "parameters" in proc.stdout

    code = code.replace("'plan', 'nano'", "'plan', 'no-such-config'")
    proc = python_c(code)
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), (proc.returncode, proc.stderr[-2000:])

    # a library caller of main() always gets control back, and its code
    code = code.replace("cli.entry()", "raise SystemExit(cli.main(sys.argv[1:]) + 40)")
    proc = python_c(code)
    assert proc.returncode == 42, (proc.returncode, proc.stderr[-2000:])


def test_a_process_group_the_caller_made_is_left_alone(tmp_path):
    """A notebook or harness that set up its own group calls into training: `shutdown` must not
    destroy that group, nor mark the process as a worker to end with os._exit."""
    code = ("import os, torch.distributed as td, lmforge.train.distributed as d\n"
            f"td.init_process_group('gloo', init_method='file://{tmp_path}/store', rank=0, world_size=1)\n"
            "os.environ['WORLD_SIZE'] = '2'  # as under torchrun: init_distributed must join, not create\n"
            "info = d.init_distributed('ddp')\n"
            "d.shutdown()\n"
            "print(info.rank, td.is_initialized(), d.left_process_group)\n"
            "td.destroy_process_group()\n")
    proc = python_c(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0", "True", "False"]


def test_ctrl_c_under_torchrun_saves_and_writes_the_report(tokens, tmp_path):
    """SIGINT to the workers: every rank stops after the same step, the checkpoint and the report
    are written (a rank leaving before the main one finished made torchrun kill it mid-report),
    and --resume continues from that step."""
    out = tmp_path / "run"
    cmd = TORCHRUN + args(tokens, out, 2, "train.parallel=fsdp", "train.max_steps=100000", "train.eval_every=1000")
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        workers = [int(d) for d in os.listdir("/proc") if d.isdigit() and _parent(d) == proc.pid]
        assert len(workers) == 2
        for pid in workers:  # what a terminal's Ctrl-C delivers to them
            os.kill(pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    summary = json.loads((out / "summary.json").read_text())["metrics"]
    assert summary["stop_reason"] == "interrupted", stderr[-3000:]
    step = summary["steps"]
    assert (out / "report.md").is_file() and (out / "loss.png").is_file()
    assert (out / "checkpoints" / f"step_{step:06d}").is_dir()
    assert f"interrupted at step {step}" in stderr
    run(SINGLE + args(tokens, out, 4, f"train.max_steps={step + 2}") + ["--resume"])
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 3))


def python_c(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _parent(pid: str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):  # the process ended meanwhile
        return None
