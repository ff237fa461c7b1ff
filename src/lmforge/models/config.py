"""The model config: one dataclass for every decoder family (GPT-2, Llama-like, ...), LitGPT-style.

A handful of switches (positions, norm, MLP, GQA, bias) select the family instead of a class per
family. The config tree (`lmforge.config`) embeds it as `model.*`; checkpoints store it as
`config.json`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lmforge.errors import UserError


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward (`model.moe.*`); num_experts=0 means a dense MLP."""

    num_experts: int = 0
    top_k: int = 2  # experts per token; their gates are a softmax over the selected logits
    aux_loss_coef: float = 0.01  # load-balancing loss (Switch / Mixtral)
    z_loss_coef: float = 0.001  # router z-loss (ST-MoE)
    capacity_factor: float = 0.0  # 0: no capacity limit (no dropped tokens)


@dataclass
class ModelConfig:
    arch: str = "gpt"  # model family: gpt (decoder-only); more families are being added
    vocab_size: int | None = None  # None: taken from the tokenizer (padded to a multiple of 64)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention; None means = n_head (plain MHA)
    n_embd: int = 128
    block_size: int = 64  # context length
    dropout: float = 0.0
    bias: bool = True  # biases in linear layers and norms
    pos_encoding: str = "learned"  # learned | rope | sinusoidal | relative (T5's bias; arch encdec)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # pre (GPT-2, Llama, T5) | post (original Transformer, BERT)
    mlp: str = "gelu"  # gelu (exact) | gelu_tanh (GPT-2) | relu | swiglu (Llama) | geglu (T5 v1.1)
    mlp_hidden: int | None = None  # None: 4*n_embd for gelu/relu, ~8/3*n_embd (multiple of 64) for swiglu/geglu
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    init_std: float = 0.02
    attn_scale: float | None = None  # attention score scale; None: 1/sqrt(head dim); T5: 1.0
    attn_head_dim: int | None = None  # width of one head; None: n_embd / n_head (T5 v1.1 differs)
    # encoder-decoder (arch encdec; other families ignore these)
    n_decoder_layer: int | None = None  # decoder blocks; None: = n_layer (encoder blocks)
    rel_buckets: int = 32  # pos_encoding relative: T5's relative-position buckets
    rel_max_distance: int = 128  # pos_encoding relative: distances beyond share the last bucket
    decoder_start_token_id: int | None = None  # the decoder's first input (T5: its pad token)
    pad_token_id: int | None = None  # decoder input where labels are -100; None: decoder_start_token_id
    scale_embeddings: bool = False  # token embeddings * sqrt(n_embd) (the original Transformer)
    scale_decoder_outputs: bool = False  # decoder output * n_embd^-0.5 before the LM head (T5 v1.0)
    # BERT (arch bert; other families ignore these)
    type_vocab_size: int = 2  # segment (token_type_ids) embeddings
    nsp_head: bool = False  # next-sentence-prediction head on the pooled [CLS] output
    # a head beside the LM head; 0 = none. BERT: sequence classification on the pooled output; GPT: a
    # per-position score head (`GPT.scores`; a reward model has num_labels=1)
    num_labels: int = 0
    pooler: bool = False  # keep the pooler (dense+tanh on [CLS]) even when no head uses it (HF BertModel)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # The Hugging Face model_type a converted checkpoint came from (`lmforge convert from-hf`);
    # to-hf writes it back where two HF families share one layout (mistral vs llama). No effect on the model.
    hf_model_type: str | None = None
    # Structural pruning (`lmforge prune`, arch gpt): per-layer widths. None: every layer has n_head query
    # heads and ffn_hidden MLP units. layer_heads[i] counts layer i's query heads (with GQA a multiple of
    # n_head / kv_heads: whole kv groups go); layer_mlp_hidden[i] its MLP hidden units.
    layer_heads: list[int] | None = None
    layer_mlp_hidden: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        self.validate()

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.n_embd // self.n_head

    @property
    def decoder_layers(self) -> int:
        """encdec: the decoder's block count."""
        return self.n_decoder_layer or self.n_layer

    @property
    def is_pruned(self) -> bool:
        """Whether layers have their own widths (`layer_heads` / `layer_mlp_hidden`, `lmforge prune`)."""
        return self.layer_heads is not None or self.layer_mlp_hidden is not None

    def heads_in(self, layer: int) -> int:
        """Query heads of block `layer` (n_head unless pruned)."""
        return self.n_head if self.layer_heads is None else self.layer_heads[layer]

    def kv_heads_in(self, layer: int) -> int:
        """Key/value heads of block `layer`: its query heads over the GQA group size."""
        return self.heads_in(layer) // (self.n_head // self.kv_heads)

    def ffn_hidden_in(self, layer: int) -> int:
        """MLP hidden units of block `layer` (ffn_hidden unless pruned)."""
        return self.ffn_hidden if self.layer_mlp_hidden is None else self.layer_mlp_hidden[layer]

    def check_unpruned(self, action: str) -> None:
        """A UserError for stages whose formats cannot express per-layer widths (`action`, e.g. "convert to-gguf")."""
        if self.is_pruned:
            key = "layer_heads" if self.layer_heads is not None else "layer_mlp_hidden"
            raise UserError(f"model.{key}: this checkpoint is structurally pruned (`lmforge prune`, per-layer widths) "
                            f"and {action} cannot express per-layer widths; use an unpruned checkpoint")

    @property
    def ffn_hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp in ("swiglu", "geglu"):
            return 64 * ((int(8 * self.n_embd / 3) + 63) // 64)
        return 4 * self.n_embd

    def validate(self) -> None:
        def bad(key: str, msg: str) -> UserError:
            return UserError(f"model.{key}: {msg}")

        choices = {
            "arch": ("gpt", "bert", "encdec"),
            "pos_encoding": ("learned", "rope", "sinusoidal", "relative"),
            "norm": ("layernorm", "rmsnorm"),
            "norm_position": ("pre", "post"),
            "mlp": ("gelu", "gelu_tanh", "relu", "swiglu", "geglu"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise bad(key, f"{getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise bad(key, f"must be a positive integer, got {getattr(self, key)!r}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size <= 0):
            raise bad("vocab_size", f"must be a positive integer, got {self.vocab_size!r}")
        if self.attn_head_dim is not None and (not isinstance(self.attn_head_dim, int) or self.attn_head_dim <= 0):
            raise bad("attn_head_dim", f"must be a positive integer or null, got {self.attn_head_dim!r}")
        if self.attn_scale is not None and (not isinstance(self.attn_scale, (int, float)) or self.attn_scale <= 0):
            raise bad("attn_scale", f"must be a positive number or null, got {self.attn_scale!r}")
        if self.attn_head_dim is None and self.n_embd % self.n_head:
            raise bad("n_head", f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                      "pick a divisor of n_embd")
        if self.n_head % self.kv_heads:
            raise bad("n_kv_head", f"n_head={self.n_head} is not divisible by n_kv_head={self.kv_heads}; "
                      "pick a divisor of n_head")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise bad("pos_encoding", f"rope needs an even head dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if not isinstance(self.num_labels, int) or self.num_labels < 0:
            raise bad("num_labels", f"must be a non-negative integer, got {self.num_labels!r}")
        self._validate_moe(bad)
        if self.is_pruned:
            self._validate_pruned(bad)
        if self.arch == "bert":
            self._validate_bert(bad)
        if self.arch == "encdec":
            self._validate_encdec(bad)
        elif self.pos_encoding == "relative":
            raise bad("pos_encoding", f"relative (T5's bias) is implemented for arch encdec only, not {self.arch}")

    def _validate_moe(self, bad) -> None:
        m = self.moe
        if not isinstance(m.num_experts, int) or isinstance(m.num_experts, bool) or m.num_experts < 0:
            raise bad("moe.num_experts", f"must be a non-negative integer (0 = dense MLP), got {m.num_experts!r}")
        if not isinstance(m.top_k, int) or isinstance(m.top_k, bool) or m.top_k < 1:
            raise bad("moe.top_k", f"must be a positive integer, got {m.top_k!r}")
        for key in ("aux_loss_coef", "z_loss_coef", "capacity_factor"):
            value = getattr(m, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise bad(f"moe.{key}", f"must be a non-negative number, got {value!r}")
        if m.num_experts == 0:
            return
        if m.top_k > m.num_experts:
            raise bad("moe.top_k", f"{m.top_k} is more than model.moe.num_experts={m.num_experts}; "
                      f"allowed: 1..{m.num_experts}")
        if self.arch != "gpt":  # the other families do not add the router's auxiliary losses yet
            raise bad("moe.num_experts", f"{m.num_experts}: Mixture-of-Experts is implemented for arch gpt, "
                      f"not {self.arch}; set 0")

    def _validate_pruned(self, bad) -> None:
        group = self.n_head // self.kv_heads
        for key, most, step in (("layer_heads", self.n_head, group), ("layer_mlp_hidden", None, 1)):
            widths = getattr(self, key)
            if widths is None:
                continue
            if self.arch != "gpt":
                raise bad(key, f"per-layer widths (a pruned model) are implemented for arch gpt, not {self.arch}; "
                          "set null")
            if not isinstance(widths, list) or len(widths) != self.n_layer:
                raise bad(key, f"must be a list of {self.n_layer} integers (one per layer) or null, got {widths!r}")
            for i, w in enumerate(widths):
                if not isinstance(w, int) or isinstance(w, bool) or w < 1 or (most and w > most) or w % step:
                    allowed = f"1..{most}" if most else ">= 1"
                    extra = f" and a multiple of n_head/n_kv_head={step}" if step > 1 else ""
                    raise bad(f"{key}[{i}]", f"{w!r}: must be an integer in {allowed}{extra}")
        if self.layer_mlp_hidden is not None and self.moe.num_experts:
            raise bad("layer_mlp_hidden", "per-layer MLP widths are not implemented for Mixture-of-Experts; set null")

    def _validate_encdec(self, bad) -> None:
        if self.pos_encoding not in ("sinusoidal", "relative"):
            raise bad("pos_encoding", f"{self.pos_encoding!r}: arch encdec takes sinusoidal (the original "
                      "Transformer) or relative (T5)")
        if self.moe.num_experts:
            raise bad("moe.num_experts", f"{self.moe.num_experts}: Mixture-of-Experts is implemented for arch gpt; "
                      "set 0 for arch encdec")
        if self.n_decoder_layer is not None and (not isinstance(self.n_decoder_layer, int)
                                                 or self.n_decoder_layer <= 0):
            raise bad("n_decoder_layer", f"must be a positive integer or null, got {self.n_decoder_layer!r}")
        if not isinstance(self.rel_buckets, int) or self.rel_buckets < 4:
            raise bad("rel_buckets", f"must be an integer >= 4, got {self.rel_buckets!r}")
        if not isinstance(self.rel_max_distance, int) or self.rel_max_distance <= self.rel_buckets // 2:
            raise bad("rel_max_distance", f"must be an integer > rel_buckets/2 = {self.rel_buckets // 2}, "
                      f"got {self.rel_max_distance!r}")
        for key in ("decoder_start_token_id", "pad_token_id"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise bad(key, f"must be a token id >= 0 or null, got {value!r}")

    @property
    def has_pooler(self) -> bool:
        """bert: whether the model has a pooler (its heads need one, or `pooler` keeps it)."""
        return self.pooler or self.nsp_head or self.num_labels > 0

    def _validate_bert(self, bad) -> None:
        for key in ("type_vocab_size", "num_labels"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(key, f"must be a non-negative integer, got {value!r}")
        if self.type_vocab_size < 1:
            raise bad("type_vocab_size", "must be at least 1 for arch bert (segment A is type 0)")
        # What BERT is built from; other choices would need blocks BERT does not wire (a final
        # norm for pre-norm stacks, positions inside attention for rope).
        if self.norm_position != "post":
            raise bad("norm_position", f"{self.norm_position!r}: arch bert is post-norm; set post")
        if self.pos_encoding != "learned":
            raise bad("pos_encoding", f"{self.pos_encoding!r}: arch bert uses learned positions; set learned")
        if self.mlp not in ("gelu", "gelu_tanh", "relu"):
            raise bad("mlp", f"{self.mlp!r}: arch bert's MLM head needs a plain activation; "
                      "use gelu, gelu_tanh or relu")

    def check_buildable(self) -> None:
        """Validate, and require vocab_size (what every architecture needs before building)."""
        if self.vocab_size is None:
            raise UserError("model.vocab_size is not set; set it or build the model from a tokenizer")
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
