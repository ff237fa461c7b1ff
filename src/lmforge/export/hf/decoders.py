"""HF mappings of the decoder-only families: GPT-2, Llama, dense Mistral and Mixtral.

Each family is a config.json -> `ModelConfig` reader, its inverse and a `TensorRule` table;
`registry.py` assembles them into `HFArch`es.

Llama and Mistral share one layout: a checkpoint records the `model_type` it was converted from
(`hf_model_type`), so a Mistral goes back as Mistral; a model trained here goes out as Llama.
"""

from __future__ import annotations

from typing import Any

from lmforge.errors import UserError
from lmforge.export.hf.rules import TensorRule, need_key, only_value
from lmforge.models.config import ModelConfig

# --------------------------------------------------------------------------------------------
# GPT-2

_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
GPT2_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def gpt2_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    act = only_value(hf, "activation_function", "gelu_new", tuple(_GPT2_ACT), where)
    only_value(hf, "scale_attn_weights", True, (True,), where)
    only_value(hf, "scale_attn_by_inverse_layer_idx", False, (False,), where)
    only_value(hf, "add_cross_attention", False, (False,), where)
    return ModelConfig(
        vocab_size=need_key(hf, "vocab_size", where), n_layer=need_key(hf, "n_layer", where),
        n_head=need_key(hf, "n_head", where), n_embd=need_key(hf, "n_embd", where),
        block_size=need_key(hf, "n_positions", where), dropout=float(hf.get("resid_pdrop", 0.0)),
        bias=True, pos_encoding="learned", norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), mlp=_GPT2_ACT[act],
        mlp_hidden=hf.get("n_inner"), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def gpt2_config_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "gpt2", "vocab_size": c.vocab_size, "n_layer": c.n_layer, "n_head": c.n_head,
        "n_embd": c.n_embd, "n_positions": c.block_size, "n_inner": c.ffn_hidden,
        "activation_function": GPT2_ACT_OUT[c.mlp], "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "initializer_range": c.init_std, "tie_word_embeddings": c.tie_embeddings,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def gpt2_rules(c: ModelConfig) -> list[TensorRule]:
    rules = [TensorRule("tok_embeddings.weight", ("transformer.wte.weight",)),
             TensorRule("pos_embeddings.weight", ("transformer.wpe.weight",)),
             TensorRule("norm.weight", ("transformer.ln_f.weight",)),
             TensorRule("norm.bias", ("transformer.ln_f.bias",))]
    for i in range(c.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ours, theirs, conv1d in (("attn_norm", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                                     ("attn.out", "attn.c_proj", True), ("mlp_norm", "ln_2", False),
                                     ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)):
            rules.append(TensorRule(f"{b}{ours}.weight", (f"{h}{theirs}.weight",), transpose=conv1d))
            rules.append(TensorRule(f"{b}{ours}.bias", (f"{h}{theirs}.bias",)))
    if not c.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head.weight",)))
    return rules


# --------------------------------------------------------------------------------------------
# Llama and dense Mistral (the same layout; Mistral adds a sliding window we do not implement)


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    """The RoPE base; any RoPE scaling is refused (lmforge implements plain RoPE only).

    transformers 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`. A file may
    hold both, and transformers applies a scaling from either, so both are checked; an error names
    the key as the file spells it (`rope_type`, or the legacy `type`). A dict without a type is
    the default (unscaled) RoPE, as transformers reads it. The base follows transformers too: a
    non-empty `rope_scaling` replaces `rope_parameters`, and the chosen dict's rope_theta comes
    first, then the top-level rope_theta, then 10000.
    """
    for field in ("rope_parameters", "rope_scaling"):
        params = hf.get(field)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise UserError(f"{where}: {field}={params!r} is not supported; allowed: null or an object "
                            "with rope_type 'default'")
        key = "rope_type" if "rope_type" in params else "type"
        kind = params.get(key, "default")
        if kind != "default":
            raise UserError(f"{where}: {field}.{key}={kind!r} (RoPE scaling) is not supported; lmforge "
                            f"implements unscaled RoPE only (allowed: {field} null or {key} 'default')")
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    return float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)


