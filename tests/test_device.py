"""Precision and device resolution; the MFU denominator."""

import pytest
import torch

from lmforge.errors import UserError
from lmforge.train import device as dev


def test_auto_precision_on_cpu_depends_on_width_and_bf16_support(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: True)
    assert dev.resolve_precision("auto", cpu, 64) == "fp32"  # overhead-bound: bf16 casts cost more
    assert dev.resolve_precision("auto", cpu, dev.CPU_BF16_MIN_WIDTH) == "bf16"
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: False)
    assert dev.resolve_precision("auto", cpu, 1024) == "fp32"
    assert dev.resolve_precision("bf16", cpu, 128) == "bf16"  # an explicit choice is kept


def test_fp16_and_cuda_requests_on_a_cpu_machine_are_user_errors():
    with pytest.raises(UserError, match="train.precision"):
        dev.resolve_precision("fp16", torch.device("cpu"), 384)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="train.device"):
            dev.resolve_device("cuda")


def test_peak_flops_is_cached_and_overridable(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(dev, "measure_matmul_flops", lambda *a, **k: calls.append(1) or 1e12)
    assert dev.peak_flops(torch.device("cpu"), "fp32") == 1e12
    assert dev.peak_flops(torch.device("cpu"), "fp32") == 1e12
    assert len(calls) == 3  # measured (best of three) once, then read from the cache
    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "5e11")
    assert dev.peak_flops(torch.device("cpu"), "fp32") == 5e11
