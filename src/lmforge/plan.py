"""`lmforge plan`: the sizing arithmetic of a training run, before running it.

For a config: parameters (exact, and the 12·L·d² rule of thumb; active vs total for MoE),
training FLOPs per token, training memory per device (weights, gradients, AdamW state,
activations) for fp32 and bf16-mixed, with and without activation checkpointing, FSDP-sharded
over G GPUs, LoRA and QLoRA fine-tuning, the compute-optimal token budget (Chinchilla: ~20
tokens per parameter) and the wall time on a given GPU type, count and MFU.

Parameters. The GPT family has a closed formula (`count_params`), checked against
`sum(p.numel())` of the built model for every preset. An MoE block replaces the dense MLP by a
router `Linear(d, E, bias=False)` and E expert MLPs of the dense MLP's shape; a token passes
through the router and its top-k experts, so the *active* parameters (and the FLOPs per token)
count k experts, the total (and the memory) all E. Architectures without a formula are counted
exactly by building the model on the meta device (`count_params_built`: no memory, no init).

Memory, full training (AdamW, fp32 master weights): 4 bytes of weights, 4 of gradients and 8 of
AdamW state (exp_avg, exp_avg_sq) per parameter, sharded G ways under FSDP; bf16 autocast adds
a bf16 copy of each matmul weight per step. Activations are derived from what autograd saves in
OUR blocks (`models/blocks.py`, `models/moe.py`), tensor by tensor, not from a generic formula,
and checked block by block against the tensors autograd saves (saved-tensor hooks) and as a
whole against the peak of a real training step measured on CPU
(`lmforge.peakmem.measure_training_peak`; tests/test_plan.py). Per layer and token, a pre-norm
block saves: each norm's input (the residual stream, fp32 under autocast, since the master
weights are fp32) and output (what the next Linear reads; under autocast each Linear saves its
own bf16 copy, so a gated MLP's gate and up keep two; LayerNorm: + mean/rstd; RMSNorm:
+ x·rstd and rstd, since `F.rms_norm` is composite); the fused qkv output (SDPA keeps the whole
buffer alive through its v view); RoPE's rotated q and k; SDPA's output and logsumexp (on the
CPU attention path instead: the scaled q, copies of k and v, and the (T, T) probabilities, with
dropout also their uint8 keep-mask and the dropped probabilities); the MLP's hidden tensors
(gelu: pre- and post-activation; relu: one; swiglu/geglu: gate, act(gate), up and their
product); with dropout, a 1-byte keep-mask per residual dropout. An MoE block
saves, instead of the MLP's: the router's fp32 input, logits and probabilities, and per routed
copy of a token (top_k) the gathered input, the expert's hidden tensors and its output. A
post-norm block (BERT, the original Transformer) saves the same amounts in other places: its
input (read by qkv) and each norm's input, stats and output. Outside the blocks: the final norm
and the fp32 log-softmax of the loss (the training loop keeps only the loss, so the logits are
gone), and, for a moment at the start of backward, two fp32 logit-sized gradients. The peak is
found by walking backward (`training_memory`): at the head, or at the top or bottom block of a
stack, where gradients pile up while activations are freed (MoE blocks, whose weights outweigh
their activations, peak there), or at the end. Activation checkpointing keeps only each block's
input and recomputes one block at a time.

BERT and encoder-decoders are modelled the same way, from their own structure (`stacks`,
`block_activation_bytes`, `_ends`) and the shapes their objective feeds them
(`objective_lengths`). BERT (mlm): bidirectional post-norm blocks over block_size positions (no
padding mask: mlm rows are full); the embedding LayerNorm and dropout; the MLM transform (dense,
activation, LayerNorm) and the tied output projection at every position, as `BERT.forward`
computes them, so the fp32 log-softmax is (tokens x vocab) like GPT's; the pooler and NSP head
per example, whose backward also writes a full (B, T, d) gradient of the hidden states. An
encoder-decoder (span): an encoder stack over the corrupted input and a decoder stack over
span corruption's targets, about a quarter as long (`SpanCorruption`'s own arithmetic: 128 ->
128 encoder and 29 decoder positions), whose blocks also save a cross-attention: its norm, q
over the decoder positions, k and v over the encoder's, (T, S) probabilities on the CPU paths;
its kv projection's input is the encoder output, one saved tensor for all decoder layers in
fp32 but a bf16 cast per layer under autocast; the decoder's head (T positions) and, while the
decoder runs backward, the encoder output's fp32 gradient. T5's relative position bias makes
every self-attention take SDPA's math path on CPU (a bias that needs a gradient), which
computes in fp32 even under bf16 autocast and saves copies of q, k, v and the probabilities;
CUDA's fused kernels (`attention="fused"`) save q, k, v, the output and logsumexp as for GPT.

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

Assumptions: the plan describes a CUDA run (SDPA attention, autocast's CUDA op lists); the CPU
checks force SDPA where a CPU run would not take it. LoRA's frozen model is checked with
LayerNorm/RMSNorm computed in bf16 as the CPU does; CUDA autocast runs LayerNorm in fp32,
which keeps one more fp32 copy of each norm's input (not modelled). Validated on CPU (fp32 and
bf16, tests/test_plan.py, benchmarks/plan_memory.py): GPT, llama, MoE presets, LoRA/QLoRA on
GPT presets, bert-mini (mlm + nsp), t5-small and transformer-base (span). Not validated: LoRA
and QLoRA on BERT/encoder-decoders (their rows say so), padded batches (seq2seq, BERT with an
attention mask: modelled as full block_size rows), the contrastive objective (two views per
row, no MLM head: not modelled), and, for lack of a GPU here, every CUDA-only term (FSDP;
SDPA's efficient kernel with T5's bias, which also keeps the (1, heads, T, S) bias per layer:
not modelled).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
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

# LoRA targets: the names of the Linear layers inside a block (attention, MLP or each expert)
LORA_TARGETS = ("qkv", "out", "gate", "up", "down")
LORA_GROUPS = {"attn": ("qkv", "out"), "mlp": ("gate", "up", "down"), "all": LORA_TARGETS}
DEFAULT_LORA_TARGETS = "qkv,out,gate,up,down"
# MoE dispatch pads each expert's rows to one of 8 sizes per power of two (`models.moe.bucket_rows`):
# n in [2^b, 2^(b+1)) rounds up to a multiple of 2^(b-3), on average 2^(b-4) rows more, ~1/24 of n
MOE_PADDING = 1 + 1 / 24
NF4_BLOCK = 64  # weights per absmax scale (QLoRA)
DQ_BLOCK = 256  # absmax scales per fp32 scale under double quantization
# per quantized tensor: the 16-entry NF4 code book and the 256-entry 8-bit code book of the
# scales (fp32 each), and the scales' mean, subtracted before their 8-bit quantization
NF4_TENSOR_CONSTANTS = (16 + 256 + 1) * 4


# --------------------------------------------------------------------------------------------
# Parameters and FLOPs


def _norm_params(c: ModelConfig) -> int:
    return c.n_embd * (2 if c.norm == "layernorm" and c.bias else 1)


def _gated(c: ModelConfig) -> bool:
    """Whether the MLP has a gate projection besides up (swiglu, geglu)."""
    return c.mlp in ("swiglu", "geglu")


def n_blocks(c: ModelConfig) -> int:
    """Transformer blocks in the model: an encoder-decoder has both stacks."""
    return c.n_layer + (c.decoder_layers if c.arch == "encdec" else 0)


def block_linears(c: ModelConfig) -> list[tuple[str, int, int, int, int]]:
    """The Linear layers of one block: (name, in, out, copies, active copies).

    copies > 1 for an MoE block's expert projections (one per expert; top_k of them active).
    """
    d, q, kv, h = c.n_embd, c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.ffn_hidden
    E, k = c.moe.num_experts, min(c.moe.top_k, c.moe.num_experts)
    experts, active = (E, k) if E else (1, 1)
    linears = [("qkv", d, q + 2 * kv, 1, 1), ("out", q, d, 1, 1)]
    if E:
        linears.append(("router", d, E, 1, 1))
    if _gated(c):
        linears.append(("gate", d, h, experts, active))
    linears += [("up", d, h, experts, active), ("down", h, d, experts, active)]
    return linears


def mlp_params(c: ModelConfig) -> int:
    """Parameters of one dense MLP (an MoE expert has the same shape)."""
    d, h, b = c.n_embd, c.ffn_hidden, int(c.bias)
    n_in = 2 if _gated(c) else 1  # swiglu/geglu have gate and up projections
    return n_in * (d * h + b * h) + h * d + b * d


def block_params(c: ModelConfig) -> dict[str, int]:
    """Parameters of one Transformer block, by part; `mlp_active` is what one token uses."""
    d, q, kv, b = c.n_embd, c.n_head * c.head_dim, c.kv_heads * c.head_dim, int(c.bias)
    attn = d * (q + 2 * kv) + b * (q + 2 * kv) + q * d + b * d
    E, k = c.moe.num_experts, min(c.moe.top_k, c.moe.num_experts)
    mlp = mlp_params(c)
    if E:  # router (no bias) + E experts
        return {"attention": attn, "mlp": d * E + E * mlp, "norms": 2 * _norm_params(c),
                "mlp_active": d * E + k * mlp}
    return {"attention": attn, "mlp": mlp, "norms": 2 * _norm_params(c), "mlp_active": mlp}


def count_params(c: ModelConfig) -> dict[str, Any]:
    """Exact parameter counts (= `sum(p.numel())` of `GPT(c)`; a tied head counts once).

    `embedding` is the lookup tables (token, learned positions), as `GPT.num_params` excludes
    them; an untied LM head is a matmul and counts as non-embedding. `matmul` is what costs FLOPs:
    non-embedding plus the LM head even when tied. `active` and `matmul_active` count an MoE
    block's router and top_k experts only (= total and matmul for dense models). `approx_12Ld2`
    is the classic 12·L·d². Architectures other than GPT are counted by `count_params_built`.
    """
    if c.arch != "gpt":
        return count_params_built(c)
    d, V = c.n_embd, c.vocab_size
    embedding = V * d + (c.block_size * d if c.pos_encoding == "learned" else 0)
    parts = block_params(c)
    per_block = parts["attention"] + parts["mlp"] + parts["norms"]
    inactive = c.n_layer * (parts["mlp"] - parts["mlp_active"])
    lm_head = 0 if c.tie_embeddings else V * d
    non_embedding = c.n_layer * per_block + _norm_params(c) + lm_head
    matmul = non_embedding + (V * d if c.tie_embeddings else 0)
    return {"total": embedding + non_embedding, "active": embedding + non_embedding - inactive,
            "embedding": embedding, "non_embedding": non_embedding, "per_block": per_block,
            "lm_head_untied": lm_head, "matmul": matmul, "matmul_active": matmul - inactive,
            "approx_12Ld2": 12 * c.n_layer * d * d, "method": "exact (formula)"}


@functools.lru_cache(maxsize=8)
def _meta_model(config_json: str) -> Any:
    import torch

    from lmforge.models import build_model

    with torch.device("meta"):  # shapes only: no memory, no initialization
        return build_model(ModelConfig.from_dict(json.loads(config_json)))


def _built(c: ModelConfig) -> Any:
    return _meta_model(json.dumps(c.to_dict(), sort_keys=True))


def count_params_built(c: ModelConfig) -> dict[str, Any]:
    """`count_params` by building the model (`lmforge.models.build_model`) on the meta device.

    Exact for any architecture: parameters are counted from the module (shared ones once);
    non-embedding is the model's own `num_params(exclude_embeddings=True)` where it has one, else
    everything but the `nn.Embedding` tables; a tied head counts as a matmul (as in
    `count_params`); `per_block` is the largest module of the model's layer lists.
    """
    from torch import nn

    model = _built(c)
    params = list(model.parameters())  # shared tensors once
    total = sum(p.numel() for p in params)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    non_embedding = (model.num_params(exclude_embeddings=True) if hasattr(model, "num_params")
                     else total - sum(p.numel() for p in params if id(p) in embeddings))
    tied = sum(p.numel() for p in params if id(p) in embeddings and id(p) in linears)
    per_block = max((sum(p.numel() for p in block.parameters()) for m in model.modules()
                     if isinstance(m, nn.ModuleList) for block in m), default=0)
    parts = block_params(c)
    inactive = n_blocks(c) * (parts["mlp"] - parts["mlp_active"])
    return {"total": total, "active": total - inactive, "embedding": total - non_embedding,
            "non_embedding": non_embedding, "per_block": per_block,
            "lm_head_untied": 0, "matmul": non_embedding + tied,
            "matmul_active": non_embedding + tied - inactive,
            "approx_12Ld2": 12 * n_blocks(c) * c.n_embd ** 2, "method": "exact (counted)"}


def flops_per_token(c: ModelConfig, seq_len: int | None = None, decoder_len: int | None = None) -> float:
    """Training FLOPs per token: 6·N_active_matmul + 12·L·d·T (attention), as `GPT.flops_per_token`.

    An MoE token runs through the router and top_k experts only, so N counts those. Other
    architectures: their model's own `flops_per_token` (which knows e.g. an encoder-decoder's
    cross-attention and its decoder length, `decoder_len`: default seq_len), or the same formula
    over all their blocks.
    """
    seq_len = c.block_size if seq_len is None else seq_len
    if c.arch != "gpt" and hasattr(_built(c), "flops_per_token"):
        if c.arch == "encdec":
            return float(_built(c).flops_per_token(seq_len, decoder_len))
        return float(_built(c).flops_per_token(seq_len))
    return 6.0 * count_params(c)["matmul_active"] + 12.0 * n_blocks(c) * c.n_embd * seq_len


# --------------------------------------------------------------------------------------------
# LoRA / QLoRA


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

    shapes = {id(m): (m.in_features, m.out_features) for layers in _built(c).modules()
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

    model = _built(c)
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


# --------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class Precision:
    """Byte sizes of one training setup.

    fp32; bf16: autocast over fp32 master weights (the residual stream and norm inputs stay
    fp32); bf16-frozen: a bf16 base model under bf16 autocast (LoRA/QLoRA), everything bf16.
    """

    name: str
    act: int  # matmul outputs (Linear, SDPA) under autocast
    stream: int  # the residual stream between blocks (what the embeddings and norms see)
    cast_weights: int  # autocast's per-step bf16 copies of matmul weights (0: none)

    @classmethod
    def of(cls, name: str) -> Precision:
        table = {"fp32": (4, 4, 0), "bf16": (2, 4, 2), "bf16-frozen": (2, 2, 0)}
        if name not in table:
            raise UserError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
        return cls(name, *table[name])


def _norm_act_bytes(c: ModelConfig, p: Precision, output_saved: bool = True, input_bytes: int | None = None) -> int:
    """Bytes per token one norm saves, its input included, and its output if a Linear keeps it.

    The input is in the residual stream's dtype unless `input_bytes` says otherwise (BERT's MLM
    head norms a bf16 matmul output under autocast).
    """
    d = c.n_embd
    stream = p.stream if input_bytes is None else input_bytes
    out = d * p.act if output_saved else 0  # the next Linear saves its (autocast-cast) input
    if c.norm == "layernorm":
        return d * stream + 2 * 4 + out  # input, fp32 mean and rstd
    if stream == 4:
        return d * 4 + d * 4 + 4 + out  # rms_norm is composite: input, x*rstd (for the weight grad), rstd
    return d * 4 + 4 + out  # a bf16 input is upcast: the fp32 copy and rstd (frozen weight: no x*rstd)


@dataclass(frozen=True)
class Stack:
    """A stack of identical blocks as one training step runs them (`stacks`)."""

    name: str  # "" (GPT's only stack), "encoder" (BERT, encoder-decoder) or "decoder"
    layers: int
    length: int  # positions per example: the self-attention's queries and keys
    causal: bool
    context: int = 0  # the cross-attention's keys per example (the encoder output); 0: none
    bias: bool = False  # a position bias added to the self-attention scores (T5's relative bias)


def stacks(c: ModelConfig, seq_len: int, decoder_len: int | None = None) -> list[Stack]:
    """The model's block stacks in forward order: GPT's causal stack, BERT's bidirectional one, an
    encoder-decoder's encoder (seq_len source positions) and decoder (decoder_len target positions,
    default seq_len), whose blocks cross-attend to the encoder output."""
    bias = c.pos_encoding == "relative"
    if c.arch == "encdec":
        target = seq_len if decoder_len is None else decoder_len
        return [Stack("encoder", c.n_layer, seq_len, causal=False, bias=bias),
                Stack("decoder", c.decoder_layers, target, causal=True, context=seq_len, bias=bias)]
    if c.arch == "bert":
        return [Stack("encoder", c.n_layer, seq_len, causal=False, bias=bias)]
    return [Stack("", c.n_layer, seq_len, causal=True, bias=bias)]


def objective_lengths(cfg: Any, block_size: int) -> tuple[int, int | None]:
    """Positions per example that `cfg.objective` feeds the model: (encoder or only stack, decoder).

    clm, mlm and contrastive rows are block_size long. Span corruption's encoder reads the
    corrupted window (at most block_size) and its decoder writes the sentinels, the spans and
    [EOS], about a quarter of that: the objective's own arithmetic (`SpanCorruption`) decides.
    seq2seq pads each batch to its longest pair, at most block_size on either side.
    """
    if cfg.objective == "span":
        from lmforge.train.objectives import span_lengths

        return span_lengths(cfg.span, block_size)[1:]
    return block_size, (block_size if cfg.objective == "seq2seq" else None)


def attention_kernel(c: ModelConfig, precision: str, seq_len: int, device_type: str = "cuda") -> str:
    """Which attention behaviour a training run takes: `fused` (SDPA's fused kernels in every
    attention: every CUDA run, and CPU runs in fp32 without dropout or a position bias) or `cpu`
    (what the CPU picks per attention, `_attention_impl`)."""
    from lmforge.models.blocks import Attention

    if device_type == "cpu" and (c.dropout > 0 or c.pos_encoding == "relative" or (
            precision != "fp32" and seq_len <= Attention.CPU_ATTENTION_MAX_LEN)):
        return "cpu"
    return "fused"


def _attention_impl(c: ModelConfig, attention: str, low_precision: bool, keys: int, bias: bool) -> str:
    """The implementation one attention sublayer runs. attention="fused": SDPA's flash/efficient
    kernels (CUDA). attention="cpu": as `Attention._use_cpu_attention` and SDPA's CPU dispatch
    decide: a position bias (which needs a gradient) -> SDPA's `math` path; dropout, or bf16 up
    to `CPU_ATTENTION_MAX_LEN` keys -> the hand-written `cpu` path; else SDPA's flash kernel."""
    from lmforge.models.blocks import Attention

    if attention == "fused":
        return "fused"
    if attention != "cpu":
        raise ValueError(f"unknown attention kernel {attention!r}")
    if bias:
        return "math"
    if c.dropout > 0 or (low_precision and keys <= Attention.CPU_ATTENTION_MAX_LEN):
        return "cpu"
    return "fused"


