"""The setup pipeline's hooks: model transforms (module swaps that keep tensor names, so
checkpoints, exact resume and `convert to-hf` keep working), the fit check, and a second
Ctrl-C / SIGTERM that stops a process stuck in one long operation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from train_helpers import make_token_dir, tiny_config

from lmforge.errors import Interrupted, UserError
from lmforge.train import checkpoint as ckpt
from lmforge.train.loop import pretrain
from lmforge.train.transforms import TRANSFORMS, apply_transforms, register_transform


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_dir(tmp_path_factory.mktemp("tok"))


class ObservedLinear(nn.Linear):
    """A Linear that records the largest |input| per input feature while training (what a
    quantizer calibrates from) and carries a frozen per-output gain; `weight` and `bias` stay."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                seen = x.detach().abs().float().amax(dim=tuple(range(x.dim() - 1)))
                torch.maximum(self.input_absmax, seen, out=self.input_absmax)
        return super().forward(x) * self.gain


def observe_linears(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = ObservedLinear  # a swap in place: weight, bias and any tie are kept
            module.register_buffer("input_absmax", torch.zeros(module.in_features, device=module.weight.device))
            module.gain = nn.Parameter(torch.ones(module.out_features, device=module.weight.device),
                                       requires_grad=False)
    return model


register_transform("observe_linears")(observe_linears)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_transformed_model_checkpoints_resumes_exactly_and_converts(tokens, tmp_path):
    cfg = tiny_config(tokens, "train.max_steps=4", "train.eval_every=2", "model.dropout=0.1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(cfg, straight, transforms=[observe_linears])

    def ctrl_c(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        pretrain(cfg, resumed, transforms=["observe_linears"], on_step=ctrl_c)
    with pytest.raises(UserError, match="unexpected tensor .*model transforms"):
        pretrain(cfg, resumed, resume=True)  # without the transform its tensors have no place
    pretrain(cfg, resumed, resume=True, transforms=["observe_linears"])
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a[-1]["loss"] == pytest.approx(b[-1]["loss"], abs=1e-6)
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], abs=1e-6)

    last = ckpt.latest_checkpoint(resumed)
    extra = load_file(str(last / ckpt.TRANSFORM_STATE))
    again = load_file(str(ckpt.latest_checkpoint(straight) / ckpt.TRANSFORM_STATE))
    assert extra.keys() == again.keys() and all(torch.equal(extra[k], again[k]) for k in extra)
    absmax = [k for k in extra if k.endswith("input_absmax")]
    assert absmax and all(extra[k].max() > 0 for k in absmax)  # the buffers did change while training
    assert all(torch.equal(extra[k], torch.ones_like(extra[k])) for k in extra if k.endswith("gain"))
    # the plain model's names, nothing else, in model.safetensors; no optimizer state for the frozen gain
    from lmforge.models import build_model
    from lmforge.models.config import ModelConfig

    plain = build_model(ModelConfig.from_dict(ckpt.read_model_config(last)))
    assert set(load_file(str(last / "model.safetensors"))) == set(plain.state_dict()) - ckpt.tied_aliases(plain)
    state = torch.load(last / "trainer_state.pt", weights_only=True)
    assert not [k for k in state["optimizer"]["state"] if "gain" in k]

    transformers = pytest.importorskip("transformers")
    from lmforge.export.hf import to_hf

    to_hf(resumed, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    model, _ = ckpt.load_pretrained(resumed)
    x = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        ours = model(x)[0]
        assert torch.allclose(hf(x).logits, ours, atol=1e-4)
        observed = observe_linears(model).eval()  # the transform leaves the function alone
        assert torch.allclose(observed(x)[0], ours, atol=1e-6)


def test_transforms_must_keep_names_and_be_known():
    from lmforge.models import GPT
    from lmforge.models.config import ModelConfig

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    def wrap_head(model):
        model.lm_head = Wrapped(model.lm_head)
        return model

    model = GPT(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=8))
    with pytest.raises(ValueError, match=r"wrap_head: tensor 'lm_head.weight' is gone"):
        apply_transforms(model, [wrap_head])
    with pytest.raises(UserError, match="model transform 'lora' is not known; available: .*observe_linears"):
        apply_transforms(model, ["lora"])
    assert TRANSFORMS["observe_linears"] is observe_linears
    with pytest.raises(ValueError, match="already registered"):
        register_transform("observe_linears")(wrap_head)


def test_available_memory_reads_the_machine():
    from lmforge.train.fit import available_memory

    free, where = available_memory(torch.device("cpu"))
    assert where == "MemAvailable in /proc/meminfo"
    assert 0 < free < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


STUCK = """
import sys, torch
from lmforge.train.steps import StopFlag
torch.set_num_threads(1)
a = torch.randn(2000, 2000)
with StopFlag(grace_s=1.0) as flag:
    print("ready", flush=True)
    torch.linalg.matrix_power(a, 2**62)  # one operation of about a minute: Python runs no handler meanwhile
print("finished", flag.requested, flush=True)
"""


def test_a_second_signal_stops_a_process_stuck_in_one_long_operation():
    proc = subprocess.Popen([sys.executable, "-c", STUCK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert time.monotonic() - t0 < 10
    assert "finished" not in out
    assert "stop requested" in err and "stopped at once (second signal)" in err, err


def test_a_second_loop_built_from_the_public_parts_matches_pretrain_and_resumes_in_it(tokens, tmp_path):
    """The seam for another loop (PPO, issue 12): `setup_training` plus `lmforge.train.steps` and the
    run report. A loop written here from those parts gives pretrain's numbers step for step, and
    its checkpoint is one `pretrain --resume` continues."""
    from lmforge.train.distributed import DistInfo
    from lmforge.train.optim import lr_at
    from lmforge.train.report import write_run_report
    from lmforge.train.setup import setup_training
    from lmforge.train.steps import (
        Checkpointer,
        MetricsLog,
        StopFlag,
        apply_gradients,
        check_finite,
        clip_gradients,
        set_lr,
    )

    cfg = tiny_config(tokens, "train.max_steps=4", "train.eval_every=2")
    reference = tmp_path / "pretrain"
    pretrain(cfg, reference)

    info, t = DistInfo(), cfg.train
    s = setup_training(cfg, tmp_path / "other", info)
    log = MetricsLog(s.metrics_path, info)
    saver = Checkpointer(s.out, info, keep_last=t.keep_last, model_config=s.model_cfg.to_dict(),
                         tokenizer_file=s.tokenizer_file, config={}, base_keys=s.base_keys)
    with StopFlag():
        for step in range(2):
            lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, decay_steps=t.max_steps)
            set_lr(s.optimizer, lr)
            (batch,) = s.objective.batch_for(s.train_batches, t.seed, step, t.batch_size, 1, 0, 1)
            loss = s.objective.loss(s.model, batch)  # a PPO loop: rollouts, rewards and its own loss here
            loss.backward()
            norm = clip_gradients(s.model, s.optimizer, s.scaler, t.grad_clip)
            record = {"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": float(norm), "ms_per_step": 1.0}
            check_finite(record, scaler=s.scaler, metrics=log, checkpointer=saver, info=info)
            apply_gradients(s.optimizer, s.scaler)
            log.log(record)
            s.state.update(step=step + 1, tokens_seen=s.state["tokens_seen"] + s.tokens_per_step)
    saver.save(2, s.model, s.optimizer, s.state)
    summary = write_run_report(s, stop_reason="max_steps", wall_time_s=1.0)
    assert summary["metrics"]["steps"] == 2 and (s.out / "report.md").is_file()
    assert [r["loss"] for r in metrics(s.out)] == pytest.approx([r["loss"] for r in metrics(reference)[:2]],
                                                                   abs=1e-6)
    pretrain(cfg, s.out, resume=True)
    assert metrics(s.out)[-1]["loss"] == pytest.approx(metrics(reference)[-1]["loss"], abs=1e-6)


def test_without_a_tokens_dir_the_tokenizer_comes_from_the_init_checkpoint(tokens, tmp_path):
    """No data.tokens: a run needs a checkpoint to take its tokenizer from (post-training reads
    data.file); an objective that reads token shards still says data.tokens is missing."""
    from lmforge.train import distributed as dist
    from lmforge.train.setup import setup_training, tokenizer_dir_of

    run = tmp_path / "run"
    pretrain(tiny_config(tokens, "train.max_steps=2", "train.eval_every=2"), run)
    best = ckpt.resolve_checkpoint(run)
    cfg = tiny_config(tokens, "data.tokens=")
    assert tokenizer_dir_of(cfg, best) == (None, best)
    assert tokenizer_dir_of(tiny_config(tokens), best) == (tokens, tokens)
    info = dist.DistInfo()
    with pytest.raises(UserError, match=r"^data.tokens is not set; point it at a dir"):
        setup_training(cfg, tmp_path / "a", info)  # no checkpoint either: said first, nothing written
    assert not (tmp_path / "a").exists()
    with pytest.raises(UserError, match=r"data.tokens is not set.*or start from a checkpoint"):
        tokenizer_dir_of(cfg, None)
    with pytest.raises(UserError, match=r"^data.tokens is not set; point it at a dir"):
        setup_training(cfg, tmp_path / "b", info, init_from=run)  # clm reads token shards
    (best / "tokenizer.json").rename(best / "moved.json")
    try:
        with pytest.raises(UserError, match="has no tokenizer.json"):
            tokenizer_dir_of(cfg, best)
    finally:
        (best / "moved.json").rename(best / "tokenizer.json")
