"""Hugging Face interop: HF causal-LM directories to lmforge checkpoints and back.

    from_hf("gpt2-dir", "ckpt")      # config.json + model.safetensors (+ tokenizer.json) -> checkpoint
    to_hf("ckpt", "hf-dir")          # checkpoint -> a dir `AutoModelForCausalLM.from_pretrained` loads

A registry (`ARCHITECTURES`) maps an HF `model_type` to an `HFArch`: how its config.json becomes
our `ModelConfig` and back, and a table of `TensorRule`s pairing each of our tensors with the
HF tensor(s) it is made of. The one table serves both directions, so from-hf and to-hf cannot
drift apart, and every shape check can name the HF tensor at fault.

Supported now: GPT-2 (`gpt2`), Llama incl. grouped-query attention (`llama`), dense Mistral
(`mistral`, without a sliding window), Mixtral (`mixtral`: Mistral with top-k MoE MLPs) and BERT (`bert`: BertModel, BertForMaskedLM,
BertForPreTraining, BertForNextSentencePrediction, BertForSequenceClassification) and T5
(`t5`: T5ForConditionalGeneration, v1.0 and v1.1).
Everything else is a one-line `UserError` naming the config field and what is allowed.

Heads differ between the HF classes of one family. Which ones a BERT checkpoint has is read
from its weights (pooler, NSP, classifier); a head lmforge's model always has but the file
lacks (BERT's MLM head in a sentence-transformers `BertModel`) is an *optional* rule group:
from-hf initializes it and reports it, and to-hf reports what an HF class cannot hold.

Llama and Mistral share one layout: a checkpoint records the `model_type` it was converted from
(`hf_model_type`), so a Mistral goes back as Mistral; a model trained here goes out as Llama.
A BERT's tokenizer.json gains BERT's [CLS]/[SEP] post-processor at to-hf (lmforge adds them by
id), so HF tokenizers and sentence-transformers feed the encoder what training and
`lmforge embed` did.

Both directions write the output under a temp name and swap it in (`atomic_dir`); an output
that is, lies inside or holds the input is refused, and a non-empty one needs `overwrite`.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import UserError
from lmforge.fsutil import atomic_dir, atomic_write_json, atomic_write_text, write_summary
from lmforge.models.config import ModelConfig


@dataclass(frozen=True)
class TensorRule:
    """One of our tensors and the HF tensor(s) it is made of.

    Several `theirs` are concatenated along dim 0 in our layout (Llama's or T5's q/k/v
    projections into our fused `qkv`, T5's cross-attention k/v into our `kv`); `transpose` marks
    GPT-2's Conv1D, which stores weights as (in, out).
    """

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False
    # Non-empty: the rule belongs to this named group of tensors that HF files may lack as a
    # whole (e.g. "MLM head"); from-hf then initializes the group and reports it.
    optional: str = ""
    # More HF names of the one tensor (single-tensor rules): from-hf reads the first name
    # present and ignores the rest, to-hf writes a copy under each (HF BERT's decoder bias).
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class HFArch:
    """How one HF `model_type` maps onto lmforge."""

    model_type: str
    hf_class: str | Callable[[ModelConfig], str]  # config.json `architectures[0]` written by to-hf
    config_from_hf: Callable[[dict[str, Any], str], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    rules: Callable[[ModelConfig], list[TensorRule]]
    base_prefix: str  # the base model's prefix, which files saved from the base class lack
    # HF tensors that are derived buffers, not weights (older files saved them): skipped on read
    derived: re.Pattern[str]
    head_prefixes: tuple[str, ...] = ("lm_head.",)  # HF tensors outside the base model
    tied_head: str = "lm_head.weight"  # the HF name of an output matrix tied to the input embedding
    # Which heads the weights hold (BERT: pooler, NSP, classifier), folded into the config
    heads_from_weights: Callable[[ModelConfig, dict[str, tuple[int, ...]]], None] | None = None

    def class_for(self, c: ModelConfig) -> str:
        return self.hf_class if isinstance(self.hf_class, str) else self.hf_class(c)


# --------------------------------------------------------------------------------------------
# Config helpers


def _need(hf: dict[str, Any], key: str, where: str) -> Any:
    if hf.get(key) is None:
        raise UserError(f"{where}: required field {key!r} is missing; is this a complete HF config.json?")
    return hf[key]


def _only(hf: dict[str, Any], key: str, default: Any, allowed: tuple[Any, ...], where: str) -> Any:
    """hf[key] (or default), which must be one of `allowed`: lmforge implements only those."""
    value = hf.get(key, default)
    if value not in allowed:
        raise UserError(f"{where}: {key}={value!r} is not supported; allowed: "
                        f"{', '.join(repr(a) for a in allowed)}")
    return value


# --------------------------------------------------------------------------------------------
# GPT-2

_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_GPT2_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def _gpt2_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    act = _only(hf, "activation_function", "gelu_new", tuple(_GPT2_ACT), where)
    _only(hf, "scale_attn_weights", True, (True,), where)
    _only(hf, "scale_attn_by_inverse_layer_idx", False, (False,), where)
    _only(hf, "add_cross_attention", False, (False,), where)
    return ModelConfig(
        vocab_size=_need(hf, "vocab_size", where), n_layer=_need(hf, "n_layer", where),
        n_head=_need(hf, "n_head", where), n_embd=_need(hf, "n_embd", where),
        block_size=_need(hf, "n_positions", where), dropout=float(hf.get("resid_pdrop", 0.0)),
        bias=True, pos_encoding="learned", norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), mlp=_GPT2_ACT[act],
        mlp_hidden=hf.get("n_inner"), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def _gpt2_config_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "gpt2", "vocab_size": c.vocab_size, "n_layer": c.n_layer, "n_head": c.n_head,
        "n_embd": c.n_embd, "n_positions": c.block_size, "n_inner": c.ffn_hidden,
        "activation_function": _GPT2_ACT_OUT[c.mlp], "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "initializer_range": c.init_std, "tie_word_embeddings": c.tie_embeddings,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def _gpt2_rules(c: ModelConfig) -> list[TensorRule]:
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


def _llama_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    _only(hf, "hidden_act", "silu", ("silu",), where)
    _only(hf, "attention_bias", False, (False,), where)
    _only(hf, "mlp_bias", False, (False,), where)
    n_embd, n_head = _need(hf, "hidden_size", where), _need(hf, "num_attention_heads", where)
    block_size = _need(hf, "max_position_embeddings", where)
    head_dim = _llama_head_dim(hf, n_embd, n_head, where)
    window = hf.get("sliding_window")
    if window is not None and window < block_size:
        raise UserError(f"{where}: sliding_window={window} < max_position_embeddings={block_size} is not "
                        "supported (lmforge attends to the whole context); allowed: null or >= "
                        "max_position_embeddings")
    return ModelConfig(
        vocab_size=_need(hf, "vocab_size", where), n_layer=_need(hf, "num_hidden_layers", where),
        n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
        attn_head_dim=None if head_dim * n_head == n_embd else head_dim,
        block_size=block_size, dropout=float(hf.get("attention_dropout", 0.0)), bias=False,
        pos_encoding="rope", norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp="swiglu", mlp_hidden=_need(hf, "intermediate_size", where),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=_rope_theta(hf, where),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def _llama_config_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.n_embd,
        "intermediate_size": c.ffn_hidden, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.block_size, "hidden_act": "silu", "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": c.dropout,
        "tie_word_embeddings": c.tie_embeddings, "initializer_range": c.init_std,
    }


def _mistral_config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """A converted Mistral goes back as Mistral: Llama's fields without the bias switches Mistral
    lacks, and no sliding window (from-hf took only windows that cover the whole context)."""
    hf = {k: v for k, v in _llama_config_to_hf(c).items() if k not in ("attention_bias", "mlp_bias")}
    return {**hf, "model_type": "mistral", "sliding_window": None}


def _llama_rules(c: ModelConfig) -> list[TensorRule]:
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


def _mixtral_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    from lmforge.models.config import MoEConfig

    _only(hf, "router_jitter_noise", 0.0, (0, 0.0), where)
    experts, top_k = _need(hf, "num_local_experts", where), _need(hf, "num_experts_per_tok", where)
    if not 1 <= top_k <= experts:
        raise UserError(f"{where}: num_experts_per_tok={top_k} is not supported; allowed: 1..num_local_experts={experts}")
    c = _llama_config_from_hf(hf, where)
    # HF Mixtral is dropless and has no z-loss; its load-balancing coefficient carries over
    c.moe = MoEConfig(num_experts=experts, top_k=top_k, aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
                      z_loss_coef=0.0, capacity_factor=0.0)
    c.validate()
    return c


def _mixtral_config_to_hf(c: ModelConfig) -> dict[str, Any]:
    hf = _llama_config_to_hf(c)
    for key in ("mlp_bias", "attention_bias"):  # Llama-only fields
        hf.pop(key, None)
    # capacity_factor and z_loss_coef are training-only settings HF Mixtral does not have; the
    # logits are the same without them (lmforge drops tokens only in training)
    return {**hf, "model_type": "mixtral", "num_local_experts": c.moe.num_experts,
            "num_experts_per_tok": c.moe.top_k, "router_aux_loss_coef": c.moe.aux_loss_coef,
            "router_jitter_noise": 0.0, "output_router_logits": False, "sliding_window": None}


def _mixtral_rules(c: ModelConfig) -> list[TensorRule]:
    rules = [r for r in _llama_rules(c) if ".mlp." not in r.ours]
    for i in range(c.n_layer):
        h, b = f"model.layers.{i}.block_sparse_moe.", f"blocks.{i}.mlp."
        rules.append(TensorRule(f"{b}router.weight", (f"{h}gate.weight",)))
        for e in range(c.moe.num_experts):
            rules += [TensorRule(f"{b}experts.{e}.{ours}.weight", (f"{h}experts.{e}.{theirs}.weight",))
                      for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2"))]
    return rules


# --------------------------------------------------------------------------------------------
# BERT (post-norm encoder; q/k/v fused into our qkv; heads by HF class)

_BERT_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_BERT_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_MLM_HEAD = "MLM head (cls.predictions.*)"


def _bert_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    act = _only(hf, "hidden_act", "gelu", tuple(_BERT_ACT), where)
    _only(hf, "position_embedding_type", "absolute", ("absolute",), where)
    _only(hf, "is_decoder", False, (False,), where)
    _only(hf, "add_cross_attention", False, (False,), where)
    return ModelConfig(
        arch="bert", vocab_size=_need(hf, "vocab_size", where), n_layer=_need(hf, "num_hidden_layers", where),
        n_head=_need(hf, "num_attention_heads", where), n_embd=_need(hf, "hidden_size", where),
        block_size=_need(hf, "max_position_embeddings", where),
        dropout=float(hf.get("hidden_dropout_prob", 0.1)), bias=True, pos_encoding="learned",
        norm="layernorm", norm_eps=float(hf.get("layer_norm_eps", 1e-12)), norm_position="post",
        mlp=_BERT_ACT[act], mlp_hidden=_need(hf, "intermediate_size", where),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), init_std=float(hf.get("initializer_range", 0.02)),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
    )


def _bert_heads_from_weights(c: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    c.pooler = "bert.pooler.dense.weight" in shapes
    c.nsp_head = "cls.seq_relationship.weight" in shapes
    c.num_labels = shapes["classifier.weight"][0] if "classifier.weight" in shapes else 0
    c.validate()


def _bert_class(c: ModelConfig) -> str:
    if c.num_labels:
        return "BertForSequenceClassification"
    return "BertForPreTraining" if c.nsp_head else "BertForMaskedLM"


def _bert_config_to_hf(c: ModelConfig) -> dict[str, Any]:
    out = {
        "model_type": "bert", "vocab_size": c.vocab_size, "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "intermediate_size": c.ffn_hidden,
        "hidden_act": _BERT_ACT_OUT[c.mlp], "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.dropout, "max_position_embeddings": c.block_size,
        "type_vocab_size": c.type_vocab_size, "layer_norm_eps": c.norm_eps, "initializer_range": c.init_std,
        "tie_word_embeddings": c.tie_embeddings, "position_embedding_type": "absolute",
        "is_decoder": False, "add_cross_attention": False,
    }
    if c.num_labels:
        out["num_labels"] = c.num_labels
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(c.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(c.num_labels)}
    return out


def _bert_rules(c: ModelConfig) -> list[TensorRule]:
    e = "bert.embeddings."
    rules = [TensorRule("tok_embeddings.weight", (f"{e}word_embeddings.weight",)),
             TensorRule("pos_embeddings.weight", (f"{e}position_embeddings.weight",)),
             TensorRule("type_embeddings.weight", (f"{e}token_type_embeddings.weight",))]
    pairs = [("emb_norm", f"{e}LayerNorm")]
    for i in range(c.n_layer):
        h, b = f"bert.encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            rules.append(TensorRule(f"{b}attn.qkv.{kind}",
                                    tuple(f"{h}attention.self.{n}.{kind}" for n in ("query", "key", "value"))))
        pairs += [(f"{b}attn.out", f"{h}attention.output.dense"), (f"{b}attn_norm", f"{h}attention.output.LayerNorm"),
                  (f"{b}mlp.up", f"{h}intermediate.dense"), (f"{b}mlp.down", f"{h}output.dense"),
                  (f"{b}mlp_norm", f"{h}output.LayerNorm")]
    if c.has_pooler:
        pairs.append(("pooler", "bert.pooler.dense"))
    if c.num_labels:  # HF's classification class holds no MLM/NSP head: to-hf leaves ours out
        pairs.append(("classifier", "classifier"))
    elif c.nsp_head:
        pairs.append(("nsp_head", "cls.seq_relationship"))
    rules += [TensorRule(f"{ours}.{kind}", (f"{theirs}.{kind}",)) for ours, theirs in pairs
              for kind in ("weight", "bias")]
    if not c.num_labels:
        rules += [TensorRule(f"mlm_dense.{kind}", (f"cls.predictions.transform.dense.{kind}",), optional=_MLM_HEAD)
                  for kind in ("weight", "bias")]
        rules += [TensorRule(f"mlm_norm.{kind}", (f"cls.predictions.transform.LayerNorm.{kind}",), optional=_MLM_HEAD)
                  for kind in ("weight", "bias")]
        if c.tie_embeddings:
            rules.append(TensorRule("lm_head.bias", ("cls.predictions.bias",), optional=_MLM_HEAD))
        else:
            # Untied, transformers 5 unties the decoder bias too: `decoder.bias` is the one used and
            # `cls.predictions.bias` a stale copy; transformers 4 ties them. Write both, read the used one.
            rules.append(TensorRule("lm_head.bias", ("cls.predictions.decoder.bias",), optional=_MLM_HEAD,
                                    aliases=("cls.predictions.bias",)))
            rules.append(TensorRule("lm_head.weight", ("cls.predictions.decoder.weight",), optional=_MLM_HEAD))
    return rules


# --------------------------------------------------------------------------------------------
# T5 (T5ForConditionalGeneration): pre-RMSNorm encoder-decoder with a relative position bias.
# q/k/v fuse into our qkv, a cross-attention's k/v into its kv. transformers 5 always ties
# `lm_head` to `shared` unless a file holds a distinct lm_head.weight (T5 v1.1 files), and keeps
# the decoder-output scaling of tied T5 v1.0 as `scale_decoder_outputs` (older files: implied
# by tie_word_embeddings), so both are read from what the file holds.

_T5_FF = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gated-gelu": "geglu", "gated-silu": "swiglu"}
_T5_FF_OUT = {ours: theirs for theirs, ours in _T5_FF.items()}


def _t5_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    ff = _only(hf, "feed_forward_proj", "relu", tuple(_T5_FF), where)
    _only(hf, "is_encoder_decoder", True, (True,), where)
    n_embd, n_head, head_dim = _need(hf, "d_model", where), _need(hf, "num_heads", where), _need(hf, "d_kv", where)
    n_layer = _need(hf, "num_layers", where)
    n_decoder_layer = hf.get("num_decoder_layers") or n_layer
    tied = hf.get("tie_word_embeddings", True) is not False
    scale = hf.get("scale_decoder_outputs")
    return ModelConfig(
        arch="encdec", vocab_size=_need(hf, "vocab_size", where), n_layer=n_layer,
        n_decoder_layer=None if n_decoder_layer == n_layer else n_decoder_layer, n_head=n_head, n_embd=n_embd,
        attn_head_dim=None if head_dim * n_head == n_embd else head_dim,
        block_size=int(hf.get("n_positions", 512)), dropout=float(hf.get("dropout_rate", 0.1)), bias=False,
        pos_encoding="relative", norm="rmsnorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        norm_position="pre", mlp=_T5_FF[ff], mlp_hidden=_need(hf, "d_ff", where), tie_embeddings=tied,
        attn_scale=1.0, rel_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        rel_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
        pad_token_id=hf.get("pad_token_id", 0), scale_decoder_outputs=tied if scale is None else bool(scale),
    )


def _t5_head_from_weights(c: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    c.tie_embeddings = "lm_head.weight" not in shapes  # transformers 5 writes a tied head once


def _t5_config_to_hf(c: ModelConfig) -> dict[str, Any]:
    out = {
        "model_type": "t5", "vocab_size": c.vocab_size, "d_model": c.n_embd, "d_kv": c.head_dim,
        "d_ff": c.ffn_hidden, "num_layers": c.n_layer, "num_decoder_layers": c.decoder_layers,
        "num_heads": c.n_head, "relative_attention_num_buckets": c.rel_buckets,
        "relative_attention_max_distance": c.rel_max_distance, "dropout_rate": c.dropout,
        "layer_norm_epsilon": c.norm_eps, "initializer_factor": 1.0, "feed_forward_proj": _T5_FF_OUT[c.mlp],
        "is_encoder_decoder": True, "tie_word_embeddings": c.tie_embeddings,
        "scale_decoder_outputs": c.scale_decoder_outputs, "n_positions": c.block_size,
    }
    for key in ("decoder_start_token_id", "pad_token_id"):  # the tokenizer's pad, when there is one, wins
        if getattr(c, key) is not None:
            out[key] = getattr(c, key)
    return out


def _t5_rules(c: ModelConfig) -> list[TensorRule]:
    rules = [TensorRule("tok_embeddings.weight", ("shared.weight",))]
    mlp = (("gate", "wi_0"), ("up", "wi_1"), ("down", "wo")) if c.mlp in ("geglu", "swiglu") else \
        (("up", "wi"), ("down", "wo"))
    for stack, n_blocks in (("encoder", c.n_layer), ("decoder", c.decoder_layers)):
        rules += [TensorRule(f"{stack}_rel_bias.weight",
                             (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)),
                  TensorRule(f"{stack}_norm.weight", (f"{stack}.final_layer_norm.weight",))]
        for i in range(n_blocks):
            h, b = f"{stack}.block.{i}.layer.", f"{stack}_blocks.{i}."
            rules += [TensorRule(f"{b}attn.qkv.weight", tuple(f"{h}0.SelfAttention.{x}.weight" for x in "qkv")),
                      TensorRule(f"{b}attn.out.weight", (f"{h}0.SelfAttention.o.weight",)),
                      TensorRule(f"{b}attn_norm.weight", (f"{h}0.layer_norm.weight",))]
            ff = 1
            if stack == "decoder":
                rules += [TensorRule(f"{b}cross_attn.q.weight", (f"{h}1.EncDecAttention.q.weight",)),
                          TensorRule(f"{b}cross_attn.kv.weight", tuple(f"{h}1.EncDecAttention.{x}.weight" for x in "kv")),
                          TensorRule(f"{b}cross_attn.out.weight", (f"{h}1.EncDecAttention.o.weight",)),
                          TensorRule(f"{b}cross_norm.weight", (f"{h}1.layer_norm.weight",))]
                ff = 2
            rules += [TensorRule(f"{b}mlp.{ours}.weight", (f"{h}{ff}.DenseReluDense.{theirs}.weight",))
                      for ours, theirs in mlp]
            rules.append(TensorRule(f"{b}mlp_norm.weight", (f"{h}{ff}.layer_norm.weight",)))
    if not c.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head.weight",)))
    return rules


def _t5_layout(c: ModelConfig, unrepresentable: Callable[[str, str], UserError]) -> HFArch:
    """T5 is the only HF layout of an encoder-decoder; the original Transformer has no HF class."""
    for key, want, ok in (
        ("pos_encoding", "the T5 layout needs relative (the sinusoidal original Transformer has no HF class)",
         c.pos_encoding == "relative"),
        ("norm", "the T5 layout needs norm=rmsnorm", c.norm == "rmsnorm"),
        ("norm_position", "the T5 layout needs norm_position=pre", c.norm_position == "pre"),
        ("bias", "the T5 layout needs bias=false", not c.bias),
        ("attn_scale", "the T5 layout needs attn_scale=1.0 (unscaled attention)", c.attn_scale == 1.0),
        ("scale_embeddings", "the T5 layout needs scale_embeddings=false", not c.scale_embeddings),
        ("n_kv_head", "the T5 layout needs n_kv_head=n_head (no GQA)", c.kv_heads == c.n_head),
        ("mlp", f"the T5 layout needs mlp={', '.join(_T5_FF_OUT)}", c.mlp in _T5_FF_OUT),
    ):
        if not ok:
            raise unrepresentable(key, want)
    return ARCHITECTURES["t5"]  # (the config rejects Mixture-of-Experts for arch encdec)


_GPT2_DERIVED = re.compile(r"attn\.(masked_)?bias$")
# position/token-type id buffers; the decoder bias older writers saved beside its tie, cls.predictions.bias
_BERT_DERIVED = re.compile(r"embeddings\.(position_ids|token_type_ids)$|^cls\.predictions\.decoder\.bias$")
_ROPE_DERIVED = re.compile(r"rotary_emb\.inv_freq$")
# aliases of `shared` that older writers saved; the cross-attention bias table T5 never uses
_T5_DERIVED = re.compile(r"^(en|de)coder\.embed_tokens\.weight$|"
                         r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$")

ARCHITECTURES: dict[str, HFArch] = {
    "gpt2": HFArch("gpt2", "GPT2LMHeadModel", _gpt2_config_from_hf, _gpt2_config_to_hf, _gpt2_rules,
                   "transformer.", _GPT2_DERIVED),
    "llama": HFArch("llama", "LlamaForCausalLM", _llama_config_from_hf, _llama_config_to_hf,
                    _llama_rules, "model.", _ROPE_DERIVED),
    "mistral": HFArch("mistral", "MistralForCausalLM", _llama_config_from_hf, _mistral_config_to_hf,
                      _llama_rules, "model.", _ROPE_DERIVED),
    "mixtral": HFArch("mixtral", "MixtralForCausalLM", _mixtral_config_from_hf, _mixtral_config_to_hf,
                      _mixtral_rules, "model.", _ROPE_DERIVED),
    "bert": HFArch("bert", _bert_class, _bert_config_from_hf, _bert_config_to_hf, _bert_rules, "bert.",
                   _BERT_DERIVED, head_prefixes=("cls.", "classifier."),
                   tied_head="cls.predictions.decoder.weight", heads_from_weights=_bert_heads_from_weights),
    "t5": HFArch("t5", "T5ForConditionalGeneration", _t5_config_from_hf, _t5_config_to_hf, _t5_rules, "",
                 _T5_DERIVED, heads_from_weights=_t5_head_from_weights),
}


def arch_for(model_type: Any, where: str) -> HFArch:
    if model_type not in ARCHITECTURES:
        raise UserError(f"{where}: model_type={model_type!r} is not supported; allowed: "
                        f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def hf_layout_for(c: ModelConfig) -> HFArch:
    """The HF layout that represents our config exactly, or a UserError naming the field that cannot."""
    def unrepresentable(key: str, want: str) -> UserError:
        return UserError(f"model.{key}={getattr(c, key)!r} has no Hugging Face equivalent for this "
                         f"model; {want}")

    if c.arch == "encdec":
        return _t5_layout(c, unrepresentable)
    if c.attn_scale is not None:
        raise unrepresentable("attn_scale", "the GPT-2, Llama and BERT layouts scale attention by "
                              "1/sqrt(head dim); remove attn_scale")
    if c.arch == "bert":  # post-norm, learned positions and a plain activation: checked by the config
        if c.norm != "layernorm":
            raise unrepresentable("norm", "the BERT layout needs norm=layernorm")
        if not c.bias:
            raise unrepresentable("bias", "the BERT layout needs bias=true")
        if c.mlp not in _BERT_ACT_OUT:
            raise unrepresentable("mlp", "the BERT layout needs mlp=gelu, gelu_tanh or relu")
        if c.kv_heads != c.n_head:
            raise unrepresentable("n_kv_head", "the BERT layout needs n_kv_head=n_head (no GQA)")
        return ARCHITECTURES["bert"]
    if c.moe.num_experts and c.pos_encoding != "rope":
        raise UserError(f"model.moe.num_experts={c.moe.num_experts}: Mixture-of-Experts models convert to "
                        "Hugging Face as Mixtral, which needs pos_encoding=rope (with norm=rmsnorm, "
                        f"mlp=swiglu, bias=false), not {c.pos_encoding}")
    if c.pos_encoding == "learned":  # GPT-2: LayerNorm with bias everywhere
        if c.norm != "layernorm":
            raise unrepresentable("norm", "the GPT-2 layout (pos_encoding=learned) needs norm=layernorm")
        if not c.bias:
            raise unrepresentable("bias", "the GPT-2 layout (pos_encoding=learned) needs bias=true")
        if c.mlp not in _GPT2_ACT_OUT:
            raise unrepresentable("mlp", "the GPT-2 layout needs mlp=gelu_tanh, gelu or relu")
        if c.kv_heads != c.n_head:
            raise unrepresentable("n_kv_head", "the GPT-2 layout needs n_kv_head=n_head (no GQA)")
        return ARCHITECTURES["gpt2"]
    if c.pos_encoding == "rope":  # Llama: RMSNorm, SwiGLU, no biases
        if c.norm != "rmsnorm":
            raise unrepresentable("norm", "the Llama layout (pos_encoding=rope) needs norm=rmsnorm")
        if c.mlp != "swiglu":
            raise unrepresentable("mlp", "the Llama layout (pos_encoding=rope) needs mlp=swiglu")
        if c.bias:
            raise unrepresentable("bias", "the Llama layout (pos_encoding=rope) needs bias=false")
        if c.moe.num_experts:
            return ARCHITECTURES["mixtral"]
        # one layout, two HF classes: a checkpoint converted from Mistral goes back as Mistral
        if c.hf_model_type == "mistral":
            return ARCHITECTURES["mistral"]
        if c.n_embd % c.n_head:  # heads wider than n_embd / n_head are fine; a remainder is not (HF's check)
            raise unrepresentable("n_head", f"the Llama layout needs n_embd={c.n_embd} divisible by n_head "
                                  "(transformers' LlamaConfig checks it)")
        return ARCHITECTURES["llama"]
    raise unrepresentable("pos_encoding", "allowed: learned (GPT-2 layout) or rope (Llama layout)")


# --------------------------------------------------------------------------------------------
# Tensor mapping (both directions, shape-checked)


def _expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our tensors' shapes for config c; a tied alias (lm_head.weight) is left out."""
    from lmforge.models import build_model
    from lmforge.train.checkpoint import tied_aliases

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(ModelConfig.from_dict(c.to_dict()))
    aliases = tied_aliases(model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in aliases}


def _with_base_prefix(arch: HFArch, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names as the task classes write them; files saved from the base model class (the original
    `gpt2` files: "h.0.attn.c_attn.weight"; sentence-transformers' BertModel) lack its prefix."""
    if any(k.startswith(arch.base_prefix) for k in hf_state):
        return dict(hf_state)
    return {k if k.startswith(arch.head_prefixes) else arch.base_prefix + k: v for k, v in hf_state.items()}


def _their_shapes(rule: TensorRule, our_shape: tuple[int, ...], c: ModelConfig) -> list[tuple[int, ...]]:
    if rule.transpose:
        return [tuple(reversed(our_shape))]
    kv = c.kv_heads * c.head_dim
    if len(rule.theirs) == 3:  # q, k, v rows of the fused projection
        return [(c.n_head * c.head_dim, *our_shape[1:]), (kv, *our_shape[1:]), (kv, *our_shape[1:])]
    if len(rule.theirs) == 2:  # k, v rows of a cross-attention's fused kv
        return [(kv, *our_shape[1:]), (kv, *our_shape[1:])]
    return [our_shape]


def state_from_hf(c: ModelConfig, model_type: str, hf_state: dict[str, torch.Tensor],
                  source: str = "HF weights") -> dict[str, torch.Tensor]:
    """Our state dict (a tied lm_head omitted) from an HF one; errors name the HF tensor.

    Optional rule groups the file lacks entirely are left out of the result (the caller
    initializes them); a group present in part is an error like any missing tensor.
    """
    arch = arch_for(model_type, source)
    expected = _expected_shapes(c)
    remaining = _with_base_prefix(arch, hf_state)
    rules = arch.rules(c)
    absent = {r.optional for r in rules if r.optional} - {
        r.optional for r in rules if r.optional and any(t in remaining for t in (*r.theirs, *r.aliases))}
    state: dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.optional in absent:
            continue
        if rule.aliases:
            present = [n for n in (*rule.theirs, *rule.aliases) if n in remaining]
            if present and present[0] != rule.theirs[0]:
                remaining[rule.theirs[0]] = remaining[present[0]]
            for name in rule.aliases:
                remaining.pop(name, None)
        parts = []
        for name, shape in zip(rule.theirs, _their_shapes(rule, expected[rule.ours], c)):
            if name not in remaining:
                raise UserError(f"{source}: missing tensor {name!r}; the weights do not match config.json "
                                "(truncated or from another model)")
            tensor = remaining.pop(name)
            if tuple(tensor.shape) != shape:
                raise UserError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but config.json "
                                f"implies {shape}; the weights and config.json do not match")
            parts.append(tensor)
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        state[rule.ours] = tensor.t().contiguous() if rule.transpose else tensor
    if c.tie_embeddings:
        remaining.pop(arch.tied_head, None)  # a tied head saved twice by older writers
    extra = sorted(k for k in remaining if not arch.derived.search(k))
    if extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} in all); lmforge's "
                        f"{model_type} mapping does not know it (an unsupported variant?)")
    return state


