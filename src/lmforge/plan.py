"""`lmforge plan`: the sizing arithmetic of a training run, before running it.

For a config: parameters (exact, and the 12·L·d² rule of thumb), training FLOPs per token,
training memory per device (weights, gradients, AdamW state, activations) for fp32 and
bf16-mixed, with and without activation checkpointing, FSDP-sharded over G GPUs, the
compute-optimal token budget (Chinchilla: ~20 tokens per parameter) and the wall time on a
given GPU type, count and MFU.

The activation model is derived from what autograd saves in OUR blocks (`models/blocks.py`,
`models/gpt.py`), tensor by tensor, not from a generic formula; `measure_training_peak` measures
the real peak on CPU to check it (tests/test_plan.py). Per layer and token, a pre-norm block
saves: its input x and the post-attention residual x1 (fp32: the residual stream stays fp32
under autocast); per norm the normalized output the next Linear reads (LayerNorm: + mean/rstd;
RMSNorm: + x·rstd and rstd, since `F.rms_norm` is composite); the fused qkv output (SDPA keeps
the whole buffer alive through its v view); RoPE's rotated q and k; SDPA's output and
logsumexp; the MLP's hidden tensors (gelu: pre- and post-activation; relu: one; swiglu: gate,
silu(gate), up and their product). Outside the blocks: the final norm, the fp32
log-softmax of the loss and the logits the caller holds until backward (the training loop
keeps them), and at the start of backward two more fp32 logit-sized gradients.

Built for the GPT family now; MoE (active vs total parameters) and LoRA/QLoRA (frozen base
weights: no gradients or optimizer state for them) plug in as more terms of `count_params`
and `training_memory`.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.errors import UserError
from lmforge.models.config import ModelConfig
from lmforge.train.device import _GPU_PEAK_BF16

CHINCHILLA_TOKENS_PER_PARAM = 20.0
DEFAULT_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64, when nothing else says
ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32, per parameter
# device memory (GiB) of the GPUs in `_GPU_PEAK_BF16` (largest variant where there are several)
GPU_MEMORY_GIB = {"H200": 141, "H100": 80, "A100": 80, "L40S": 48, "L4": 24, "A10": 24, "4090": 24,
                  "3090": 24, "V100": 32, "T4": 16}
PRECISIONS = ("fp32", "bf16")


# --------------------------------------------------------------------------------------------
# Parameters and FLOPs


def _norm_params(c: ModelConfig) -> int:
    return c.n_embd * (2 if c.norm == "layernorm" and c.bias else 1)


def block_params(c: ModelConfig) -> dict[str, int]:
    """Parameters of one Transformer block, by part."""
    d, kv, h, b = c.n_embd, c.kv_heads * c.head_dim, c.ffn_hidden, int(c.bias)
    attn = d * (d + 2 * kv) + b * (d + 2 * kv) + d * d + b * d
    n_in = 2 if c.mlp == "swiglu" else 1  # swiglu has gate and up projections
    mlp = n_in * (d * h + b * h) + h * d + b * d
    return {"attention": attn, "mlp": mlp, "norms": 2 * _norm_params(c)}


def count_params(c: ModelConfig) -> dict[str, int]:
    """Exact parameter counts (= `sum(p.numel())` of `GPT(c)`; a tied head counts once).

    `embedding` is the lookup tables (token, learned positions), as `GPT.num_params` excludes
    them; an untied LM head is a matmul and counts as non-embedding. `matmul` is what costs FLOPs:
    non-embedding plus the LM head even when tied. `approx_12Ld2` is the classic 12·L·d².
    """
    d, V = c.n_embd, c.vocab_size
    embedding = V * d + (c.block_size * d if c.pos_encoding == "learned" else 0)
    per_block = sum(block_params(c).values())
    lm_head = 0 if c.tie_embeddings else V * d
    non_embedding = c.n_layer * per_block + _norm_params(c) + lm_head
    return {"total": embedding + non_embedding, "embedding": embedding, "non_embedding": non_embedding,
            "per_block": per_block, "lm_head_untied": lm_head,
            "matmul": non_embedding + (V * d if c.tie_embeddings else 0),
            "approx_12Ld2": 12 * c.n_layer * d * d}


def flops_per_token(c: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6·N_matmul + 12·L·d·T (attention), as `GPT.flops_per_token`."""
    seq_len = c.block_size if seq_len is None else seq_len
    return 6.0 * count_params(c)["matmul"] + 12.0 * c.n_layer * c.n_embd * seq_len


# --------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class Precision:
    """Byte sizes of one training precision: fp32, or bf16 autocast over fp32 master weights."""

    name: str
    act: int  # matmul outputs (Linear, SDPA) under autocast
    cast_weights: int  # autocast's per-step bf16 copies of matmul weights (0: none)

    @classmethod
    def of(cls, name: str) -> Precision:
        if name not in PRECISIONS:
            raise UserError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
        return cls(name, 4, 0) if name == "fp32" else cls(name, 2, 2)


