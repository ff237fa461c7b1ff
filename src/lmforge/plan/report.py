"""The plan of a training run (`lmforge plan`): `plan` puts together the parameters
(`lmforge.plan.params`), the training FLOPs, the training memory per device
(`lmforge.plan.memory`, with LoRA/QLoRA rows from `lmforge.plan.lora`), the compute-optimal
token budget (Chinchilla: ~20 tokens per parameter) and the wall time on a given GPU type,
count and MFU, as plain data (what `--json` prints); `format_plan` prints it as a table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lmforge.errors import UserError
from lmforge.models.config import ModelConfig
from lmforge.plan.lora import DEFAULT_LORA_TARGETS, LORA_TARGETS, LoRA, lora_params
from lmforge.plan.memory import PRECISIONS, objective_lengths, training_memory
from lmforge.plan.params import count_params, flops_per_token
from lmforge.train.device import GPU_PEAK_BF16

CHINCHILLA_TOKENS_PER_PARAM = 20.0
DEFAULT_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64, when nothing else says
# device memory (GiB) of the GPUs in `GPU_PEAK_BF16` (largest variant where there are several)
GPU_MEMORY_GIB = {"H200": 141, "H100": 80, "A100": 80, "L40S": 48, "L4": 24, "A10": 24, "4090": 24,
                  "3090": 24, "V100": 32, "T4": 16}


def _resolve_vocab(cfg: Any, vocab_size: int | None) -> tuple[int, str]:
    """The vocabulary size: --vocab-size, model.vocab_size, data.tokens' tokenizer, or assumed."""
    if vocab_size is not None:
        return vocab_size, "--vocab-size"
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size, "config"
    assumed = f"assumed {DEFAULT_VOCAB} (GPT-2's, padded): set model.vocab_size or pass --vocab-size"
    if cfg.data.tokens:
        from pathlib import Path

        tokens = Path(cfg.data.tokens)
        if not (tokens / "tokenizer.json").is_file():
            return DEFAULT_VOCAB, f"{assumed}, or tokenize into data.tokens={tokens} first"
        # exactly what training builds: the tokenizer + the objective's special tokens, padded
        from lmforge.train.setup import resolve_model_config, run_tokenizer

        tokenizer, _ = run_tokenizer(cfg, tokens)
        vocab = resolve_model_config(cfg, tokenizer).vocab_size
        return vocab, f"tokenizer of {tokens}: {tokenizer.vocab_size} tokens, padded to a multiple of 64"
    return DEFAULT_VOCAB, assumed


def _check_options(gpus: int, gpu_type: str, mfu: float, tokens: float | None, lora_rank: int | None,
                   lora_targets: Any) -> str:
    """Refuse bad `lmforge plan` options in one line each; returns the GPU type as spelt in the table."""
    if lora_targets is not None and lora_rank is None:
        raise UserError("--lora-targets needs --lora-rank (the adapters' rank), e.g. --lora-rank 16")
    gpu_type = next((g for g in GPU_PEAK_BF16 if g.lower() == gpu_type.lower()), gpu_type)
    if gpu_type not in GPU_PEAK_BF16:
        raise UserError(f"--gpu-type {gpu_type!r} is not known; allowed: {', '.join(GPU_PEAK_BF16)}")
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    if tokens is not None and tokens <= 0:
        raise UserError(f"--tokens must be > 0, got {tokens}")
    return gpu_type


