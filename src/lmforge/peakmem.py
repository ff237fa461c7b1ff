"""Peak memory of one real training step on CPU, measured: the check of `lmforge plan`'s model.

`lmforge.plan` predicts training memory from what autograd saves, tensor by tensor; this module
measures what a training step (forward, backward, AdamW step) actually allocates, so tests can
hold the prediction to the measurement (tests/test_plan.py). CPU tensors come from glibc's
malloc, whose statistics (`mallinfo2`) count the bytes handed out and not yet returned: unlike
the resident set size, they see neither the allocator's caching nor pages that were freed but
not yet given back, and unlike `torch.profiler`'s memory events they need no trace to be
replayed. Linux/glibc only (`can_measure`).

The batch is the one training feeds the model: given the run's config, its objective
(`lmforge.train.objectives`) cuts the micro-batch from random token windows with its own
`make_batch` and computes the loss with its own `loss`, so the measured step has the
objective's real shapes (BERT's [CLS] A [SEP] B [SEP] rows with MLM labels, token types and
the NSP label; span corruption's encoder inputs and its shorter decoder targets). The
tokenizer it needs is a synthetic word-level one of the model's vocabulary size
(`objective_batch`).
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lmforge.models.config import ModelConfig


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


def objective_batch(cfg: Any, c: ModelConfig, micro_batch: int, seed: int = 0,
                    ) -> tuple[dict[str, Any], Callable[[Any, dict[str, Any]], Any]]:
    """One micro-batch as `cfg.objective` cuts it for model `c`, and the objective's loss function.

    The objective gets a synthetic word-level tokenizer of exactly `c.vocab_size` tokens
    (lmforge's special tokens, the objective's extra ones such as [MASK] or the span sentinels,
    ordinary tokens for the rest) and random windows of ordinary tokens in place of a token
    directory; everything else (masking, NSP pairs, span corruption, the loss call) is the
    objective's own code, run as the training loop runs it.
    """
    import numpy as np
    import tokenizers
    from tokenizers import models

    from lmforge.tokenizer.tok import SPECIAL_TOKENS, Tokenizer
    from lmforge.train.objectives import OBJECTIVES, objective_for, token_fallbacks, with_tokens

    extra = OBJECTIVES[cfg.objective].extra_tokens
    ordinary = c.vocab_size - len(SPECIAL_TOKENS) - len(extra)
    if ordinary < 8:
        raise ValueError(f"vocab_size={c.vocab_size} leaves no room for {cfg.objective}'s "
                         f"{len(extra)} extra tokens")
    names = [*SPECIAL_TOKENS, *(f"t{i}" for i in range(ordinary))]
    backend = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="t0"))
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    tokenizer = Tokenizer(backend, kind="wordlevel", source="peakmem's synthetic tokenizer")
    with_tokens(tokenizer, extra, token_fallbacks())
    objective = objective_for(cfg, tokenizer, c)
    first = len(SPECIAL_TOKENS)

    class RandomWindows:  # stands in for `TokenBatches`: windows of random ordinary tokens
        @staticmethod
        def windows(rng: np.random.Generator, n: int) -> np.ndarray:
            return rng.integers(first, first + ordinary, size=(n, objective.window_length(c.block_size)))

    rng = np.random.default_rng(seed)
    batch = objective.make_batch(RandomWindows.windows(rng, micro_batch), rng, RandomWindows())
    return batch, objective.loss


def measure_training_peak(c: ModelConfig, micro_batch: int, precision: str = "fp32", steps: int = 2,
                          threads: int = 1, adapt: Callable[[Any], tuple[Iterable[Any], int]] | None = None,
                          cfg: Any = None) -> dict[str, Any]:
    """Measured peak bytes of one training step on CPU: the model's persistent state + peak growth.

    Method: after a warm-up step (so AdamW's state exists), the step's live malloc bytes (glibc
    `mallinfo2`: in-use heap + mmap-ed chunks, i.e. what the allocator handed out and not yet
    got back, no caching or RSS effects) are sampled after every ATen op (a
    `TorchDispatchMode`, which sees forward, backward and optimizer ops). The peak growth plus
    the bytes of parameters and optimizer state (exact, from the tensors) is the peak. It
    misses temporaries that live only inside one kernel. Linux/glibc only. One thread by
    default: tensors are allocated by the calling thread either way (the numbers are the same),
    and on a shared CPU a single thread is many times faster than contended OpenMP workers.

    `adapt(model)` (e.g. LoRA applied from outside) may change the model in place and returns
    the parameters to train and the bytes of persistent state that are not parameters (e.g.
    quantization scales); by default every parameter is trained.

    `cfg` (a `lmforge.config.Config`): the micro-batch and the loss are its objective's
    (`objective_batch`); without it, next-token prediction on random ids (`model(x, y)`).
    `shapes` in the result are the batch's tensor shapes.
    """
    if not can_measure():
        raise RuntimeError("measure_training_peak needs Linux with glibc (it reads mallinfo2)")
    from lmforge.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(c.to_dict()))
    trainable, extra = adapt(model) if adapt else (model.parameters(), 0)
    # lr=0: the step does all its work (and allocations) but leaves the weights as they are, so an
    # MoE routes the measured step exactly as the warm-up step: the same expert batch shapes, and
    # no new entries in oneDNN's per-shape caches of bf16 matmul state (CPU-only memory that grows
    # with every new shape, which a GPU does not have and the plan does not model)
    optimizer = torch.optim.AdamW(list(trainable), lr=0.0, fused=True)
    batch, loss_of = objective_batch(cfg, c, micro_batch) if cfg is not None else random_clm_batch(c, micro_batch)
    step = _training_step(model, optimizer, batch, loss_of, precision)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(steps - 1):  # warm-up: the first step allocates AdamW's state
            step()
        before = _malloc_live_bytes()
        with _peak_sampler() as sampler:
            step()
    finally:
        torch.set_num_threads(saved_threads)
    growth = sampler.peak - before
    persistent = extra + sum(p.numel() * p.element_size() for p in model.parameters())
    persistent += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t))
    return {"persistent": persistent, "step_growth": growth, "peak": persistent + growth,
            "shapes": {k: tuple(v.shape) for k, v in batch.items()}}


def random_clm_batch(c: ModelConfig, micro_batch: int) -> tuple[dict[str, Any], Callable]:
    """Next-token prediction on random ids (`model(x, y)`) and its loss function."""
    x, y = torch.randint(0, c.vocab_size, (2, micro_batch, c.block_size))

    def loss_of(model: Any, batch: dict[str, Any]) -> Any:
        return model(batch["input_ids"], batch["targets"])[1]

    return {"input_ids": x, "targets": y}, loss_of


def _training_step(model: Any, optimizer: Any, batch: dict[str, Any], loss_of: Callable,
                   precision: str) -> Callable:
    from lmforge.train.device import autocast

    device = torch.device("cpu")

    def step() -> None:
        with autocast(device, precision):
            loss = loss_of(model, batch)  # as the training loop: only the loss outlives the forward
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _peak_sampler() -> Any:
    """A dispatch mode that samples the live malloc bytes after every ATen op (`.peak`)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class PeakSampler(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.peak = _malloc_live_bytes()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, _malloc_live_bytes())
            return out

    return PeakSampler()


# ---- a reference LoRA/QLoRA, applied from outside, for the planner's measured LoRA rows ----------

class ReferenceLoRALinear(nn.Module):
    """Reference LoRA (Hu et al. 2021): y = W x + B A x, W frozen, A and B trained (fp32)."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.t()) @ self.B.t()


def reference_lora(model: nn.Module, lora: Any) -> tuple[list[nn.Parameter], int]:
    """Freeze the model in bf16 and wrap the targeted block Linears; QLoRA: NF4 via bitsandbytes."""
    model.to(torch.bfloat16).requires_grad_(False)
    extra = 0  # quantization state that is not a parameter
    for name, module in list(model.named_modules()):
        for child, linear in list(module.named_children()):
            if not (isinstance(linear, nn.Linear) and name.startswith("blocks.")) or child == "router":
                continue  # (an MoE router stays bf16 and untrained)
            base = linear
            if lora.quantized:
                import bitsandbytes as bnb

                base = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                         compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
                base.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                                compress_statistics=True, blocksize=64)
                base.bias = linear.bias
                base = base.to("cpu")  # quantizes
                qs = base.weight.quant_state
                extra += sum(t.numel() * t.element_size()
                             for t in (qs.absmax, qs.code, qs.state2.absmax, qs.state2.code, qs.offset))
            if child in lora.targets:
                base = ReferenceLoRALinear(base, linear.in_features, linear.out_features, lora.rank)
            setattr(module, child, base)
    return [p for p in model.parameters() if p.requires_grad], extra