def _norm_act_bytes(c: ModelConfig, p: Precision) -> int:
    """Bytes per token a norm (and the Linear reading it) saves, besides the norm's input."""
    d = c.n_embd
    # the norm runs in fp32 under autocast; the next Linear saves its (bf16-cast) input
    out = d * p.act
    if c.norm == "layernorm":
        return out + 2 * 4  # + mean, rstd
    return out + d * 4 + 4  # rms_norm is composite: + x*rstd (fp32) and rstd


def attention_kernel(c: ModelConfig, precision: str, seq_len: int, device_type: str = "cuda") -> str:
    """Which attention `Attention.forward` takes in training: `fused` (SDPA) or `cpu` (hand-written)."""
    from lmforge.models.blocks import Attention

    if device_type == "cpu" and (c.dropout > 0 or (precision != "fp32" and seq_len <= Attention.CPU_ATTENTION_MAX_LEN)):
        return "cpu"
    return "fused"


def layer_activation_bytes(c: ModelConfig, seq_len: int, precision: str, attention: str = "fused") -> dict[str, int]:
    """Bytes per token that one block saves for backward, by part (see the module docstring).

    attention="fused": SDPA (flash/efficient kernels save q, k, v, the output and logsumexp),
    what CUDA always takes and CPU takes in fp32 without dropout. attention="cpu": the
    hand-written CPU path (`Attention._cpu_attention`, bf16 or dropout), which saves the scaled
    q, k and v (repeated to every head under GQA) and the (T, T) probabilities.
    """
    p = Precision.of(precision)
    d, kv, h, H = c.n_embd, c.kv_heads * c.head_dim, c.ffn_hidden, c.n_head
    residual = 2 * d * 4  # x and x1, fp32
    norms = 2 * _norm_act_bytes(c, p)
    rope = c.pos_encoding == "rope"
    if attention == "fused":
        attention_bytes = (d + 2 * kv) * p.act + d * p.act + H * 4  # qkv buffer, SDPA output, logsumexp
        if rope:
            attention_bytes += (d + kv) * p.act  # rotated q and k
    elif attention == "cpu":
        probs = H * seq_len  # per token: one row of the (T, T) probabilities per head
        if kv != d:  # GQA: k and v repeated to every head; qkv itself is not kept
            kept = 3 * d
        else:  # k (rotated, or a view of qkv) and v are views into live buffers
            kept = (d + 2 * kv) + (kv if rope else 0) + d
        attention_bytes = (kept + probs + d) * p.act  # + the reshaped output the out-projection reads
    else:
        raise ValueError(f"unknown attention kernel {attention!r}")
    mlp = {"swiglu": 4, "gelu": 2, "gelu_tanh": 2, "relu": 1}[c.mlp] * h * p.act
    # 1-byte keep-masks of the two residual dropouts (attention and MLP outputs); SDPA's own
    # dropout keeps only its RNG state (the CPU path's (T, T) keep-mask is not modelled)
    dropout = 2 * d if c.dropout > 0 else 0
    return {"residual": residual, "norms": norms, "attention": attention_bytes, "mlp": mlp, "dropout": dropout}


def activation_memory(c: ModelConfig, micro_batch: int, seq_len: int, precision: str,
                      checkpointing: bool = False, attention: str = "fused") -> dict[str, float]:
    """Activation bytes held at the start of backward for one micro-batch, by part."""
    p = Precision.of(precision)
    tokens = micro_batch * seq_len
    per_layer = sum(layer_activation_bytes(c, seq_len, precision, attention).values())
    rope_tables = 4 * seq_len * c.head_dim * 2 if (c.pos_encoding == "rope" and p.name == "bf16") else 0
    if checkpointing:
        # only each block's input is kept; backward recomputes one block at a time
        layers = c.n_layer * c.n_embd * 4 * tokens + per_layer * tokens + rope_tables
    else:
        layers = c.n_layer * (per_layer * tokens + rope_tables)
    V = c.vocab_size
    head = tokens * (c.n_embd * 4 + _norm_act_bytes(c, p) + V * 4 + 16)  # final norm, log-softmax, ids
    logits_held = tokens * V * p.act  # returned to the training loop, alive through backward
    backward_logit_grads = tokens * V * 4 * 2  # d log-softmax and d logits (fp32 loss)
    return {"layers": layers, "head": head, "logits_held": logits_held,
            "backward_transient": backward_logit_grads}