def plan(cfg: Any, *, gpus: int = 1, gpu_type: str = "H100", mfu: float = 0.4, tokens: float | None = None,
         vocab_size: int | None = None, lora_rank: int | None = None,
         lora_targets: str | Sequence[str] | None = None) -> dict[str, Any]:
    """The sizing report of a config (`lmforge.config.Config`) as plain data (what `--json` prints).

    Memory rows: fp32 and bf16-mixed full training, with and without activation checkpointing;
    with `lora_rank`, LoRA and QLoRA rows too (adapters on `lora_targets`, default
    `DEFAULT_LORA_TARGETS`). `gpu_type` is matched without regard to case (h100 = H100).
    """
    gpu_type = _check_options(gpus, gpu_type, mfu, tokens, lora_rank, lora_targets)
    lora_targets = DEFAULT_LORA_TARGETS if lora_targets is None else lora_targets
    vocab, vocab_source = _resolve_vocab(cfg, vocab_size)
    c = ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": vocab})
    from lmforge.train.objectives import objective_class

    objective = objective_class(cfg.objective)
    objective.check(c)  # the model training would refuse, refused here too
    params = count_params(c)
    moe = c.moe.num_experts > 0
    micro_batch = cfg.train.batch_size
    seq_len, decoder_len = objective_lengths(cfg, c.block_size)
    fpt = flops_per_token(c, seq_len, decoder_len, objective)
    six_n = 6.0 * params["matmul_active"]
    views = objective.views
    if views > 1:  # per view: the encoder's matmuls (contrastive: no MLM head) + attention
        six_n = fpt / views - 12.0 * c.n_layer * c.n_embd * seq_len
    budget = float(tokens) if tokens else CHINCHILLA_TOKENS_PER_PARAM * params["active"]
    total_flops = fpt * budget
    peak_flops = GPU_PEAK_BF16[gpu_type]
    seconds = total_flops / (gpus * peak_flops * mfu)
    setups: list[tuple[str, str, LoRA | None]] = [(p, p, None) for p in PRECISIONS]
    lora_report = None
    if lora_rank is not None:
        lora = LoRA.parse(lora_rank, lora_targets)
        if not lora.targeted(c):
            raise UserError(f"--lora-targets {lora_targets!r}: none of these layers exists in this model "
                            f"(mlp={c.mlp}); pick from {', '.join(LORA_TARGETS)}")
        setups += [("lora", "bf16", lora), ("qlora", "bf16", LoRA(lora.rank, lora.targets, quantized=True))]
        counts = lora_params(c, lora)
        lora_report = {"rank": lora.rank, "targets": [t[0] for t in lora.targeted(c)],
                       "trainable": counts["total"], "trainable_fraction": counts["total"] / params["total"]}
    memory = {}
    for name, precision, setup in setups:
        for ckpt in (False, True):
            key = f"{name}{'+act_ckpt' if ckpt else ''}"
            memory[key] = training_memory(c, micro_batch, seq_len, precision, ckpt, gpus, lora=setup,
                                          decoder_len=decoder_len, objective=objective)
            memory[key]["fits"] = memory[key]["peak"] <= GPU_MEMORY_GIB[gpu_type] * 2**30
    tokens_per_step = micro_batch * seq_len * cfg.train.grad_accum * gpus
    per = "active parameters" if moe else "parameters"
    method = "per-tensor model of our blocks"
    if c.arch != "gpt" and lora_report:
        method += f" (LoRA/QLoRA rows: not validated for {c.arch})"
    return {
        "model": c.to_dict(), "vocab_source": vocab_source,
        "parameters": params, "lora": lora_report,
        "flops_per_token": fpt, "flops_per_token_6N": six_n, "flops_views": views,
        "memory": {"micro_batch": micro_batch, "seq_len": seq_len, "decoder_len": decoder_len, "gpus": gpus,
                   "fsdp": gpus > 1, "gpu_memory_gib": GPU_MEMORY_GIB[gpu_type], "per_device": memory,
                   "activations_method": method},
        "compute": {"tokens": budget, "tokens_source": "--tokens" if tokens else f"chinchilla (20 x {per})",
                    "training_flops": total_flops, "gpu_type": gpu_type, "gpus": gpus, "mfu": mfu,
                    "peak_flops_per_gpu": peak_flops, "wall_time_s": seconds,
                    "tokens_per_step": tokens_per_step, "steps": math.ceil(budget / tokens_per_step)},
    }


