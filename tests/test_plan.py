"""Tests for `lmforge plan`: exact parameter counts, FLOPs, and memory predictions vs measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.models import GPT, ModelConfig
from lmforge.plan import (
    attention_kernel,
    can_measure,
    count_params,
    flops_per_token,
    measure_training_peak,
    plan,
    training_memory,
)
from lmforge.train.device import _GPU_PEAK_BF16

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
needs_glibc = pytest.mark.skipif(not can_measure(), reason="peak measurement reads glibc's mallinfo2")
PRESETS = sorted(p for p in CONFIGS.glob("*.yaml") if load_config(p).model.arch == "gpt")


def preset_model(path: Path, *overrides: str, vocab: int = 320) -> tuple[ModelConfig, int]:
    """The preset's model config (vocab from the config, else `vocab`) and its micro-batch."""
    cfg = load_config(path, list(overrides))
    return ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": cfg.model.vocab_size or vocab}), cfg.train.batch_size


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_exact_counts_equal_the_built_model_for_every_preset(path, tie):
    config, _ = preset_model(path, f"model.tie_embeddings={str(tie).lower()}")
    with torch.device("meta"):
        model = GPT(config)
    counts = count_params(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == model.num_params()
    assert counts["non_embedding"] == model.num_params(exclude_embeddings=True)
    assert counts["embedding"] + counts["non_embedding"] == counts["total"]
    assert flops_per_token(config) == model.flops_per_token()
    assert flops_per_token(config, 17) == model.flops_per_token(17)


def test_12Ld2_approximation_is_close_for_gpt2_small():
    config, _ = preset_model(CONFIGS / "gpt2-124m.yaml")
    counts = count_params(config)
    assert counts["total"] == 124_475_904  # the well-known 124M (vocab padded to 50304)
    assert counts["approx_12Ld2"] == 12 * 12 * 768**2
    assert abs(counts["approx_12Ld2"] / counts["non_embedding"] - 1) < 0.01


# Measured on CPU against the prediction (see `measure_training_peak` for the method). CUDA
# always takes the fused attention (SDPA), and so does the CPU in fp32; in bf16 the CPU takes
# a hand-written attention that also saves the (T, T) probabilities. Both are checked in bf16:
# the fused one by forcing SDPA (what a GPU run does), the CPU one as it runs here.
@needs_glibc
@pytest.mark.parametrize("preset,precision,attention", [
    ("nano", "fp32", "fused"), ("demo", "fp32", "fused"), ("nano", "bf16", "fused"), ("nano", "bf16", "cpu")])
def test_predicted_peak_training_memory_within_15_percent_of_measured(preset, precision, attention, monkeypatch):
    from lmforge.models.blocks import Attention

    config, batch = preset_model(CONFIGS / f"{preset}.yaml")
    if attention == "fused":
        monkeypatch.setattr(Attention, "_use_cpu_attention", lambda self, *a: False)
    else:
        assert attention_kernel(config, precision, config.block_size, "cpu") == "cpu"
    predicted = training_memory(config, batch, precision=precision, attention=attention)["peak"]
    measured = measure_training_peak(config, batch, precision)["peak"]
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)


@needs_glibc
def test_activation_checkpointing_prediction_within_15_percent_of_measured(monkeypatch):
    """Our trainer has no activation checkpointing yet; applied from outside, as it will be
    (`torch.utils.checkpoint` around each block), the measured peak matches the AC formula."""
    from torch.utils.checkpoint import checkpoint

    from lmforge.models.blocks import TransformerBlock as Block

    forward = Block.forward
    monkeypatch.setattr(Block, "forward",
                        lambda self, x, **kw: checkpoint(forward, self, x, use_reentrant=False, **kw))
    config, batch = preset_model(CONFIGS / "nano.yaml")
    predicted = training_memory(config, batch, precision="fp32", checkpointing=True)["peak"]
    measured = measure_training_peak(config, batch, "fp32")["peak"]
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)
    assert predicted < training_memory(config, batch, precision="fp32")["peak"]


def test_memory_terms_scale_as_expected():
    config, batch = preset_model(CONFIGS / "gpt2-124m.yaml")
    n = count_params(config)["total"]
    fp32 = training_memory(config, batch, precision="fp32")
    assert (fp32["weights"], fp32["gradients"], fp32["optimizer"]) == (4 * n, 4 * n, 8 * n)
    bf16 = training_memory(config, batch, precision="bf16")
    assert bf16["activations_layers"] < fp32["activations_layers"]
    assert bf16["autocast_weight_copies"] == 2 * count_params(config)["matmul"]
    ckpt = training_memory(config, batch, precision="bf16", checkpointing=True)
    assert ckpt["activations_layers"] < bf16["activations_layers"] / 4
    fsdp = training_memory(config, batch, precision="bf16", gpus=8)
    assert fsdp["optimizer"] == bf16["optimizer"] / 8 and fsdp["fsdp_gathered"] > 0
    assert fsdp["activations_layers"] == bf16["activations_layers"]  # per device: its own micro-batch
    assert fsdp["peak"] < bf16["peak"]


def test_plan_report_compute_budget_and_time():
    cfg = load_config(CONFIGS / "gpt2-124m.yaml")
    report = plan(cfg, gpus=8, gpu_type="A100", mfu=0.5)
    n = report["parameters"]["total"]
    comp = report["compute"]
    assert comp["tokens"] == 20 * n
    assert comp["training_flops"] == pytest.approx(report["flops_per_token"] * 20 * n)
    assert comp["wall_time_s"] == pytest.approx(comp["training_flops"] / (8 * _GPU_PEAK_BF16["A100"] * 0.5))
    assert report["memory"]["fsdp"] and set(report["memory"]["per_device"]) == {
        "fp32", "fp32+act_ckpt", "bf16", "bf16+act_ckpt"}
    assert plan(cfg, tokens=1e9)["compute"]["tokens"] == 1e9


def test_cli_plan_table_json_and_errors(capsys):
    assert main(["plan", str(CONFIGS / "gpt2-124m.yaml")]) == 0
    table = capsys.readouterr().out
    for text in ("non-embedding", "12*L*d^2", "FLOPs/token", "bf16+act_ckpt", "H100", "chinchilla"):
        assert text in table
    assert main(["plan", str(CONFIGS / "nano.yaml"), "--json", "--vocab-size", "65", "--gpus", "2",
                 "--set", "model.n_layer=6"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["n_layer"] == 6 and report["model"]["vocab_size"] == 65
    assert report["memory"]["gpus"] == 2
    assert main(["plan", str(CONFIGS / "nano.yaml"), "--gpu-type", "TPU"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpu-type 'TPU' is not known") and err.count("\n") == 1