def _attention_bytes(c: ModelConfig, p: Precision, impl: str, queries: int, keys: int, *, cross: bool,
                     out_trained: bool) -> int:
    """Bytes per example one attention sublayer saves (queries x keys; see the module docstring).

    fused: the projections' outputs (qkv; cross: q and kv), which SDPA keeps whole through its
    views, its output (the out-projection reads it as is) and logsumexp; RoPE's rotated q and k.
    cpu / math: the scaled q, contiguous copies of k^T and v (repeated to every head under GQA),
    the (T, S) probabilities, with dropout also their keep-mask (uint8; the math path: a noise
    tensor in its dtype) and the dropped probabilities, and the (B, T, heads * head_dim) copy of
    the output the out-projection reads.
    SDPA's math path computes in fp32 on CPU (it upcasts bf16), the hand-written one in the
    autocast dtype.
    """
    T, S, H = queries, keys, c.n_head
    q, kv = c.n_head * c.head_dim, c.kv_heads * c.head_dim
    if impl == "fused":
        projections = (T * q + S * 2 * kv) if cross else T * (q + 2 * kv)
        rotated = T * (q + kv) if c.pos_encoding == "rope" and not cross else 0
        return (projections + T * q + rotated) * p.act + H * T * 4
    width = 4 if impl == "math" else p.act
    scores = H * T * S
    saved = (T * q + 2 * S * q + scores) * width
    if c.dropout > 0:  # the keep-mask: `cpu_keep_mask`'s uint8; the math path's `at::dropout` noise tensor
        saved += scores * ((1 if impl == "cpu" else width) + width)
    return saved + (T * q * p.act if out_trained else 0)


