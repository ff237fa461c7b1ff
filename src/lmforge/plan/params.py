"""Parameters and training FLOPs of a model config, for `lmforge plan`.

Parameters. The GPT family has a closed formula (`count_params`), checked against
`sum(p.numel())` of the built model for every preset. An MoE block replaces the dense MLP by a
router `Linear(d, E, bias=False)` and E expert MLPs of the dense MLP's shape; a token passes
through the router and its top-k experts, so the *active* parameters (and the FLOPs per token)
count k experts, the total (and the memory) all E. Architectures without a formula are counted
exactly by building the model on the meta device (`count_params_built`: no memory, no init).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from lmforge.models.config import ModelConfig


def _norm_params(c: ModelConfig) -> int:
    return c.n_embd * (2 if c.norm == "layernorm" and c.bias else 1)


def is_gated(c: ModelConfig) -> bool:
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
    if is_gated(c):
        linears.append(("gate", d, h, experts, active))
    linears += [("up", d, h, experts, active), ("down", h, d, experts, active)]
    return linears


def mlp_params(c: ModelConfig) -> int:
    """Parameters of one dense MLP (an MoE expert has the same shape)."""
    d, h, b = c.n_embd, c.ffn_hidden, int(c.bias)
    n_in = 2 if is_gated(c) else 1  # swiglu/geglu have gate and up projections
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
    if c.arch != "gpt" or c.is_pruned:  # a pruned model (per-layer widths) is counted too
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


def built_model(c: ModelConfig) -> Any:
    return _meta_model(json.dumps(c.to_dict(), sort_keys=True))


def count_params_built(c: ModelConfig) -> dict[str, Any]:
    """`count_params` by building the model (`lmforge.models.build_model`) on the meta device.

    Exact for any architecture: parameters are counted from the module (shared ones once);
    non-embedding is the model's own `num_params(exclude_embeddings=True)` where it has one, else
    everything but the `nn.Embedding` tables; a tied head counts as a matmul (as in
    `count_params`); `per_block` is the largest module of the model's layer lists.
    """
    from torch import nn

    model = built_model(c)
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


def flops_per_token(c: ModelConfig, seq_len: int | None = None, decoder_len: int | None = None,
                    objective: Any = None) -> float:
    """Training FLOPs per token: 6·N_active_matmul + 12·L·d·T (attention), as `GPT.flops_per_token`.

    An MoE token runs through the router and top_k experts only, so N counts those. Other
    architectures: their model's own `flops_per_token` (which knows e.g. an encoder-decoder's
    cross-attention and its decoder length, `decoder_len`: default seq_len). `objective` (a name
    or an `Objective` class): the objective's own count (`Objective.model_flops`, e.g.
    contrastive's two views through the encoder without the MLM head), as training's MFU uses it.
    """
    seq_len = c.block_size if seq_len is None else seq_len
    if objective is not None:
        from lmforge.train.objectives import objective_class

        cls = objective_class(objective) if isinstance(objective, str) else objective
        return cls.model_flops(built_model(c), seq_len, decoder_len if c.arch == "encdec" else None)
    if c.arch != "gpt":
        lengths = (seq_len, decoder_len) if c.arch == "encdec" else (seq_len,)
        return float(built_model(c).flops_per_token(*lengths))
    width = n_blocks(c) * c.n_embd if c.layer_heads is None else sum(c.layer_heads) * c.head_dim  # pruned: its own
    return 6.0 * count_params(c)["matmul_active"] + 12.0 * width * seq_len
