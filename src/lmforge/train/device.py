"""Device, precision and peak-FLOP/s: what hardware we run on and how fast it can multiply.

`precision: auto` picks bf16 autocast on CUDA (when supported), and on CPUs with AMX or
AVX512-BF16 when the model is wide enough to gain; fp32 otherwise. The narrowest models are
bound by per-op overhead, not matrix math, so bf16's casts cost more than its faster matmuls
save. Measured here with `benchmarks/precision_crossover.py` (full training step, 2 cores):
bf16/fp32 speed-up 0.76x at width 32, 1.01x at 64, 1.28x at 96, 1.53x at 128 (nano), 2.8x at
384 (small).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path

import torch

from lmforge.errors import UserError

# model width from which bf16 autocast pays off on AMX CPUs (see module docstring)
CPU_BF16_MIN_WIDTH = 96

# dense bf16 tensor-core peaks (no sparsity), FLOP/s
GPU_PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
    "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("train.device: CUDA was asked for but no GPU is visible; use train.device=cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    return torch.device(name)


@functools.cache
def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def resolve_precision(precision: str, device: torch.device, n_embd: int) -> str:
    """`auto` -> a concrete precision; checks the request is possible on this device."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() and n_embd >= CPU_BF16_MIN_WIDTH else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _cache_path() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "peak_flops.json"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """Measured dense matmul FLOP/s for `dtype` on `device` (the denominator of MFU on CPUs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s for MFU: the datasheet number on known GPUs, else measured once and cached.

    `LMFORGE_PEAK_FLOPS` (FLOP/s) overrides both, e.g. for a GPU missing from the table.
    """
    if os.environ.get("LMFORGE_PEAK_FLOPS"):
        return float(os.environ["LMFORGE_PEAK_FLOPS"])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value if precision != "fp32" else value / 2  # tf32 is half of bf16
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    name = _cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    key = f"{device.type}|{name}|{torch.get_num_threads()}|{precision}"
    path = _cache_path()
    cache = {}
    with contextlib.suppress(Exception):
        cache = json.loads(path.read_text())
    if key not in cache:
        # best of three: one reading taken while another job holds a core would otherwise stay
        # in the cache and inflate every MFU computed from it
        cache[key] = max(measure_matmul_flops(device, dtype, seconds=0.3) for _ in range(3))
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, path)
    return float(cache[key])


@functools.cache
def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "cpu"