def training_memory(c: ModelConfig, micro_batch: int, seq_len: int | None = None, precision: str = "bf16",
                    checkpointing: bool = False, gpus: int = 1, attention: str = "fused") -> dict[str, float]:
    """Peak training memory per device in bytes, by part, for AdamW with fp32 master weights.

    With gpus > 1, FSDP shards weights, gradients and optimizer state G ways and all-gathers
    the parameters of the block in use (plus the one prefetched) and of the root module
    (embeddings, head). Gradients are freed after each step (`zero_grad(set_to_none=True)`), so
    the peak is the larger of the start of backward (all activations, the head's gradient) and
    the end of it (every gradient, the activations gone).
    """
    seq_len = seq_len or c.block_size
    p = Precision.of(precision)
    n = count_params(c)
    shard = max(gpus, 1)
    weights = n["total"] * 4 / shard
    optimizer = n["total"] * ADAMW_STATE_BYTES / shard
    grads = n["total"] * 4 / shard
    cast_weights = n["matmul"] * p.cast_weights  # autocast's bf16 copies, alive until backward uses them
    gathered = 0.0
    if gpus > 1:
        root = n["total"] - c.n_layer * n["per_block"]
        gathered = (2 * n["per_block"] + root) * 4 * (1 - 1 / shard)
    acts = activation_memory(c, micro_batch, seq_len, precision, checkpointing, attention)
    head_grad = c.vocab_size * c.n_embd * 4 / shard  # the first gradient backward writes
    start_of_backward = sum(acts.values()) + head_grad + cast_weights
    # A tied embedding's lookup gradient is a dense vocab x d tensor, added out of place into
    # the head's gradient at the very end of backward: two more vocab x d tensors for a moment.
    tied_sum = 2 * c.vocab_size * c.n_embd * 4 / shard if c.tie_embeddings else 0
    end_of_backward = grads + acts["logits_held"] + tied_sum
    peak = weights + optimizer + gathered + max(start_of_backward, end_of_backward)
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "fsdp_gathered": gathered,
            "autocast_weight_copies": cast_weights, **{f"activations_{k}": v for k, v in acts.items()},
            "peak": peak, "peak_phase": "start of backward" if start_of_backward >= end_of_backward
            else "end of backward"}


# --------------------------------------------------------------------------------------------
# Measuring (the check of the model above; CPU, glibc)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def can_measure() -> bool:
    """Whether `measure_training_peak` works here (it reads glibc's allocator statistics)."""
    import platform

    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2]:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2


def _malloc_live_bytes() -> int:
    info = _mallinfo2()()
    return info.uordblks + info.hblkhd  # bytes in use in the heap + in mmap-ed chunks