def block_activation_bytes(c: ModelConfig, stack: Stack, precision: str, attention: str = "fused",
                           lora: LoRA | None = None) -> dict[str, int]:
    """Bytes per example that one block of `stack` saves for backward, by part (see the module
    docstring). attention: "fused" (CUDA) or "cpu" (`_attention_impl`). With `lora`, the base is
    frozen bf16: a Linear saves its input only if it has an adapter."""
    p = Precision.of("bf16-frozen" if lora else precision)
    trained = set(lora.targets) if lora else set(LORA_TARGETS)
    T, S = stack.length, stack.context
    d, h = c.n_embd, c.ffn_hidden
    E, k = c.moe.num_experts, min(c.moe.top_k, c.moe.num_experts)
    experts_read = "up" in trained or "gate" in trained  # the first MLP Linear(s) save their input
    if E:  # the router reads the norm's output in fp32 (saved when the router is trained); the
        # experts read a bf16 copy, gathered per routed token (counted below)
        norms = _norm_act_bytes(c, p, "qkv" in trained) + _norm_act_bytes(c, p, False) + (0 if lora else d * 4)
    else:
        norms = _norm_act_bytes(c, p, "qkv" in trained) + _norm_act_bytes(c, p, experts_read)
        if _gated(c) and lora is None and p.act != p.stream:  # gate and up each save their own
            norms += d * p.act  # autocast copy of the norm's output
    low = p.act == 2
    impl = _attention_impl(c, attention, low, T, stack.bias)
    parts = {"attention": _attention_bytes(c, p, impl, T, T, cross=False, out_trained="out" in trained)}
    if S:  # cross-attention: its norm (whose output the q projection reads; q and kv get no adapters)
        norms += _norm_act_bytes(c, p, lora is None)
        cross = _attention_impl(c, attention, low, S, bias=False)
        parts["cross_attention"] = _attention_bytes(c, p, cross, T, S, cross=True, out_trained="out" in trained)
        if lora is None and p.act != p.stream:  # each layer's kv projection casts the encoder output
            parts["cross_attention"] += S * d * p.act  # (in fp32 all layers save the same tensor: `_ends`)
    parts["residual_norms"] = norms * T
    # MLP hidden tensors: the activation's saved input(s), + the down-projection's input when
    # down is trained (relu: the same tensor as relu's saved output)
    hidden = 3 if _gated(c) else 1  # gated: gate, act(gate), up; else the activation's input (relu: output)
    hidden += int("down" in trained and c.mlp != "relu")
    mlp = hidden * h * p.act
    if E:  # per token: fp32 router logits and probabilities, the k gates; per routed copy (k):
        # the gathered input, the expert's hidden tensors and its output (saved by the gating),
        # each expert's rows padded by ~1/24 on average (`moe.bucket_rows`: up to 1/8)
        mlp = E * 8 + k * 4 + k * MOE_PADDING * (mlp + (d * p.act if experts_read else 0) + d * p.act)
    parts["mlp"] = mlp * T
    # 1-byte keep-masks of the residual dropouts (attention, cross-attention and MLP outputs)
    parts["dropout"] = (3 if S else 2) * d * T if c.dropout > 0 else 0
    if lora:  # A's r-wide output, which B saves, per targeted Linear (and routed expert)
        outs = 2 if S and "out" in lora.targets else 1  # a decoder block has two out-projections
        parts["lora"] = T * sum(lora.rank * p.act * active * (outs if name == "out" else 1)
                                for name, _, _, _, active in lora.targeted(c))
    return parts