def _llama_head_dim(hf: dict[str, Any], n_embd: int, n_head: int, where: str) -> int:
    """The width of one attention head, as transformers computes it.

    transformers 5 saves `head_dim`; older files leave it out and transformers takes
    hidden_size // num_attention_heads. Heads need not tile hidden_size (q/k/v project to
    heads * head_dim, o_proj back; lmforge's attention takes any width, `attn_head_dim`), but
    transformers' Llama config refuses a hidden_size that num_attention_heads does not divide
    (Mistral's and Mixtral's do not), so such a Llama file is refused here too.
    """
    for key, value in (("hidden_size", n_embd), ("num_attention_heads", n_head)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{where}: {key}={value!r} is not supported; allowed: a positive integer")
    if hf.get("model_type") == "llama" and n_embd % n_head:
        raise UserError(f"{where}: hidden_size={n_embd} is not divisible by num_attention_heads={n_head}; "
                        "transformers' Llama requires it (whatever head_dim says): fix one of the two")
    kv_heads = hf.get("num_key_value_heads") or n_head
    if not isinstance(kv_heads, int) or isinstance(kv_heads, bool) or kv_heads <= 0 or n_head % kv_heads:
        raise UserError(f"{where}: num_key_value_heads={kv_heads!r} does not divide num_attention_heads={n_head}; "
                        "grouped-query attention needs a divisor")
    head_dim = hf.get("head_dim")
    name = f"head_dim={head_dim!r}"
    if head_dim is None:
        head_dim = n_embd // n_head
        name = f"hidden_size // num_attention_heads = {n_embd} // {n_head} = {head_dim} (there is no head_dim)"
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0:
        raise UserError(f"{where}: {name} is not supported; allowed: a positive integer")
    if head_dim % 2:  # RoPE rotates pairs of channels
        raise UserError(f"{where}: {name} is odd; RoPE needs an even head dim (fix the field to match the weights)")
    return head_dim


def llama_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    only_value(hf, "hidden_act", "silu", ("silu",), where)
    only_value(hf, "attention_bias", False, (False,), where)
    only_value(hf, "mlp_bias", False, (False,), where)
    n_embd, n_head = need_key(hf, "hidden_size", where), need_key(hf, "num_attention_heads", where)
    block_size = need_key(hf, "max_position_embeddings", where)
    head_dim = _llama_head_dim(hf, n_embd, n_head, where)
    window = hf.get("sliding_window")
    if window is not None and window < block_size:
        raise UserError(f"{where}: sliding_window={window} < max_position_embeddings={block_size} is not "
                        "supported (lmforge attends to the whole context); allowed: null or >= "
                        "max_position_embeddings")
    return ModelConfig(
        vocab_size=need_key(hf, "vocab_size", where), n_layer=need_key(hf, "num_hidden_layers", where),
        n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
        attn_head_dim=None if head_dim * n_head == n_embd else head_dim,
        block_size=block_size, dropout=float(hf.get("attention_dropout", 0.0)), bias=False,
        pos_encoding="rope", norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp="swiglu", mlp_hidden=need_key(hf, "intermediate_size", where),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=_rope_theta(hf, where),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def llama_config_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.n_embd,
        "intermediate_size": c.ffn_hidden, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.block_size, "hidden_act": "silu", "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": c.dropout,
        "tie_word_embeddings": c.tie_embeddings, "initializer_range": c.init_std,
    }


def mistral_config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """A converted Mistral goes back as Mistral: Llama's fields without the bias switches Mistral
    lacks, and no sliding window (from-hf took only windows that cover the whole context)."""
    hf = {k: v for k, v in llama_config_to_hf(c).items() if k not in ("attention_bias", "mlp_bias")}
    return {**hf, "model_type": "mistral", "sliding_window": None}


def llama_rules(c: ModelConfig) -> list[TensorRule]:
    rules = [TensorRule("tok_embeddings.weight", ("model.embed_tokens.weight",)),
             TensorRule("norm.weight", ("model.norm.weight",))]
    for i in range(c.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        rules += [
            TensorRule(f"{b}attn.qkv.weight", tuple(f"{h}self_attn.{n}_proj.weight" for n in "qkv")),
            TensorRule(f"{b}attn.out.weight", (f"{h}self_attn.o_proj.weight",)),
            TensorRule(f"{b}attn_norm.weight", (f"{h}input_layernorm.weight",)),
            TensorRule(f"{b}mlp_norm.weight", (f"{h}post_attention_layernorm.weight",)),
            *(TensorRule(f"{b}mlp.{n}.weight", (f"{h}mlp.{n}_proj.weight",)) for n in ("gate", "up", "down")),
        ]
    if not c.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head.weight",)))
    return rules


# --------------------------------------------------------------------------------------------
# Mixtral: the Llama layout with each MLP replaced by a top-k Mixture-of-Experts.
# Files use the per-expert layout (`block_sparse_moe.experts.N.w1/w3/w2` = gate/up/down, router
# `block_sparse_moe.gate`) in transformers 4 and 5 alike: transformers 5 fuses the experts into
# 3-D tensors in memory (`mlp.experts.gate_up_proj`) but converts back when it saves.


def mixtral_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    from lmforge.models.config import MoEConfig

    only_value(hf, "router_jitter_noise", 0.0, (0, 0.0), where)
    experts, top_k = need_key(hf, "num_local_experts", where), need_key(hf, "num_experts_per_tok", where)
    if not 1 <= top_k <= experts:
        raise UserError(f"{where}: num_experts_per_tok={top_k} is not supported; "
                        f"allowed: 1..num_local_experts={experts}")
    c = llama_config_from_hf(hf, where)
    # HF Mixtral is dropless and has no z-loss; its load-balancing coefficient carries over
    c.moe = MoEConfig(num_experts=experts, top_k=top_k, aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
                      z_loss_coef=0.0, capacity_factor=0.0)
    c.validate()
    return c


def mixtral_config_to_hf(c: ModelConfig) -> dict[str, Any]:
    hf = llama_config_to_hf(c)
    for key in ("mlp_bias", "attention_bias"):  # Llama-only fields
        hf.pop(key, None)
    # capacity_factor and z_loss_coef are training-only settings HF Mixtral does not have; the
    # logits are the same without them (lmforge drops tokens only in training)
    return {**hf, "model_type": "mixtral", "num_local_experts": c.moe.num_experts,
            "num_experts_per_tok": c.moe.top_k, "router_aux_loss_coef": c.moe.aux_loss_coef,
            "router_jitter_noise": 0.0, "output_router_logits": False, "sliding_window": None}


def mixtral_rules(c: ModelConfig) -> list[TensorRule]:
    rules = [r for r in llama_rules(c) if ".mlp." not in r.ours]
    for i in range(c.n_layer):
        h, b = f"model.layers.{i}.block_sparse_moe.", f"blocks.{i}.mlp."
        rules.append(TensorRule(f"{b}router.weight", (f"{h}gate.weight",)))
        for e in range(c.moe.num_experts):
            rules += [TensorRule(f"{b}experts.{e}.{ours}.weight", (f"{h}experts.{e}.{theirs}.weight",))
                      for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2"))]
    return rules