def measure_training_peak(c: ModelConfig, micro_batch: int, precision: str = "fp32", steps: int = 2,
                          threads: int = 1) -> dict[str, int]:
    """Measured peak bytes of one training step on CPU: the model's persistent state + peak growth.

    Method: after a warm-up step (so AdamW's state exists), the step's live malloc bytes (glibc
    `mallinfo2`: in-use heap + mmap-ed chunks, i.e. what the allocator handed out and not yet
    got back, no caching or RSS effects) are sampled after every ATen op (a
    `TorchDispatchMode`, which sees forward, backward and optimizer ops). The peak growth plus
    the bytes of parameters and optimizer state (exact, from the tensors) is the peak. It
    misses temporaries that live only inside one kernel. Linux/glibc only. One thread by
    default: tensors are allocated by the calling thread either way (the numbers are the same),
    and on a shared CPU a single thread is many times faster than contended OpenMP workers.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    if not can_measure():
        raise RuntimeError("measure_training_peak needs Linux with glibc (it reads mallinfo2)")

    from lmforge.models import GPT
    from lmforge.train.device import autocast

    class PeakSampler(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.peak = _malloc_live_bytes()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, _malloc_live_bytes())
            return out

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_dict(c.to_dict()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, y = torch.randint(0, c.vocab_size, (2, micro_batch, c.block_size))
    device = torch.device("cpu")

    def step() -> None:
        with autocast(device, precision):
            _, loss = model(x, y)  # the training loop's pattern: logits held until backward ends
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(steps - 1):  # warm-up: the first step allocates AdamW's state
            step()
        before = _malloc_live_bytes()
        with PeakSampler() as sampler:
            step()
    finally:
        torch.set_num_threads(saved_threads)
    growth = sampler.peak - before
    persistent = sum(p.numel() * p.element_size() for p in model.parameters())
    persistent += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t))
    return {"persistent": persistent, "step_growth": growth, "peak": persistent + growth}


# --------------------------------------------------------------------------------------------
# The plan


def _resolve_vocab(cfg: Any, vocab_size: int | None) -> tuple[int, str]:
    if vocab_size is not None:
        return vocab_size, "--vocab-size"
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size, "config"
    if cfg.data.tokens:
        from pathlib import Path

        from lmforge.tokenizer.shards import META_FILE, read_meta

        if (Path(cfg.data.tokens) / META_FILE).is_file():
            vocab = int(read_meta(cfg.data.tokens)["vocab_size"])
            return 64 * math.ceil(vocab / 64), f"tokenizer in {cfg.data.tokens}"
    return DEFAULT_VOCAB, "assumed (set model.vocab_size or pass --vocab-size)"


def plan(cfg: Any, *, gpus: int = 1, gpu_type: str = "H100", mfu: float = 0.4, tokens: float | None = None,
         vocab_size: int | None = None) -> dict[str, Any]:
    """The sizing report of a config (`lmforge.config.Config`) as plain data (what `--json` prints)."""
    if gpu_type not in _GPU_PEAK_BF16:
        raise UserError(f"--gpu-type {gpu_type!r} is not known; allowed: {', '.join(_GPU_PEAK_BF16)}")
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    if cfg.model.arch != "gpt":
        raise UserError(f"model.arch={cfg.model.arch!r}: lmforge plan supports gpt")
    vocab, vocab_source = _resolve_vocab(cfg, vocab_size)
    c = ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": vocab})
    params = count_params(c)
    micro_batch, seq_len = cfg.train.batch_size, c.block_size
    fpt = flops_per_token(c, seq_len)
    budget = float(tokens) if tokens else CHINCHILLA_TOKENS_PER_PARAM * params["total"]
    total_flops = fpt * budget
    peak_flops = _GPU_PEAK_BF16[gpu_type]
    seconds = total_flops / (gpus * peak_flops * mfu)
    memory = {}
    for precision in PRECISIONS:
        for ckpt in (False, True):
            key = f"{precision}{'+act_ckpt' if ckpt else ''}"
            memory[key] = training_memory(c, micro_batch, seq_len, precision, ckpt, gpus)
            memory[key]["fits"] = memory[key]["peak"] <= GPU_MEMORY_GIB[gpu_type] * 2**30
    tokens_per_step = micro_batch * seq_len * cfg.train.grad_accum * gpus
    return {
        "model": c.to_dict(), "vocab_source": vocab_source,
        "parameters": params,
        "flops_per_token": fpt, "flops_per_token_6N": 6.0 * params["matmul"],
        "memory": {"micro_batch": micro_batch, "seq_len": seq_len, "gpus": gpus,
                   "fsdp": gpus > 1, "gpu_memory_gib": GPU_MEMORY_GIB[gpu_type], "per_device": memory},
        "compute": {"tokens": budget, "tokens_source": "--tokens" if tokens else "chinchilla (20 x parameters)",
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
    lines = [f"model   {m['n_layer']} layers x {m['n_embd']} wide, {m['n_head']} heads "
             f"({m['n_kv_head'] or m['n_head']} kv), context {m['block_size']}, vocab {m['vocab_size']} "
             f"({report['vocab_source']}), {m['pos_encoding']}/{m['norm']}/{m['mlp']}",
             "",
             "parameters",
             f"  total             {p['total']:>15,}  ({_si(p['total'])})",
             f"  embedding         {p['embedding']:>15,}",
             f"  non-embedding     {p['non_embedding']:>15,}",
             f"  12*L*d^2 approx   {p['approx_12Ld2']:>15,}",
             "",
             f"FLOPs/token (train) {_si(report['flops_per_token'])}  (6N = {_si(report['flops_per_token_6N'])}"
             f" + attention)",
             "",
             f"training memory per device: micro-batch {mem['micro_batch']} x {mem['seq_len']} tokens, AdamW"
             + (f", FSDP over {mem['gpus']} GPUs" if mem["fsdp"] else ""),
             f"  {'':<16}{'weights':>11}{'grads':>11}{'AdamW':>11}{'activations':>13}{'peak':>11}  fits "
             f"{mem['gpu_memory_gib']} GiB"]
    for key, row in mem["per_device"].items():
        acts = sum(v for k, v in row.items() if k.startswith("activations_"))
        lines.append(f"  {key:<16}{_gib(row['weights']):>11}{_gib(row['gradients']):>11}"
                     f"{_gib(row['optimizer']):>11}{_gib(acts):>13}{_gib(row['peak']):>11}  "
                     f"{'yes' if row['fits'] else 'NO'}")
    lines += ["",
              f"compute  {_si(comp['tokens'])} tokens ({comp['tokens_source']}), {_si(comp['training_flops'], 'FLOP')}",
              f"         {comp['gpus']} x {comp['gpu_type']} at {comp['mfu']:.0%} MFU "
              f"({_si(comp['peak_flops_per_gpu'], 'FLOP/s')} bf16 peak each): {_duration(comp['wall_time_s'])}, "
              f"{comp['steps']:,} steps of {comp['tokens_per_step']:,} tokens"]
    return "\n".join(lines)