def _ends(c: ModelConfig, p: Precision, micro_batch: int, model_stacks: list[Stack], lora: LoRA | None,
          ) -> dict[str, float]:
    """Bytes saved outside the blocks: `inputs` (until the end of backward: token ids, BERT's
    embedding norm, the encoder's final norm and output, T5's position buckets), `head` (until
    the head's backward: the final norm or BERT's MLM transform, the fp32 log-softmax, targets)
    and `transient`, the gradients alive for a moment at the start of backward."""
    B, d, V, trained = micro_batch, c.n_embd, c.vocab_size, lora is None
    first, last = model_stacks[0], model_stacks[-1]
    S, T = first.length, last.length  # encoder (or only stack) and decoder positions
    drop = d if c.dropout > 0 else 0  # an embedding dropout's keep-mask (1 byte)
    loss = T * (V * 4 + 8)  # fp32 log-softmax and the targets, over every output position
    transient = T * V * 4 * 2  # d log-softmax and d logits (fp32 loss)
    if c.arch == "gpt":
        inputs = T * 8
        head = T * _norm_act_bytes(c, p, output_saved=trained) + loss
    elif c.arch == "bert":  # ids, segment ids; the embedding norm (the first block saves its output)
        inputs = S * (16 + _norm_act_bytes(c, p, output_saved=False) + drop)
        # the MLM transform at every position: dense (input), activation (input), norm (input: a
        # matmul output; its output: the output projection's input)
        head = S * ((d * p.act if trained else 0) + d * p.act + _norm_act_bytes(c, p, trained, input_bytes=p.act)) + loss
        if c.nsp_head:  # per example: the pooler's input and tanh output, NSP's log-softmax and label
            head += 2 * d * p.act + 2 * 4 + 8
            transient += S * d * 4  # the gradient of h[:, 0] as a full fp32 (B, S, d) tensor
    else:  # encoder-decoder: encoder and decoder ids, embedding dropouts
        inputs = (S + T) * (8 + drop)
        if c.norm_position == "pre":  # the encoder's final norm (its output: the cross-attention input)
            inputs += S * _norm_act_bytes(c, p, output_saved=False)
        if trained and p.act == p.stream:  # every layer's kv projection saves the same encoder output
            inputs += S * d * p.act
        final = _norm_act_bytes(c, p, trained) if c.norm_position == "pre" else (d * p.act if trained else 0)
        head = T * final + loss
    steps = {"inputs": inputs * B, "head": head * B, "transient": transient * B}
    if c.pos_encoding == "relative":  # each stack's (queries, keys) int64 bucket ids, once per step
        steps["inputs"] += 8 * sum(s.length * s.length for s in model_stacks)
    return steps