def state_to_hf(c: ModelConfig, state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The HF state dict (HF names and layouts) for our state dict; the inverse of `state_from_hf`.

    Our tensors the HF class cannot hold (BERT's MLM head in a classification model) are left
    out; `dropped_in_hf` names them.
    """
    arch = hf_layout_for(c)
    expected = _expected_shapes(c)
    out: dict[str, torch.Tensor] = {}
    rules = arch.rules(c)
    extra = sorted(set(state) - set(expected) - ({"lm_head.weight"} if c.tie_embeddings else set()))
    if extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]!r}; the checkpoint does not match its config.json")
    for rule in rules:
        if rule.ours not in state:
            raise UserError(f"{source}: missing tensor {rule.ours!r}; the checkpoint is incomplete")
        tensor = state[rule.ours]
        if tuple(tensor.shape) != expected[rule.ours]:
            raise UserError(f"{source}: tensor {rule.ours!r} has shape {tuple(tensor.shape)}, config.json "
                            f"implies {expected[rule.ours]}; the checkpoint is inconsistent")
        if rule.transpose:
            out[rule.theirs[0]] = tensor.t().contiguous()
        elif len(rule.theirs) == 1:
            out[rule.theirs[0]] = tensor.contiguous()
            out.update({name: tensor.clone() for name in rule.aliases})  # copies: safetensors refuses shared memory
        else:
            sizes = [s[0] for s in _their_shapes(rule, expected[rule.ours], c)]
            for name, part in zip(rule.theirs, tensor.split(sizes, dim=0)):
                out[name] = part.contiguous()
    return out


def dropped_in_hf(c: ModelConfig) -> list[str]:
    """Our tensors that the HF layout for config c has no place for (to-hf reports them)."""
    return sorted(set(_expected_shapes(c)) - {rule.ours for rule in hf_layout_for(c).rules(c)})


# --------------------------------------------------------------------------------------------
# Files


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    file = hf_dir / "config.json"
    if not file.is_file():
        raise UserError(f"{file} does not exist; pass a Hugging Face model directory (config.json + weights)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: expected a JSON object")
    return data


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file} is truncated or corrupt ({str(e).splitlines()[0]}); re-download or "
                        "re-save it") from None


def read_hf_weights(hf_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """HF weights from model.safetensors, a sharded index, or pytorch_model.bin (weights_only)."""
    single, index, pickle = (hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json",
                             hf_dir / "pytorch_model.bin")
    if single.is_file():
        return _load_safetensors(single), single
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index}: not a safetensors index (needs a 'weight_map' object)") from None
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (hf_dir / shard).is_file():
                raise UserError(f"{index} names shard {shard!r}, which does not exist in {hf_dir}")
            state.update(_load_safetensors(hf_dir / shard))
        return state, index
    if pickle.is_file():
        try:  # weights_only: a .bin is a pickle, and a pickle may run code; this one may not
            return torch.load(pickle, map_location="cpu", weights_only=True), pickle
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise UserError(f"{pickle} cannot be read safely ({type(e).__name__}); convert it to "
                            "safetensors first") from None
    raise UserError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def check_output(out: Path, inputs: list[tuple[str, Path]], *, overwrite: bool) -> None:
    """Refuse an output dir that would destroy what convert reads, or replace a dir unasked.

    The output is built under a temp name and swapped in whole (`atomic_dir`), so an output that
    is an input, lies inside one or holds one would delete or change that input: always refused.
    An existing non-empty dir is replaced only with `overwrite` (`--overwrite`, as in `pretrain`).
    `inputs` pairs a name for the message ("checkpoint") with the path read.
    """
    target = out.resolve()
    for name, path in inputs:
        source = path.resolve()
        if target == source:
            raise UserError(f"output {out} is the {name} being converted ({path}); converting would replace it; "
                            "pick another output dir")
        if source in target.parents:
            raise UserError(f"output {out} is inside the {name} being converted ({path}); converting would "
                            "change it; pick an output dir outside it")
        if target in source.parents:
            raise UserError(f"output {out} contains the {name} being converted ({path}); converting would "
                            "delete it; pick an output dir outside it")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory; pick another output dir")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; use --overwrite to replace it, or another output dir")


def from_hf(hf_dir: str | Path, out: str | Path, *, overwrite: bool = False,
            require_tokenizer: bool = False) -> dict[str, Any]:
    """Convert an HF model directory into an lmforge checkpoint directory; returns the summary.

    The summary's metrics name the tensors initialized because the file lacked them
    (`initialized`, e.g. BERT's MLM head in a sentence-transformers BertModel). Without a
    tokenizer.json in `hf_dir` the checkpoint holds the weights only: to_hf reads it, but
    generate/eval/embed (`load_pretrained`) do not, so the CLI passes `require_tokenizer`
    and refuses such a dir up front. `out` must not overlap `hf_dir`; a non-empty `out` is
    replaced only with `overwrite` (see `check_output`).
    """
    from lmforge.train.checkpoint import save_checkpoint

    t0 = time.perf_counter()
    hf_dir, out = Path(hf_dir), Path(out)
    hf = read_hf_config(hf_dir)
    where = str(hf_dir / "config.json")
    check_output(out, [("HF model dir", hf_dir)], overwrite=overwrite)
    tokenizer = hf_dir / "tokenizer.json"
    if require_tokenizer and not tokenizer.is_file():
        raise UserError(f"{tokenizer} does not exist; an lmforge checkpoint carries its tokenizer (generate, eval "
                        "and embed need it): write it first, e.g. AutoTokenizer.from_pretrained(dir)"
                        ".save_pretrained(dir)")
    arch = arch_for(hf.get("model_type"), where)
    hf_state, weights_file = read_hf_weights(hf_dir)
    try:
        config = arch.config_from_hf(hf, where)
        if arch.heads_from_weights is not None:
            shapes = {k: tuple(v.shape) for k, v in _with_base_prefix(arch, hf_state).items()}
            arch.heads_from_weights(config, shapes)
    except UserError as e:
        if str(e).startswith(where):
            raise
        # ModelConfig's validation names our key (model.n_head); say which file it came from
        raise UserError(f"{where}: {e} (as converted to lmforge's model config)") from None
    state = state_from_hf(config, arch.model_type, hf_state, str(weights_file))
    initialized = sorted(set(_expected_shapes(config)) - set(state))
    if initialized:  # heads the HF class does not have: freshly initialized, reproducibly
        from lmforge.models import build_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            fresh = build_model(config).state_dict()
        dtype = next(iter(state.values())).dtype
        state.update({k: fresh[k].to(dtype) for k in initialized})
    if tokenizer.is_file():
        from lmforge.tokenizer import Tokenizer

        if Tokenizer.load(tokenizer).vocab_size > config.vocab_size:  # a mismatched tokenizer
            raise UserError(f"{tokenizer} has more tokens than vocab_size={config.vocab_size} in {where}; "
                            "it belongs to another model")
    config.hf_model_type = arch.model_type  # to-hf writes a Mistral back as Mistral, not Llama
    params = sum(t.numel() for t in state.values())
    with atomic_dir(out) as tmp:  # the checkpoint, its metadata and summary appear together
        save_checkpoint(tmp, state, config.to_dict(), tokenizer if tokenizer.is_file() else None, None)
        if arch.model_type == "bert":
            _copy_sentence_transformers_config(hf_dir, tmp)
        summary = write_summary(tmp, "convert-from-hf", config=config.to_dict(), inputs={"hf_dir": hf_dir},
                                metrics={"model_type": arch.model_type, "tensors": len(state), "parameters": params,
                                         "tokenizer": tokenizer.is_file(), "initialized": initialized},
                                wall_time_s=time.perf_counter() - t0)
    return summary


# --------------------------------------------------------------------------------------------
# sentence-transformers metadata (BERT): how `lmforge embed` and SentenceTransformer agree


def _copy_sentence_transformers_config(hf_dir: Path, out: Path) -> None:
    """Keep a sentence-transformers model's max_seq_length (read by `lmforge embed`), and warn
    when its pooling is not the mean pooling `lmforge embed` does."""
    from lmforge.infer.embed import SENTENCE_CONFIG

    st_config = hf_dir / SENTENCE_CONFIG
    if st_config.is_file():
        atomic_write_json(out / SENTENCE_CONFIG, json.loads(st_config.read_text()))
    try:
        modules = json.loads((hf_dir / "modules.json").read_text())
        pooling_dirs = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling")]
        pooling = json.loads((hf_dir / pooling_dirs[0] / "config.json").read_text()) if pooling_dirs else {}
    except (OSError, json.JSONDecodeError, AttributeError, TypeError):
        return  # not a sentence-transformers model, or one without a readable pooling config
    modes = sorted(k.removeprefix("pooling_mode_") for k, v in pooling.items() if k.startswith("pooling_mode_") and v)
    if pooling and modes != ["mean_tokens"]:
        warnings.warn(f"{hf_dir}: this sentence-transformers model pools with {', '.join(modes) or 'nothing'}; "
                      "`lmforge embed` mean-pools, so its vectors will differ", stacklevel=2)


def _write_sentence_transformers_files(tmp: Path, ckpt: Path, c: ModelConfig) -> None:
    """modules.json + pooling config: SentenceTransformer(dir) then computes `lmforge embed`'s
    vectors (the encoder, mean pooling, L2 normalization) with the same max_seq_length."""
    from lmforge.infer.embed import SENTENCE_CONFIG, max_seq_length

    atomic_write_json(tmp / SENTENCE_CONFIG, {"max_seq_length": max_seq_length(ckpt, c), "do_lower_case": False})
    atomic_write_json(tmp / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    (tmp / "1_Pooling").mkdir()
    atomic_write_json(tmp / "1_Pooling" / "config.json", {
        "word_embedding_dimension": c.n_embd, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False})


def _tokenizer_config(tokenizer_file: Path, block_size: int, arch: str = "gpt") -> tuple[dict[str, Any], dict[str, int]]:
    """A minimal tokenizer_config.json for `AutoTokenizer`, and the special ids for config.json.

    BERT's roles are [CLS]/[SEP]/[PAD]/[MASK]/[UNK]; lmforge's tokenizers fill [CLS] with
    <|bos|> and [SEP] with <|eos|>, and the mlm objective added <|mask|>.
    """
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.objectives import MASK, MASK_FALLBACKS

    tok = Tokenizer.load(tokenizer_file)
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size}
    ids: dict[str, int] = {}
    roles = (("cls", "bos_id"), ("sep", "eos_id"), ("pad", "pad_id")) if arch == "bert" else \
        (("bos", "bos_id"), ("eos", "eos_id"), ("pad", "pad_id"))
    for role, getter in roles:
        try:
            token_id = getattr(tok, getter)
        except UserError:  # this tokenizer has no such special token
            continue
        cfg[f"{role}_token"] = tok.id_to_token(token_id)
        ids[f"{role}_token_id"] = token_id
    if arch == "bert":
        for role, names in (("mask", (MASK, *MASK_FALLBACKS)), ("unk", ("<|unk|>", "[UNK]", "<unk>"))):
            found = next((n for n in names if tok.token_to_id(n) is not None), None)
            if found is not None:
                cfg[f"{role}_token"] = found
        # segment ids too: BERT reads them, and a pair is segment 0 then 1 (the post-processor's)
        cfg["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    return cfg, ids


def _bert_tokenizer_json(tokenizer_file: Path) -> str | None:
    """tokenizer.json text that wraps texts as our BERT was trained, or None to copy the file as is.

    lmforge adds [CLS]/[SEP] by id (the mlm objective, `lmforge embed`: `<|bos|> A <|eos|>`, a
    pair `<|bos|> A <|eos|> B <|eos|>` with segment 1 from B on), so its tokenizer.json has no
    post-processor, and `AutoTokenizer` / `SentenceTransformer` would feed the encoder bare text
    (vectors off by cosine ~0.99). This adds BERT's TemplateProcessing with our tokens. A tokenizer
    that already adds special tokens (an HF BERT's, e.g. all-MiniLM-L6-v2's) is left untouched.
    """
    import tokenizers
    from tokenizers import processors

    from lmforge.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    probe = tokenizers.Tokenizer.from_str(backend.to_str())  # without the file's padding/truncation
    probe.no_padding()
    probe.no_truncation()
    if probe.encode("a b", add_special_tokens=True).ids != probe.encode("a b", add_special_tokens=False).ids:
        return None
    tok = Tokenizer.load(tokenizer_file)
    try:
        cls_id, sep_id = tok.bos_id, tok.eos_id
    except UserError:  # no [CLS]/[SEP] to add (not an lmforge tokenizer); `lmforge embed` refuses it too
        return None
    cls, sep = tok.id_to_token(cls_id), tok.id_to_token(sep_id)
    template = processors.TemplateProcessing(single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
                                             special_tokens=[(cls, cls_id), (sep, sep_id)])
    existing = backend.post_processor  # e.g. byte-level offset trimming: keep it, then wrap
    backend.post_processor = template if existing is None else processors.Sequence([existing, template])
    return backend.to_str(pretty=True)


def to_hf(ckpt: str | Path, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Convert an lmforge checkpoint (or a run dir's best one) into an HF directory; returns the summary.

    `out` must not overlap the checkpoint (or the run dir given); a non-empty `out` is replaced
    only with `overwrite` (see `check_output`).
    """
    from lmforge.train.checkpoint import read_model_config, read_weights, resolve_checkpoint

    t0 = time.perf_counter()
    given, out = Path(ckpt), Path(out)
    ckpt = resolve_checkpoint(given)
    check_output(out, [("checkpoint", ckpt)] + ([("run dir", given)] if given.resolve() != ckpt.resolve() else []),
                 overwrite=overwrite)
    config = ModelConfig.from_dict(read_model_config(ckpt))
    if config.vocab_size is None:
        raise UserError(f"{ckpt / 'config.json'}: vocab_size is not set; the checkpoint is incomplete")
    arch = hf_layout_for(config)
    hf_state = state_to_hf(config, read_weights(ckpt), str(ckpt / "model.safetensors"))
    hf_config = {"architectures": [arch.class_for(config)], **arch.config_to_hf(config), "dtype": "float32"}
    tokenizer = ckpt / "tokenizer.json"
    with atomic_dir(out) as tmp:
        if tokenizer.is_file():
            tok_config, special_ids = _tokenizer_config(tokenizer, config.block_size, config.arch)
            hf_config.update(special_ids)
            bert_json = _bert_tokenizer_json(tokenizer) if config.arch == "bert" else None
            if bert_json is None:
                shutil.copyfile(tokenizer, tmp / "tokenizer.json")
            else:
                atomic_write_text(tmp / "tokenizer.json", bert_json)
            atomic_write_json(tmp / "tokenizer_config.json", tok_config)
            if config.arch != "bert":  # an encoder does not generate
                generation = {k: v for k, v in special_ids.items() if k != "pad_token_id"}
                if config.arch == "encdec" and config.decoder_start_token_id is not None:
                    generation["decoder_start_token_id"] = config.decoder_start_token_id
                atomic_write_json(tmp / "generation_config.json", generation)
        if config.arch == "bert":
            _write_sentence_transformers_files(tmp, ckpt, config)
        dtypes = {t.dtype for t in hf_state.values()}
        if len(dtypes) == 1:
            hf_config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config)
        write_summary(tmp, "convert-to-hf", config=config.to_dict(), inputs={"checkpoint": ckpt},
                      metrics={"model_type": arch.model_type, "hf_class": arch.class_for(config),
                               "tensors": len(hf_state), "tokenizer": tokenizer.is_file(),
                               "dropped": dropped_in_hf(config)},
                      wall_time_s=time.perf_counter() - t0)
    return json.loads((out / "summary.json").read_text())
