"""LoRA and QLoRA fine-tuning setups for `lmforge plan`: which Linear layers get adapters, their
trainable parameters, and the bytes of the frozen base model (bf16, or NF4 for QLoRA).

Memory, LoRA (Hu et al. 2021): the base model is frozen in bf16 (2 bytes per parameter, no
gradients, no optimizer state); each targeted Linear W (in → out) gets A (r × in) and B
(out × r), trained in fp32: r·(in + out) parameters with 4 + 4 + 8 bytes (weight, gradient,
AdamW), plus autocast's bf16 copies. Frozen Linears save no input for a weight gradient, so
activations shrink to what the input gradient needs — plus, per targeted Linear, its input (A
reads it) and A's r-wide output (B reads it). The default targets are every Linear inside the
blocks: `qkv` (our q, k and v projections are one fused Linear, so they get one adapter over
its d → d + 2·kv output, as PEFT does with GPT-2's c_attn), `out`, and the MLP's `gate` (swiglu),
`up` and `down` (in an MoE block: every expert's). The QLoRA paper found adapters on all
linear layers necessary to match full fine-tuning, where LoRA's original q/v-only choice falls
short; pass `--lora-targets qkv,out` for attention only. Embeddings, norms and the LM head get
no adapters.

Memory, QLoRA (Dettmers et al. 2023): as LoRA, but the blocks' Linear weights are stored in
4-bit NF4 in blocks of 64 with one absmax scale per block; double quantization stores those
scales in 8 bits in blocks of 256 with one fp32 scale each, i.e. 4 + 8/64 + 32/(64·256) =
4.127 bits per weight (the paper's numbers), plus per tensor the NF4 and the 8-bit code
books and the scales' mean (`nf4_bytes`, checked against bitsandbytes). Embeddings, norms,
biases, an MoE router and the LM head stay bf16. Each Linear is dequantized to bf16 for its
matmul, one at a time: the largest such weight is a transient on top.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.errors import UserError
from lmforge.models.config import ModelConfig
from lmforge.plan.params import block_linears, built_model, count_params, n_blocks

# LoRA targets: the names of the Linear layers inside a block (attention, MLP or each expert)
LORA_TARGETS = ("qkv", "out", "gate", "up", "down")
LORA_GROUPS = {"attn": ("qkv", "out"), "mlp": ("gate", "up", "down"), "all": LORA_TARGETS}
DEFAULT_LORA_TARGETS = "qkv,out,gate,up,down"
NF4_BLOCK = 64  # weights per absmax scale (QLoRA)
DQ_BLOCK = 256  # absmax scales per fp32 scale under double quantization
# per quantized tensor: the 16-entry NF4 code book and the 256-entry 8-bit code book of the
# scales (fp32 each), and the scales' mean, subtracted before their 8-bit quantization
NF4_TENSOR_CONSTANTS = (16 + 256 + 1) * 4


@dataclass(frozen=True)
class LoRA:
    """A LoRA (or QLoRA: `quantized=True`) fine-tuning setup: rank and targeted Linear names."""

    rank: int
    targets: tuple[str, ...]
    quantized: bool = False

    @classmethod
    def parse(cls, rank: int, targets: str | Sequence[str] = DEFAULT_LORA_TARGETS,
              quantized: bool = False) -> LoRA:
        if not isinstance(rank, int) or rank <= 0:
            raise UserError(f"--lora-rank must be a positive integer, got {rank!r}")
        names = targets.split(",") if isinstance(targets, str) else list(targets)
        expanded: list[str] = []
        for name in (n.strip() for n in names):
            if name not in LORA_TARGETS and name not in LORA_GROUPS:
                raise UserError(f"--lora-targets: {name!r} is not one of "
                                f"{', '.join((*LORA_TARGETS, *LORA_GROUPS))}")
            expanded += LORA_GROUPS.get(name, (name,))
        return cls(rank, tuple(t for t in LORA_TARGETS if t in expanded), quantized)

    def targeted(self, c: ModelConfig) -> list[tuple[str, int, int, int, int]]:
        """The block's Linear layers that get adapters (`gate` exists only with swiglu/geglu)."""
        return [lin for lin in block_linears(c) if lin[0] in self.targets]


def lora_params(c: ModelConfig, lora: LoRA) -> dict[str, int]:
    """Trainable LoRA parameters: r·(in + out) per targeted Linear (and per expert)."""
    r = lora.rank
    per_layer = sum(r * (i + o) * n for _, i, o, n, _ in lora.targeted(c))
    active = sum(r * (i + o) * k for _, i, o, _, k in lora.targeted(c))
    if c.arch == "gpt":
        return {"total": c.n_layer * per_layer, "active": c.n_layer * active, "per_layer": per_layer}
    # other architectures: the targeted Linears found in the built model's blocks (by name)
    from torch import nn

    shapes = {id(m): (m.in_features, m.out_features) for layers in built_model(c).modules()
              if isinstance(layers, nn.ModuleList) for block in layers for name, m in block.named_modules()
              if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in lora.targets}
    total = sum(r * (i + o) for i, o in shapes.values())
    L = n_blocks(c)
    return {"total": total, "active": total - L * (per_layer - active), "per_layer": total / L}


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one weight tensor in QLoRA's 4-bit NF4 (see the module docstring)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)  # two 4-bit codes per byte
    if not double_quant:
        return packed + 4 * blocks + 16 * 4  # fp32 absmax per block, NF4 code book
    return packed + blocks + 4 * math.ceil(blocks / DQ_BLOCK) + NF4_TENSOR_CONSTANTS


def _quantized_weights(c: ModelConfig) -> list[int]:
    """Sizes of the weights QLoRA quantizes: every Linear inside the blocks but an MoE router
    (tiny, and `MoE.router_logits` reads its weight in fp32); the GPT family by formula, other
    architectures from the model built on the meta device."""
    if c.arch == "gpt":
        per_block = [i * o for name, i, o, copies, _ in block_linears(c) if name != "router" for _ in range(copies)]
        return per_block * c.n_layer
    from torch import nn

    model = built_model(c)
    in_blocks = {id(m.weight): m.weight.numel() for layers in model.modules() if isinstance(layers, nn.ModuleList)
                 for block in layers for name, m in block.named_modules()
                 if isinstance(m, nn.Linear) and not name.endswith("router")}
    return list(in_blocks.values())


def frozen_base_bytes(c: ModelConfig, lora: LoRA) -> dict[str, float]:
    """Bytes of the frozen base model: bf16 (LoRA), or NF4 block Linears + bf16 rest (QLoRA).

    `per_block` (one block's bytes, what FSDP gathers) is exact for the GPT family and the
    average block for other architectures.
    """
    n, L = count_params(c), n_blocks(c)
    if not lora.quantized:
        return {"total": n["total"] * 2, "per_block": n["per_block"] * 2,
                "root": max(0, n["total"] - L * n["per_block"]) * 2, "dequantized_transient": 0}
    weights = _quantized_weights(c)
    total = sum(nf4_bytes(w) for w in weights) + (n["total"] - sum(weights)) * 2  # + bf16 rest
    root = max(0, n["total"] - L * n["per_block"]) * 2  # embeddings, final norm, LM head
    return {"total": total, "per_block": (total - root) / L, "root": root,
            "dequantized_transient": max(weights) * 2}