def activation_memory(c: ModelConfig, micro_batch: int, seq_len: int, precision: str,
                      checkpointing: bool = False, attention: str = "fused",
                      lora: LoRA | None = None, decoder_len: int | None = None) -> dict[str, Any]:
    """Activation bytes of one micro-batch, by part: `layers` (all blocks), `inputs` and `head`
    are what is saved at the start of backward; `blocks` lists per block (forward order) its stack,
    what it saves (`saved`: with checkpointing, while it is being recomputed) and what is kept
    until its backward (`kept`: the block's input with checkpointing, else `saved`)."""
    p = Precision.of("bf16-frozen" if lora else precision)
    B = micro_batch
    model_stacks = stacks(c, seq_len, decoder_len)
    blocks = []
    for stack in model_stacks:
        # RoPE under bf16: each layer casts the fp32 cos/sin tables (kept by its backward)
        rope_tables = 4 * stack.length * c.head_dim * 2 if (c.pos_encoding == "rope" and p.act == 2) else 0
        saved = sum(block_activation_bytes(c, stack, precision, attention, lora).values()) * B + rope_tables
        kept = stack.length * c.n_embd * p.stream * B if checkpointing else saved
        blocks += [{"stack": stack, "saved": saved, "kept": kept}] * stack.layers
    ends = _ends(c, p, B, model_stacks, lora)
    return {"layers": sum(b["kept"] for b in blocks), "inputs": ends["inputs"], "head": ends["head"],
            "backward_transient": ends["transient"], "blocks": blocks}


