"""HF mappings of the families with an encoder: BERT (encoder only) and T5 (encoder-decoder).

As in `decoders.py`, each family is a config.json -> `ModelConfig` reader, its inverse and a
`TensorRule` table; `registry.py` assembles them into `HFArch`es.

Heads differ between the HF classes of one family. Which ones a BERT checkpoint has is read
from its weights (pooler, NSP, classifier); a head lmforge's model always has but the file
lacks (BERT's MLM head in a sentence-transformers `BertModel`) is an *optional* rule group:
from-hf initializes it and reports it, and to-hf reports what an HF class cannot hold.
"""

from __future__ import annotations

from typing import Any

from lmforge.export.hf.rules import TensorRule, need_key, only_value
from lmforge.models.config import ModelConfig

# --------------------------------------------------------------------------------------------
# BERT (post-norm encoder; q/k/v fused into our qkv; heads by HF class)

_BERT_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
BERT_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_MLM_HEAD = "MLM head (cls.predictions.*)"


def bert_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    act = only_value(hf, "hidden_act", "gelu", tuple(_BERT_ACT), where)
    only_value(hf, "position_embedding_type", "absolute", ("absolute",), where)
    only_value(hf, "is_decoder", False, (False,), where)
    only_value(hf, "add_cross_attention", False, (False,), where)
    return ModelConfig(
        arch="bert", vocab_size=need_key(hf, "vocab_size", where), n_layer=need_key(hf, "num_hidden_layers", where),
        n_head=need_key(hf, "num_attention_heads", where), n_embd=need_key(hf, "hidden_size", where),
        block_size=need_key(hf, "max_position_embeddings", where),
        dropout=float(hf.get("hidden_dropout_prob", 0.1)), bias=True, pos_encoding="learned",
        norm="layernorm", norm_eps=float(hf.get("layer_norm_eps", 1e-12)), norm_position="post",
        mlp=_BERT_ACT[act], mlp_hidden=need_key(hf, "intermediate_size", where),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), init_std=float(hf.get("initializer_range", 0.02)),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
    )


def bert_heads_from_weights(c: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    c.pooler = "bert.pooler.dense.weight" in shapes
    c.nsp_head = "cls.seq_relationship.weight" in shapes
    c.num_labels = shapes["classifier.weight"][0] if "classifier.weight" in shapes else 0
    c.validate()


def bert_class(c: ModelConfig) -> str:
    if c.num_labels:
        return "BertForSequenceClassification"
    return "BertForPreTraining" if c.nsp_head else "BertForMaskedLM"


def bert_config_to_hf(c: ModelConfig) -> dict[str, Any]:
    out = {
        "model_type": "bert", "vocab_size": c.vocab_size, "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "intermediate_size": c.ffn_hidden,
        "hidden_act": BERT_ACT_OUT[c.mlp], "hidden_dropout_prob": c.dropout,
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


def bert_rules(c: ModelConfig) -> list[TensorRule]:
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
T5_FF_OUT = {ours: theirs for theirs, ours in _T5_FF.items()}


def t5_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    ff = only_value(hf, "feed_forward_proj", "relu", tuple(_T5_FF), where)
    only_value(hf, "is_encoder_decoder", True, (True,), where)
    n_embd, n_head = need_key(hf, "d_model", where), need_key(hf, "num_heads", where)
    head_dim = need_key(hf, "d_kv", where)
    n_layer = need_key(hf, "num_layers", where)
    n_decoder_layer = hf.get("num_decoder_layers") or n_layer
    tied = hf.get("tie_word_embeddings", True) is not False
    scale = hf.get("scale_decoder_outputs")
    return ModelConfig(
        arch="encdec", vocab_size=need_key(hf, "vocab_size", where), n_layer=n_layer,
        n_decoder_layer=None if n_decoder_layer == n_layer else n_decoder_layer, n_head=n_head, n_embd=n_embd,
        attn_head_dim=None if head_dim * n_head == n_embd else head_dim,
        block_size=int(hf.get("n_positions", 512)), dropout=float(hf.get("dropout_rate", 0.1)), bias=False,
        pos_encoding="relative", norm="rmsnorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        norm_position="pre", mlp=_T5_FF[ff], mlp_hidden=need_key(hf, "d_ff", where), tie_embeddings=tied,
        attn_scale=1.0, rel_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        rel_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
        pad_token_id=hf.get("pad_token_id", 0), scale_decoder_outputs=tied if scale is None else bool(scale),
    )


def t5_head_from_weights(c: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    c.tie_embeddings = "lm_head.weight" not in shapes  # transformers 5 writes a tied head once


def t5_config_to_hf(c: ModelConfig) -> dict[str, Any]:
    out = {
        "model_type": "t5", "vocab_size": c.vocab_size, "d_model": c.n_embd, "d_kv": c.head_dim,
        "d_ff": c.ffn_hidden, "num_layers": c.n_layer, "num_decoder_layers": c.decoder_layers,
        "num_heads": c.n_head, "relative_attention_num_buckets": c.rel_buckets,
        "relative_attention_max_distance": c.rel_max_distance, "dropout_rate": c.dropout,
        "layer_norm_epsilon": c.norm_eps, "initializer_factor": 1.0, "feed_forward_proj": T5_FF_OUT[c.mlp],
        "is_encoder_decoder": True, "tie_word_embeddings": c.tie_embeddings,
        "scale_decoder_outputs": c.scale_decoder_outputs, "n_positions": c.block_size,
    }
    for key in ("decoder_start_token_id", "pad_token_id"):  # the tokenizer's pad, when there is one, wins
        if getattr(c, key) is not None:
            out[key] = getattr(c, key)
    return out


def t5_rules(c: ModelConfig) -> list[TensorRule]:
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
                          TensorRule(f"{b}cross_attn.kv.weight",
                                     tuple(f"{h}1.EncDecAttention.{x}.weight" for x in "kv")),
                          TensorRule(f"{b}cross_attn.out.weight", (f"{h}1.EncDecAttention.o.weight",)),
                          TensorRule(f"{b}cross_norm.weight", (f"{h}1.layer_norm.weight",))]
                ff = 2
            rules += [TensorRule(f"{b}mlp.{ours}.weight", (f"{h}{ff}.DenseReluDense.{theirs}.weight",))
                      for ours, theirs in mlp]
            rules.append(TensorRule(f"{b}mlp_norm.weight", (f"{h}{ff}.layer_norm.weight",)))
    if not c.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head.weight",)))
    return rules
