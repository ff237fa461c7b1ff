"""The supported HF layouts (`ARCHITECTURES`) and how one is chosen in each direction.

`arch_for` gives the layout an HF config.json's `model_type` names (from-hf); `hf_layout_for`
the one layout that represents our config exactly (to-hf), or a `UserError` naming the model
field that has no HF equivalent. Each layout also names the HF tensors that are derived buffers,
not weights (older files saved them), which from-hf skips.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from lmforge.errors import UserError
from lmforge.export.hf.decoders import (
    GPT2_ACT_OUT,
    gpt2_config_from_hf,
    gpt2_config_to_hf,
    gpt2_rules,
    llama_config_from_hf,
    llama_config_to_hf,
    llama_rules,
    mistral_config_to_hf,
    mixtral_config_from_hf,
    mixtral_config_to_hf,
    mixtral_rules,
)
from lmforge.export.hf.encoders import (
    BERT_ACT_OUT,
    T5_FF_OUT,
    bert_class,
    bert_config_from_hf,
    bert_config_to_hf,
    bert_heads_from_weights,
    bert_rules,
    t5_config_from_hf,
    t5_config_to_hf,
    t5_head_from_weights,
    t5_rules,
)
from lmforge.export.hf.rules import HFArch
from lmforge.models.config import ModelConfig

_GPT2_DERIVED = re.compile(r"attn\.(masked_)?bias$")
# position/token-type id buffers; the decoder bias older writers saved beside its tie, cls.predictions.bias
_BERT_DERIVED = re.compile(r"embeddings\.(position_ids|token_type_ids)$|^cls\.predictions\.decoder\.bias$")
_ROPE_DERIVED = re.compile(r"rotary_emb\.inv_freq$")
# aliases of `shared` that older writers saved; the cross-attention bias table T5 never uses
_T5_DERIVED = re.compile(r"^(en|de)coder\.embed_tokens\.weight$|"
                         r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$")

ARCHITECTURES: dict[str, HFArch] = {
    "gpt2": HFArch("gpt2", "GPT2LMHeadModel", gpt2_config_from_hf, gpt2_config_to_hf, gpt2_rules,
                   "transformer.", _GPT2_DERIVED),
    "llama": HFArch("llama", "LlamaForCausalLM", llama_config_from_hf, llama_config_to_hf,
                    llama_rules, "model.", _ROPE_DERIVED),
    "mistral": HFArch("mistral", "MistralForCausalLM", llama_config_from_hf, mistral_config_to_hf,
                      llama_rules, "model.", _ROPE_DERIVED),
    "mixtral": HFArch("mixtral", "MixtralForCausalLM", mixtral_config_from_hf, mixtral_config_to_hf,
                      mixtral_rules, "model.", _ROPE_DERIVED),
    "bert": HFArch("bert", bert_class, bert_config_from_hf, bert_config_to_hf, bert_rules, "bert.",
                   _BERT_DERIVED, head_prefixes=("cls.", "classifier."),
                   tied_head="cls.predictions.decoder.weight", heads_from_weights=bert_heads_from_weights),
    "t5": HFArch("t5", "T5ForConditionalGeneration", t5_config_from_hf, t5_config_to_hf, t5_rules, "",
                 _T5_DERIVED, heads_from_weights=t5_head_from_weights),
}


def arch_for(model_type: Any, where: str) -> HFArch:
    if model_type not in ARCHITECTURES:
        raise UserError(f"{where}: model_type={model_type!r} is not supported; allowed: "
                        f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


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
        ("mlp", f"the T5 layout needs mlp={', '.join(T5_FF_OUT)}", c.mlp in T5_FF_OUT),
    ):
        if not ok:
            raise unrepresentable(key, want)
    return ARCHITECTURES["t5"]  # (the config rejects Mixture-of-Experts for arch encdec)


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
    def layernorm_layout(name: str, activations: object, allowed: str) -> None:
        """BERT and GPT-2: LayerNorm with biases everywhere, a plain activation, no GQA."""
        if c.norm != "layernorm":
            raise unrepresentable("norm", f"the {name} needs norm=layernorm")
        if not c.bias:
            raise unrepresentable("bias", f"the {name} needs bias=true")
        if c.mlp not in activations:
            raise unrepresentable("mlp", f"the {name} needs mlp={allowed}")
        if c.kv_heads != c.n_head:
            raise unrepresentable("n_kv_head", f"the {name} needs n_kv_head=n_head (no GQA)")
        if c.head_dim * c.n_head != c.n_embd:
            raise unrepresentable("attn_head_dim", f"the {name} needs heads of n_embd / n_head = "
                                  f"{c.n_embd / c.n_head:g} wide; remove attn_head_dim")

    if c.arch == "bert":  # post-norm, learned positions and a plain activation: checked by the config
        layernorm_layout("BERT layout", BERT_ACT_OUT, "gelu, gelu_tanh or relu")
        return ARCHITECTURES["bert"]
    if c.moe.num_experts and c.pos_encoding != "rope":
        raise UserError(f"model.moe.num_experts={c.moe.num_experts}: Mixture-of-Experts models convert to "
                        "Hugging Face as Mixtral, which needs pos_encoding=rope (with norm=rmsnorm, "
                        f"mlp=swiglu, bias=false), not {c.pos_encoding}")
    if c.pos_encoding == "learned":  # GPT-2
        layernorm_layout("GPT-2 layout (pos_encoding=learned)", GPT2_ACT_OUT, "gelu_tanh, gelu or relu")
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