def _stack_block_params(c: ModelConfig) -> dict[str, int]:
    """Parameters of one block of each stack (by `Stack.name`)."""
    if c.arch == "gpt":
        return {"": count_params(c)["per_block"]}
    model = _built(c)
    lists = {"encoder": model.encoder_blocks, "decoder": model.decoder_blocks} if c.arch == "encdec" \
        else {"encoder": model.blocks}
    return {name: sum(p.numel() for p in blocks[0].parameters()) for name, blocks in lists.items()}


def training_memory(c: ModelConfig, micro_batch: int, seq_len: int | None = None, precision: str = "bf16",
                    checkpointing: bool = False, gpus: int = 1, attention: str = "fused",
                    lora: LoRA | None = None, decoder_len: int | None = None) -> dict[str, Any]:
    """Peak training memory per device in bytes, by part, for AdamW.

    seq_len: positions per example (an encoder-decoder's source), default block_size;
    decoder_len: an encoder-decoder's target positions, default seq_len (`objective_lengths`).
    Full training keeps fp32 master weights; with `lora` the base is frozen (bf16, or NF4 for
    QLoRA) and only the adapters are trained (fp32), under bf16 autocast (`precision` is
    ignored). With gpus > 1, FSDP2 (as `train.distributed.parallelize` applies it: one unit per
    block, parameters gathered in the compute dtype) shards weights, gradients and optimizer state
    G ways, all-gathers the parameters of the block in use (plus the one prefetched) and of the
    root module (embeddings, head), and holds one block's unsharded gradients before reducing
    them. The FSDP terms are not measured here (no GPUs): they follow FSDP2's documented design.

    The peak is found by walking backward as it runs, as the training loop runs it (it keeps
    only the loss, so the logits are gone; gradients are freed after each step): at the head
    (all activations, autocast's weight copies, the logits' gradients, the head's weight
    gradient), then block by block from the top (the decoder's, then the encoder's), each
    freeing its activations and weight copies and adding its gradients (in bf16 first, then
    accumulated into fp32; in a decoder, also the encoder output's gradient), to the end (every
    gradient; a tied embedding's lookup gradient is added out of place into the head's at the
    very end: two more vocab x d tensors). Memory is linear in the blocks done within a stack,
    so each stack's top and bottom blocks bound it. MoE blocks, whose weights outweigh their
    activations at small batches, peak at the bottom; dense ones at the head.
    """
    seq_len = seq_len or c.block_size
    n = count_params(c)
    shard = max(gpus, 1)
    acts = activation_memory(c, micro_batch, seq_len, precision, checkpointing, attention, lora, decoder_len)
    stack_params = _stack_block_params(c)
    if lora is None:
        p = Precision.of(precision)
        trainable, per_block = n["total"], stack_params
        weights = n["total"] * 4 / shard
        # FSDP gathers the parameters in the compute dtype (`train.distributed.parallelize`:
        # bf16 with bf16 autocast), so there are no autocast copies; one process casts each
        # weight for its matmul and keeps the copy until backward has used it
        gathered_bytes = 4 - p.cast_weights if gpus > 1 else 4
        block_bytes = n["per_block"] * gathered_bytes
        root_bytes = max(0, n["total"] - sum(stack_params[s.name] * s.layers for s in stacks(c, seq_len)))
        root_bytes *= gathered_bytes
        cast_bytes = 0 if gpus > 1 else p.cast_weights
        casts = n["matmul"] * cast_bytes
        block_casts = {name: x * cast_bytes for name, x in stack_params.items()}
        # a weight's gradient comes out of its bf16 matmul in bf16, then is accumulated in fp32
        largest = max(i * o for _, i, o, _, _ in block_linears(c))
        bf16_grads = largest * p.cast_weights
        head_grad = c.vocab_size * c.n_embd * 4 / shard  # the first gradient backward writes
        tied_sum = 2 * c.vocab_size * c.n_embd * 4 / shard if c.tie_embeddings else 0
    else:
        base = frozen_base_bytes(c, lora)
        lp = lora_params(c, lora)
        trainable = lp["total"]
        per_block = {name: lp["per_layer"] for name in stack_params}
        weights = (base["total"] + trainable * 4) / shard
        block_bytes, root_bytes = base["per_block"], base["root"]
        # autocast's bf16 copies of the fp32 adapters (+ QLoRA's dequantized weight at hand)
        casts, block_casts = trainable * 2, {name: lp["per_layer"] * 2 for name in stack_params}
        bf16_grads = 0  # (adapters: negligible)
        head_grad = tied_sum = 0
        acts["dequantized_transient"] = base["dequantized_transient"]
    grads = trainable * 4 / shard
    optimizer = trainable * ADAMW_STATE_BYTES / shard
    # FSDP: all-gathered (unsharded) parameters of two blocks (the one in use, the one prefetched)
    # and of the root module (embeddings, final norm, head), which stays gathered
    gathered = 2 * block_bytes + root_bytes if gpus > 1 else 0.0
    transient = acts.get("dequantized_transient", 0)
    encoder_output_grad = 0.0  # an encoder-decoder's (B, S, d) fp32 gradient, filled by the decoder
    if c.arch == "encdec":
        encoder_output_grad = micro_batch * seq_len * c.n_embd * 4

    phases = {"head": acts["layers"] + acts["inputs"] + acts["head"] + acts["backward_transient"] + casts
              + head_grad}
    backward = acts["blocks"][::-1]  # blocks in the order backward runs them
    done_grads = done_casts = 0.0
    for i, block in enumerate(backward):
        stack = block["stack"]
        trained_here = per_block[stack.name]
        # FSDP: a block's unsharded gradients (fp32, the reduce dtype) until they are reduce-scattered
        block_grads = trained_here * 4 / shard + bf16_grads + (trained_here * 4 if gpus > 1 else 0)
        remaining = sum(b["kept"] for b in backward[i:]) + (block["saved"] if checkpointing else 0)
        memory = (remaining + acts["inputs"] + casts - done_casts + head_grad + done_grads + block_grads
                  + (encoder_output_grad if stack.name == "decoder" else 0))
        top = i == 0 or backward[i - 1]["stack"] != stack
        bottom = i == len(backward) - 1 or backward[i + 1]["stack"] != stack
        for end, is_end in (("top", top), ("bottom", bottom)):
            if is_end:
                phases[f"{end} {stack.name} block".replace("  ", " ")] = memory
        done_grads += trained_here * 4 / shard
        done_casts += block_casts[stack.name]
    phases["end of backward"] = grads + tied_sum
    phase = max(phases, key=phases.get)
    peak = weights + optimizer + gathered + transient + phases[phase]
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "fsdp_gathered": gathered,
            "autocast_weight_copies": casts + transient,
            **{f"activations_{k}": acts[k] for k in ("layers", "inputs", "head", "backward_transient")},
            "trainable_params": trainable, "peak": peak, "peak_phase": phase}


