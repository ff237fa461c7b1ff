"""QLoRA under FSDP2 on two processes (torchrun, gloo on CPU) trains as one process does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import FAST
from test_finetune import base as finetune_base  # noqa: F401  (a fixture: a tiny pretrained GPT run dir)
from test_finetune import chat as finetune_chat  # noqa: F401  (a fixture: chat JSONL, train and val)
from train_helpers import make_token_dir

from lmforge.train import checkpoint as ckpt

pytest.importorskip("torch.distributed.fsdp")

WORKER = """
import sys
import lmforge.train.distributed as d
from lmforge.adapters.options import AdapterOptions
from lmforge.adapters.qlora import qlora_transform
from lmforge.config import load_config
from lmforge.train.loop import pretrain

out, *sets = sys.argv[1:]
options = AdapterOptions(method="qlora", lora_rank=4, lora_alpha=8.0)
pretrain(load_config(None, sets), out, transforms=[qlora_transform(options)])
if d.left_process_group:
    d.leave_process(0)
"""


def sets(tokens: Path, batch: int, *extra: str) -> list[str]:
    return [f"data.tokens={tokens}", "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32",
            f"train.batch_size={batch}", "train.grad_accum=1", "train.max_steps=4", "train.warmup_steps=1",
            "train.lr=1e-2", "train.eval_every=4", "train.eval_steps=1", "train.precision=fp32",
            "train.threads=1", *extra]


def run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # two training runs, one under torchrun: about a minute on 2 busy cores
def test_qlora_under_fsdp2_on_two_processes_matches_one(tmp_path):
    tokens = make_token_dir(tmp_path / "tok")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    single, multi = tmp_path / "single", tmp_path / "multi"
    run([sys.executable, str(worker), str(single), *sets(tokens, 4)])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
         str(multi), *sets(tokens, 2, "train.parallel=fsdp")])
    a, b = metrics(single), metrics(multi)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-4, (x, y)
    assert a[0]["loss"] > a[-1]["loss"]  # it trains
    # the checkpoints: the base layout (dequantized NF4 weights) and the trained adapters, equal
    one, two = ckpt.latest_checkpoint(single), ckpt.latest_checkpoint(multi)
    base_a, base_b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert base_a.keys() == base_b.keys() and "blocks.0.attn.qkv.weight" in base_a
    assert all(torch.equal(base_a[k], base_b[k]) for k in base_a)
    lora_a, lora_b = load_file(str(one / ckpt.TRANSFORM_STATE)), load_file(str(two / ckpt.TRANSFORM_STATE))
    assert lora_a.keys() == lora_b.keys() and all("lora_" in k for k in lora_a)
    assert any(v.abs().max() > 0 for k, v in lora_a.items() if k.endswith("lora_B"))  # B left zero: trained
    for k in lora_a:
        torch.testing.assert_close(lora_a[k], lora_b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # a pretrained base, then `lmforge finetune sft-qlora` twice under torchrun: a minute or two
def test_qlora_finetune_under_fsdp2_gives_the_ddp_model(finetune_base, finetune_chat, tmp_path):  # noqa: F811
    """`torchrun ... lmforge finetune sft-qlora` on 2 CPU processes with train.parallel=fsdp and =ddp:
    the same losses and the same fine-tuned model, each with its adapter dir. (Against one process
    an SFT run differs slightly: each rank averages the loss over its own reply tokens.)"""
    base, chat = finetune_base, finetune_chat
    outs = {}
    for parallel in ("ddp", "fsdp"):
        out = outs[parallel] = tmp_path / parallel
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "lmforge", "finetune", "sft-qlora", "--base", str(base), "--data", str(chat / "train.jsonl"),
               "--out", str(out)]
        for s in [*FAST, f"data.val_file={chat / 'val.jsonl'}", f"train.parallel={parallel}", "train.batch_size=2",
                  "train.max_steps=6", "train.eval_every=3", "train.lr=1e-2", "adapter.lora_dropout=0.0"]:
            cmd += ["--set", s]
        run(cmd)
        assert (out / "adapter" / "adapter_config.json").exists()
    a, b = metrics(outs["ddp"]), metrics(outs["fsdp"])
    assert [x["loss"] for x in a] == pytest.approx([y["loss"] for y in b], abs=1e-5)
    assert a[-1]["loss"] < a[0]["loss"]
    (ddp, tokenizer), (fsdp, _) = ckpt.load_pretrained(outs["ddp"]), ckpt.load_pretrained(outs["fsdp"])
    x = torch.tensor([tokenizer.encode("who speaks of love?")])
    with torch.no_grad():
        torch.testing.assert_close(ddp(x)[0], fsdp(x)[0], atol=1e-5, rtol=1e-5)
