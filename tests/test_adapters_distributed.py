"""LoRA (and prefix/prompt tuning) under torchrun: DDP and FSDP2 on 2 CPU processes match one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import make_token_dir

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys
from lmforge.adapters import AdapterOptions, adapter_transform
from lmforge.config import load_config
from lmforge.train.loop import pretrain

method, out, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
cfg = load_config("configs/nano.yaml", sets)
options = AdapterOptions(method=method, lora_rank=4, prefix_len=4, prompt_len=4)
pretrain(cfg, out, transforms=[adapter_transform(options)])
"""


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_dir(tmp_path_factory.mktemp("tok"))


def run(script: Path, method: str, out: Path, tokens: Path, batch: int, procs: int, *extra: str) -> list[dict]:
    sets = [f"data.tokens={tokens}", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
            "model.block_size=32", f"train.batch_size={batch}", "train.grad_accum=2", "train.max_steps=6",
            "train.warmup_steps=2", "train.lr=1e-2", "train.eval_every=6", "train.eval_steps=2",
            "train.precision=fp32", "train.threads=1", *extra]
    launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node", str(procs)]
    proc = subprocess.run([*launch, str(script), method, str(out), *sets], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "parallel"),
                         [("lora", "ddp"), ("lora", "fsdp"), ("prefix", "fsdp"), ("prompt", "ddp")])
def test_two_processes_match_one(tokens, tmp_path, method, parallel):
    script = tmp_path / "finetune.py"
    script.write_text(SCRIPT)
    one = run(script, method, tmp_path / "one", tokens, 4, 1)  # global batch 4 x 2 accum x 1 process
    two = run(script, method, tmp_path / "two", tokens, 2, 2, f"train.parallel={parallel}")  # 2 x 2 x 2
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a, b)
    assert one[-1]["loss"] < one[0]["loss"]  # the adapter trains