# --------------------------------------------------------------------------------------------
# The plan


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
        from lmforge.train.loop import resolve_model_config, run_tokenizer

        tokenizer, _ = run_tokenizer(cfg, tokens)
        vocab = resolve_model_config(cfg, tokenizer).vocab_size
        return vocab, f"tokenizer of {tokens}: {tokenizer.vocab_size} tokens, padded to a multiple of 64"
    return DEFAULT_VOCAB, assumed


def plan(cfg: Any, *, gpus: int = 1, gpu_type: str = "H100", mfu: float = 0.4, tokens: float | None = None,
         vocab_size: int | None = None, lora_rank: int | None = None,
         lora_targets: str | Sequence[str] = DEFAULT_LORA_TARGETS) -> dict[str, Any]:
    """The sizing report of a config (`lmforge.config.Config`) as plain data (what `--json` prints).

    Memory rows: fp32 and bf16-mixed full training, with and without activation checkpointing;
    with `lora_rank`, LoRA and QLoRA rows too.
    """
    if gpu_type not in _GPU_PEAK_BF16:
        raise UserError(f"--gpu-type {gpu_type!r} is not known; allowed: {', '.join(_GPU_PEAK_BF16)}")
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    if tokens is not None and tokens <= 0:
        raise UserError(f"--tokens must be > 0, got {tokens}")
    vocab, vocab_source = _resolve_vocab(cfg, vocab_size)
    c = ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": vocab})
    params = count_params(c)
    moe = c.moe.num_experts > 0
    micro_batch = cfg.train.batch_size
    seq_len, decoder_len = objective_lengths(cfg, c.block_size)
    fpt = flops_per_token(c, seq_len, decoder_len)
    budget = float(tokens) if tokens else CHINCHILLA_TOKENS_PER_PARAM * params["active"]
    total_flops = fpt * budget
    peak_flops = _GPU_PEAK_BF16[gpu_type]
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
                                          decoder_len=decoder_len)
            memory[key]["fits"] = memory[key]["peak"] <= GPU_MEMORY_GIB[gpu_type] * 2**30
    tokens_per_step = micro_batch * seq_len * cfg.train.grad_accum * gpus
    per = "active parameters" if moe else "parameters"
    method = "per-tensor model of our blocks"
    if c.arch != "gpt" and lora_report:
        method += f" (LoRA/QLoRA rows: not validated for {c.arch})"
    return {
        "model": c.to_dict(), "vocab_source": vocab_source,
        "parameters": params, "lora": lora_report,
        "flops_per_token": fpt, "flops_per_token_6N": 6.0 * params["matmul_active"],
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
              f"FLOPs/token (train) {_si(report['flops_per_token'])}  (6N = {_si(report['flops_per_token_6N'])}"
              f" + attention{'; N = active' if moe else ''})",
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
