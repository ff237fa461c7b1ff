"""GPT: a plain decoder-only Transformer (pre-norm blocks, final norm, LM head).

One class covers GPT-2-style (learned positions, LayerNorm, GELU, biases, tied embeddings)
and Llama-style (RoPE, RMSNorm, SwiGLU, no biases, GQA, untied) models via `ModelConfig`
switches. The file knows nothing about training or parallelism: it maps token ids to logits
(and a loss when targets are given), optionally through a KV cache for generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.models.blocks import (
    MLP,
    Dropout,
    KVCache,
    RMSNorm,
    TransformerBlock,
    init_normal_,
    make_norm,
    rope_tables,
    scaled_init_std,
    sinusoidal_table,
)
from lmforge.models.config import ModelConfig
from lmforge.models.moe import moe_layers, moe_losses, moe_stats


class GPT(nn.Module):
    """Decoder-only language model. `forward(idx, targets)` -> (logits, loss)."""

    capabilities = frozenset({"generate"})  # see `lmforge.models.has_capability`

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.check_buildable()
        self.config = c = config
        if c.moe.num_experts:
            self.capabilities = self.capabilities | {"moe_stats"}
        if c.num_labels:
            self.capabilities = self.capabilities | {"score"}
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_embeddings = (nn.Embedding(c.block_size, c.n_embd)
                               if c.pos_encoding == "learned" else None)
        # Fixed tables are non-persistent buffers: derived from the config, so they are not
        # saved in checkpoints (and HF-converted state dicts need not provide them).
        if c.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(c.block_size, c.n_embd),
                                 persistent=False)
        if c.pos_encoding == "rope":
            cos, sin = rope_tables(c.block_size, c.head_dim, c.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.dropout = Dropout(c.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(c, causal=True, layer=i) for i in range(c.n_layer))
        self.norm = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            # Input and output embeddings share one matrix (Press & Wolf 2017): fewer
            # parameters and, at small scale, slightly better perplexity.
            self.lm_head.weight = self.tok_embeddings.weight
        # model.num_labels > 0: a scalar (or per-class) head on the final normed hidden states, read by
        # `scores` (a reward model: num_labels=1, its reward is the score at a sequence's last token)
        self.score = nn.Linear(c.n_embd, c.num_labels, bias=False) if c.num_labels else None
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases, unit norms, scaled residual projections.

        Also recomputes the fixed position tables, so a model built on the meta device and
        materialized with `to_empty()` (FSDP2 flows) is fully initialized by calling this.
        """
        c = self.config
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.LayerNorm, RMSNorm)):
                    module.reset_parameters()
            if c.pos_encoding == "sinusoidal":
                self.pos_table.copy_(sinusoidal_table(c.block_size, c.n_embd))
            if c.pos_encoding == "rope":
                cos, sin = rope_tables(c.block_size, c.head_dim, c.rope_theta)
                self.rope_cos.copy_(cos)
                self.rope_sin.copy_(sin)
        std = c.init_std
        self.apply(lambda m: init_normal_(m, std))
        # The projections that write into the residual stream get a smaller std so the
        # stream's variance at init does not grow with depth (see `scaled_init_std`).
        residual_std = scaled_init_std(std, c.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, mean=0.0, std=residual_std)
            for mlp in block.mlp.modules():  # the MLP, or every expert of an MoE
                if isinstance(mlp, MLP):
                    nn.init.normal_(mlp.down.weight, mean=0.0, std=residual_std)

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, kv_cache: KVCache | None = None,
                position_ids: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) for token ids idx (B, T), and the mean loss if targets given.

        The loss is cross-entropy in fp32 over positions whose target is not -100; an MoE model
        in training mode adds its router losses (`moe.aux_loss_coef` * load balancing +
        `moe.z_loss_coef` * z-loss, see `lmforge.models.moe`), so eval losses stay pure
        cross-entropy, comparable with dense models. With a
        `kv_cache`, idx continues the cached sequence: its positions start at
        each row's cached length, its keys/values are appended and the cache advances by T; rows
        of different lengths (an engine's batch, `lmforge.infer.engine`) get their own positions
        and a mask that hides what lies past each row's end.
        Packed training rows (several examples in one row, `lmforge.posttrain.packing`): `position_ids`
        (B, T) restart at 0 for each example and `doc_ids` (B, T) number the examples of a row; a
        position attends only to earlier positions of its own example, so an example's logits are
        the same packed or alone.
        Raises ValueError (internal misuse, not a user error) if the sequence would be longer
        than `block_size`.
        """
        B, T = idx.shape
        start, pos = 0, position_ids  # positions start..start+T, or per row (B, T) (cache rows, packed rows)
        if kv_cache is not None:
            start, pos = kv_cache.past, kv_cache.positions(T, idx.device)
        end = (kv_cache.longest if kv_cache is not None else 0) + T
        if end > self.config.block_size:
            raise ValueError(f"sequence of {end} tokens is longer than the context "
                             f"block_size={self.config.block_size}")
        x = self.tok_embeddings(idx)
        where = slice(start, start + T) if pos is None else pos
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings.weight[where]
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.pos_table[where].to(x.dtype)
        rope = None
        if self.config.pos_encoding == "rope":
            rope = (self.rope_cos[where], self.rope_sin[where])
            if pos is not None:  # (B, T, head_dim) -> (B, 1, T, head_dim), broadcast over heads
                rope = (rope[0][:, None], rope[1][:, None])
        attn_mask = kv_cache.attention_mask(T, idx.device) if kv_cache is not None else None
        if doc_ids is not None:  # block-diagonal: each example sees only itself (Attention adds the causal part)
            attn_mask = (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
        x = self.dropout(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope=rope, attn_mask=attn_mask, kv_cache=kv_cache, layer=layer)
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            # fp32 upcast: a bf16 log-softmax over a large vocabulary loses the small
            # differences between logits that the gradient is made of.
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T),
                                   ignore_index=-100)
        # (a dense model skips the walk over its modules: ~10% of a CPU decode step's Python time)
        router_losses = moe_losses(self) if self.config.moe.num_experts else None  # also clears them
        if loss is not None and router_losses is not None and self.training:
            aux, z = router_losses
            loss = loss + self.config.moe.aux_loss_coef * aux + self.config.moe.z_loss_coef * z
        return logits, loss

    def scores(self, idx: Tensor, *, position_ids: Tensor | None = None,
               doc_ids: Tensor | None = None) -> Tensor:
        """Per-position head outputs (B, T, num_labels): the final hidden states, normed, through
        `score` (model.num_labels > 0). A sequence's score is the one at its last token (padding
        to the right never changes it: attention is causal).

        The normed hidden states are taken from `forward` (a hook on `norm`), so every forward
        path (positions, packed rows, MoE) is the one the LM uses; its logits are discarded.
        """
        if self.score is None:
            raise ValueError("this model has no score head (model.num_labels is 0)")
        hidden: list[Tensor] = []
        handle = self.norm.register_forward_hook(lambda module, args, out: hidden.append(out))
        try:
            self(idx, position_ids=position_ids, doc_ids=doc_ids)
        finally:
            handle.remove()
        return self.score(hidden[-1])

    def moe_stats(self) -> dict[str, object] | None:
        """Expert utilization etc. of the last forward (`lmforge.models.moe.moe_stats`); None if dense."""
        return moe_stats(self)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for `batch_size` sequences (rows, each with its own length) of up to
        `max_len` tokens (default block_size).

        device/dtype default to those of the keys computed in the first forward pass (so the
        model's device, and bf16 under bf16 autocast).
        """
        c = self.config
        max_len = min(max_len or c.block_size, c.block_size)
        heads = [c.kv_heads_in(i) for i in range(c.n_layer)] if c.layer_heads is not None else c.kv_heads
        return KVCache(c.n_layer, batch_size, heads, c.head_dim, max_len, device, dtype)

    def num_params(self, exclude_embeddings: bool = False, active: bool = False) -> int:
        """Exact parameter count; a tied weight counts once.

        exclude_embeddings drops the token embedding (and with it the tied LM head, which is
        the same tensor) and learned position embeddings: the lookup tables that cost no
        matmul FLOPs. active counts what one token uses: an MoE layer's top_k experts (and its
        router), not all of them.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared ones once
        if active:
            n -= sum(layer.inactive_params() for layer in moe_layers(self))
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
            if self.pos_embeddings is not None:
                n -= self.pos_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT estimate_mfu.

        6 * N + 12 * n_layer * n_embd * seq_len, where
        - N counts every parameter that takes part in a token's matmuls: all non-embedding
          parameters (of an MoE layer, the router and top_k experts, not all of them)
          plus the LM head (vocab * n_embd) even when it is tied to the token embedding, since
          the output projection is a real matmul while the embedding lookup is not. (Norm
          weights and biases are included too; they are a rounding error.) Each such weight
          costs 2 FLOPs per token forward and 4 backward.
        - 12 * n_layer * n_embd * seq_len is attention's QK^T and AV (2 matmuls * 2 FLOPs *
          3 for fwd+bwd, over n_head * head_dim = n_embd) against seq_len keys, counted as
          if unmasked, as PaLM does (a causal kernel does about half that work).
        seq_len defaults to block_size.
        """
        c = self.config
        n = self.num_params(exclude_embeddings=True, active=True)
        if c.tie_embeddings:
            n += self.lm_head.weight.numel()
        seq_len = c.block_size if seq_len is None else seq_len
        width = c.n_layer * c.n_embd  # attention's q/k width summed over layers; a pruned model's own
        if c.layer_heads is not None:
            width = sum(c.layer_heads) * c.head_dim
        return 6.0 * n + 12.0 * width * seq_len