def _si(x: float, unit: str = "") -> str:
    for div, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {prefix}{unit}".rstrip()
    return f"{x:.0f} {unit}".rstrip()


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_plan(report: dict[str, Any]) -> str:
    """The report as a readable table."""
    m, p, mem, comp = report["model"], report["parameters"], report["memory"], report["compute"]
    moe = m["moe"]["num_experts"] > 0
    layers = (f"{m['n_layer']}+{m.get('n_decoder_layer') or m['n_layer']} (encoder+decoder)" if m["arch"] == "encdec"
              else str(m["n_layer"]))
    lines = [f"model   {m['arch']}: {layers} layers x {m['n_embd']} wide, {m['n_head']} heads "
             f"({m['n_kv_head'] or m['n_head']} kv), context {m['block_size']}, {m['pos_encoding']}/{m['norm']}/"
             f"{m['mlp']}" + (f", MoE {m['moe']['num_experts']} experts top-{m['moe']['top_k']}" if moe else ""),
             f"vocab   {m['vocab_size']} ({report['vocab_source']})",
             "",
             f"parameters: {p['method']}",
             f"  total             {p['total']:>15,}  ({_si(p['total'])})"]
    if moe:
        lines.append(f"  active per token  {p['active']:>15,}  ({_si(p['active'])}: router + top-k experts)")
    lines += [f"  embedding         {p['embedding']:>15,}",
              f"  non-embedding     {p['non_embedding']:>15,}",
              f"  12*L*d^2 approx   {p['approx_12Ld2']:>15,}"]
    if report["lora"]:
        lo = report["lora"]
        lines.append(f"  LoRA r={lo['rank']:<3}       {lo['trainable']:>15,}  ({lo['trainable_fraction']:.2%} of total;"
                     f" on {', '.join(lo['targets'])})")
    lines += ["",
              f"FLOPs/token (train) {_si(report['flops_per_token'])}  ("
              + (f"{report['flops_views']} views x (" if report["flops_views"] > 1 else "")
              + f"6N = {_si(report['flops_per_token_6N'])} + attention"
              + (")" if report["flops_views"] > 1 else "")
              + f"{'; N = active' if moe else ''}{'; N = the encoder' if report['flops_views'] > 1 else ''})",
              "",
              f"training memory per device: micro-batch {mem['micro_batch']} x {mem['seq_len']} tokens"
              + (f" (decoder {mem['decoder_len']})" if mem.get("decoder_len") else "") + ", AdamW"
              + (f", FSDP over {mem['gpus']} GPUs" if mem["fsdp"] else ""),
              f"  {'':<18}{'weights':>11}{'grads':>11}{'AdamW':>11}{'activations':>13}{'peak':>11}  fits "
              f"{mem['gpu_memory_gib']} GiB"]
    for key, row in mem["per_device"].items():
        acts = sum(v for k, v in row.items() if k.startswith("activations_"))
        lines.append(f"  {key:<18}{_gib(row['weights']):>11}{_gib(row['gradients']):>11}"
                     f"{_gib(row['optimizer']):>11}{_gib(acts):>13}{_gib(row['peak']):>11}  "
                     f"{'yes' if row['fits'] else 'NO'}")
    notes = ["fp32: fp32 everything; bf16: autocast over fp32 master weights"]
    if report["lora"]:
        notes.append("lora: frozen bf16 base; qlora: frozen NF4 base (4.127 bits/weight); fp32 adapters")
    if "not validated" in mem["activations_method"]:
        notes.append(f"activations: {mem['activations_method']}")
    lines += [f"  ({n})" for n in notes]
    lines += ["",
              f"compute  {_si(comp['tokens'])} tokens ({comp['tokens_source']}), {_si(comp['training_flops'], 'FLOP')}",
              f"         {comp['gpus']} x {comp['gpu_type']} at {comp['mfu']:.0%} MFU "
              f"({_si(comp['peak_flops_per_gpu'], 'FLOP/s')} bf16 peak each): {_duration(comp['wall_time_s'])}, "
              f"{comp['steps']:,} steps of {comp['tokens_per_step']:,} tokens"]
    return "\n".join(lines)
