"""The fit check (step 4 of `lmforge.train.setup`'s pipeline): before anything is allocated,
`lmforge plan`'s memory model predicts the training step's peak; a run that cannot fit in the
memory available (CPU: MemAvailable; CUDA: free GPU memory) is refused with both numbers
(`--force` starts it anyway), and a step predicted to take over a minute is warned about.
A LoRA/QLoRA run (`adapter.method`) is predicted as `lmforge plan` sizes LoRA (`planned_lora`).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from lmforge.config import Config
from lmforge.errors import UserError
from lmforge.models.config import ModelConfig
from lmforge.train import distributed as dist

# the model FLOPs utilization assumed for the "one step takes over a minute" warning
ASSUMED_MFU = 0.5
SLOW_STEP_S = 60.0


def available_memory(device: torch.device) -> tuple[float | None, str]:
    """Bytes free for this run on `device` and where the number comes from (None: unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"free on {torch.cuda.get_device_name(device)} (torch.cuda.mem_get_info)"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return None, "unknown"


def _gib(x: float) -> str:
    return f"{x / 2**30:.1f} GiB"


def planned_lora(cfg: Config, model_cfg: ModelConfig) -> Any:
    """The `lmforge.plan.LoRA` setup that models `cfg.adapter` (lora, qlora: the Linears its
    patterns select, by their names in a block), or None: full training, which `lmforge plan`
    also gives for freeze, prefix and prompt (an upper bound: they train less).

    A target pattern that selects nothing is refused here, before anything is allocated."""
    adapter = cfg.adapter
    if adapter.method not in ("lora", "qlora"):
        return None
    from lmforge.adapters.lora import lora_target_names
    from lmforge.models import build_model
    from lmforge.plan import LORA_TARGETS, LoRA

    with torch.device("meta"):  # names only: nothing is allocated
        model = build_model(model_cfg)
    names = {name.rsplit(".", 1)[-1] for name in lora_target_names(model, adapter.lora_targets)}
    names = {"qkv" if n in ("q", "kv") else n for n in names}  # a separate q/kv: the plan's fused qkv
    targets = tuple(t for t in LORA_TARGETS if t in names)
    return LoRA(adapter.lora_rank, targets, quantized=adapter.method == "qlora") if targets else None


def describe_setup(cfg: Config, precision: str, lora: Any) -> str:
    """What the prediction models, in words (printed beside it)."""
    method = cfg.adapter.method
    if lora is not None:
        return (f"{'QLoRA' if lora.quantized else 'LoRA'} rank {lora.rank} on {','.join(lora.targets)}, "
                f"base frozen in {'NF4' if lora.quantized else 'bf16'}")
    bound = f" (as full fine-tuning: an upper bound for {method})" if method in ("freeze", "prefix", "prompt") else ""
    return f"full training, {'fp32' if precision == 'fp32' else 'bf16 mixed'}{bound}"


def predict_step(cfg: Config, model_cfg: ModelConfig, device: torch.device, precision: str,
                 info: dist.DistInfo) -> tuple[float, float]:
    """(peak bytes per process, FLOPs per process and step) from `lmforge plan`'s model
    (for a LoRA/QLoRA run, `planned_lora`'s setup)."""
    from lmforge.plan import attention_kernel, flops_per_token, objective_lengths, training_memory

    t = cfg.train
    seq_len, decoder_len = objective_lengths(cfg, model_cfg.block_size)
    planned = "fp32" if precision == "fp32" else "bf16"  # fp16 has bf16's sizes
    gpus = info.world_size if info.parallel == "fsdp" else 1  # DDP replicates everything
    memory = training_memory(model_cfg, t.batch_size, seq_len, planned, False, gpus,
                             attention_kernel(model_cfg, planned, seq_len, device.type),
                             lora=planned_lora(cfg, model_cfg), decoder_len=decoder_len, objective=cfg.objective)
    flops = flops_per_token(model_cfg, seq_len, decoder_len, cfg.objective) * t.batch_size * t.grad_accum * seq_len
    return float(memory["peak"]), float(flops)


def check_fits(cfg: Config, model_cfg: ModelConfig, device: torch.device, precision: str, info: dist.DistInfo,
               device_peak_flops: float, *, force: bool = False) -> None:
    """Refuse (UserError, exit 2) a run whose predicted peak memory exceeds what is available,
    unless `force`; warn when one step is predicted to take over a minute."""
    try:
        need, step_flops = predict_step(cfg, model_cfg, device, precision, info)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the prediction is advice: a model it cannot size still trains
        warnings.warn(f"could not predict this run's memory ({type(e).__name__}: {e}); starting unchecked",
                      stacklevel=2)
        return
    # every rank takes the same decision (one refusing while another waits in a collective would
    # hang the run): the least memory any of them has
    available, where = min(dist.gather_object(available_memory(device), info),
                           key=lambda a: math.inf if a[0] is None else a[0])
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" and info.enabled else 1
    total = need * processes
    if available is not None and total > available and not force:
        per = f" ({processes} processes x {_gib(need)})" if processes > 1 else ""
        raise UserError(
            f"this run needs about {_gib(total)}{per} of memory at its peak (lmforge plan's model: batch "
            f"{cfg.train.batch_size} x {model_cfg.block_size} positions, {precision}) but only {_gib(available)} "
            f"is available on {device.type} ({where}); lower train.batch_size or model.block_size, "
            "or pass --force to start anyway")
    seconds = step_flops / (device_peak_flops * ASSUMED_MFU) if device_peak_flops else 0.0
    if seconds > SLOW_STEP_S:
        warnings.warn(f"one training step is predicted to take about {seconds / 60:.0f} min ({step_flops:.2e} "
                      f"FLOPs at {ASSUMED_MFU:.0%} of {device_peak_flops:.2e} FLOP/s); check train.batch_size "
                      "and model.block_size", stacklevel=2)
