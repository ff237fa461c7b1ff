"""Encoder-decoder Transformer: the original "Attention Is All You Need" model and T5.

An encoder stack reads the source bidirectionally; a decoder stack writes the target causally
and, in every block, cross-attends to the encoder output. Both stacks and the LM head share one
token embedding (Vaswani et al. 2017, section 3.4; T5 likewise). `ModelConfig` switches pick the
family, as for GPT:

- the original Transformer (`transformer-base`): post-norm LayerNorm blocks, sinusoidal positions
  added to embeddings scaled by sqrt(n_embd) (`scale_embeddings`), ReLU, biases;
- T5 (`t5-small`): pre-norm RMSNorm blocks without biases, no absolute positions but a learned
  relative position bias per stack (bidirectional in the encoder, causal in the decoder),
  computed once per forward and added in every layer, as T5 does; unscaled attention
  (`attn_scale: 1.0`); ReLU (v1.0) or gated GELU (v1.1, `mlp: geglu`); final norms; the decoder
  output scaled by n_embd^-0.5 before the tied LM head (v1.0, `scale_decoder_outputs`).

The blocks come from `models/blocks.py`; this file only wires them. It knows nothing about
training: `forward(input_ids, labels, attention_mask=..., decoder_input_ids=...)` -> (logits,
loss) is the call the `span`/`seq2seq` objectives make; `encode` + `decode` with a `KVCache`
(decoder self-attention keys/values, plus the cross-attention keys/values of the encoder output
computed at the first step) serve generation (`lmforge.infer.generate`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.models.blocks import (
    MLP,
    Dropout,
    KVCache,
    RelativePositionBias,
    RMSNorm,
    TransformerBlock,
    init_normal_,
    make_norm,
    sinusoidal_table,
)
from lmforge.models.config import ModelConfig


class EncoderDecoder(nn.Module):
    """Encoder-decoder model. `forward(input_ids, labels)` -> (decoder logits, loss)."""

    # generation encodes the prompt once and decodes from a start token (`lmforge.models.has_capability`)
    capabilities = frozenset({"generate", "encoder_decoder"})

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.check_buildable()
        self.config = c = config
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.n_embd)  # encoder, decoder (and tied head)
        self.relative = c.pos_encoding == "relative"
        if self.relative:
            rel = dict(num_buckets=c.rel_buckets, max_distance=c.rel_max_distance)
            self.encoder_rel_bias = RelativePositionBias(c.n_head, **rel, bidirectional=True)
            self.decoder_rel_bias = RelativePositionBias(c.n_head, **rel, bidirectional=False)
        else:  # sinusoidal: a fixed table, derived from the config, so not saved in checkpoints
            self.register_buffer("pos_table", sinusoidal_table(c.block_size, c.n_embd), persistent=False)
        self.dropout = Dropout(c.dropout)
        self.encoder_blocks = nn.ModuleList(TransformerBlock(c, causal=False) for _ in range(c.n_layer))
        self.decoder_blocks = nn.ModuleList(TransformerBlock(c, causal=True, cross_attention=True)
                                            for _ in range(c.decoder_layers))
        # Pre-norm stacks end un-normalized and need a final norm; post-norm blocks already end
        # in one (the original Transformer has none after the last block).
        pre = c.norm_position == "pre"
        self.encoder_norm = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias) if pre else None
        self.decoder_norm = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias) if pre else None
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.init_weights()

    # ---- init ---------------------------------------------------------------------------

    def init_weights(self) -> None:
        """GPT-2-style init (N(0, init_std), zero biases, unit norms), adapted to the family.

        - Residual-output projections get init_std / sqrt(sublayers): 2 per encoder block, 3
          per decoder block (self, cross, MLP), so the streams' variance does not grow with depth.
        - The shared embedding: a tied output scaled by n_embd^-0.5 (T5) gets std init_std *
          sqrt(n_embd), so its logits start at GPT-2's scale (with init_std they would be 16x
          smaller at width 256, and the t5-small preset learned visibly slower: val 3.56 vs 2.49
          for transformer-base after 150 steps on char-level Shakespeare). T5's own std 1.0 would
          make the model start by predicting its input token: that token's logit is
          sqrt(n_embd) * std^2 against N(0, std^2) for the rest, an initial loss of ~16 nats at
          width 256 instead of ln(vocab) ~ 8.3. Inputs scaled by sqrt(n_embd) (the paper) keep
          init_std: the sinusoidal positions (amplitude 1) then still dominate them at init.
        - Unscaled attention (`attn_scale`): the query projection starts scaled by the factor
          the scores lack (head_dim^-0.5 / attn_scale), so the scores at init are distributed as
          in scaled attention (T5's init does the same through its q std).
        Also recomputes the sinusoidal table (a `to_empty()` model is fully initialized by this).
        """
        c = self.config
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.LayerNorm, RMSNorm)):
                    module.reset_parameters()
            if not self.relative:
                self.pos_table.copy_(sinusoidal_table(c.block_size, c.n_embd))
        self.apply(lambda m: init_normal_(m, c.init_std))
        if self.relative:
            for bias in (self.encoder_rel_bias, self.decoder_rel_bias):
                nn.init.normal_(bias.weight, mean=0.0, std=c.init_std)
        if c.scale_decoder_outputs and c.tie_embeddings:
            nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=c.init_std * math.sqrt(c.n_embd))
        for blocks, sublayers in ((self.encoder_blocks, 2), (self.decoder_blocks, 3)):
            residual_std = c.init_std / math.sqrt(sublayers * len(blocks))
            for block in blocks:
                for attn in (block.attn, block.cross_attn):
                    if attn is None:
                        continue
                    nn.init.normal_(attn.out.weight, mean=0.0, std=residual_std)
                    if c.attn_scale is not None:
                        q = attn.q.weight if attn.cross else attn.qkv.weight[: attn.split_sizes[0]]
                        with torch.no_grad():
                            q.mul_(c.head_dim**-0.5 / c.attn_scale)
                for mlp in block.mlp.modules():  # the MLP (or each expert, were it a Mixture-of-Experts)
                    if isinstance(mlp, MLP):
                        nn.init.normal_(mlp.down.weight, mean=0.0, std=residual_std)

    # ---- forward ------------------------------------------------------------------------

    def _embed(self, ids: Tensor, start: int = 0, positions: Tensor | None = None) -> Tensor:
        """Token embeddings (+ sinusoidal positions start.., or the (B, T) `positions` of a KV cache
        whose rows differ in length)."""
        x = self.tok_embeddings(ids)
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.n_embd)
        if not self.relative:
            end = start + ids.shape[1]
            if end > self.config.block_size:
                raise ValueError(f"sequence of {end} tokens is longer than the sinusoidal position table "
                                 f"(block_size={self.config.block_size})")
            x = x + self.pos_table[slice(start, end) if positions is None else positions].to(x.dtype)
        return self.dropout(x)

    @staticmethod
    def padding_mask(attention_mask: Tensor | None) -> Tensor | None:
        """HF attention_mask (B, S), 1 = real token -> bool (B, 1, 1, S), True = may attend."""
        return None if attention_mask is None else attention_mask.bool()[:, None, None, :]

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The encoder output (B, S, n_embd) for source ids (B, S); attention_mask marks real tokens."""
        x = self._embed(input_ids)
        mask, bias = self.padding_mask(attention_mask), None
        if self.relative:
            S = input_ids.shape[1]
            bias = self.encoder_rel_bias(S, S)  # once per forward, shared by every layer
            if mask is not None:  # fold the padding into the bias once, not in every layer
                bias, mask = torch.where(mask, bias, float("-inf")), None
        for layer, block in enumerate(self.encoder_blocks):
            x = block(x, attn_mask=mask, position_bias=bias, layer=layer)
        return self.encoder_norm(x) if self.encoder_norm is not None else x

    def decode(self, decoder_input_ids: Tensor, encoder_output: Tensor | None, *,
               attention_mask: Tensor | None = None, kv_cache: KVCache | None = None) -> Tensor:
        """Logits (B, T, vocab) for decoder ids (B, T) attending to `encoder_output` (B, S, n_embd).

        attention_mask is the encoder's (B, S) padding mask. With a `kv_cache`, the ids continue
        the cached decoder sequence (positions start at each row's cached length) and the cache
        advances by T; the encoder output's cross keys/values are computed at the first call
        and reused after (`encoder_output` may then be None, and without attention_mask the
        cache's `source_mask` masks each row's padding).
        """
        T = decoder_input_ids.shape[1]
        start, pos, end = 0, None, T  # decoder positions start.., or per row (B, T), up to end
        if kv_cache is not None:
            start, pos, end = kv_cache.past, kv_cache.positions(T, decoder_input_ids.device), kv_cache.longest + T
        x = self._embed(decoder_input_ids, end - T if pos is not None else start, pos)
        bias = (self.decoder_rel_bias(T, end, offset=start if pos is None else pos[:, 0])
                if self.relative else None)
        self_mask = kv_cache.attention_mask(T, x.device) if kv_cache is not None else None
        filled = kv_cache is not None and kv_cache.has_cross()
        context = None if filled else encoder_output  # the cached cross keys/values when filled
        context_mask = self.padding_mask(attention_mask)
        if context_mask is None and filled:
            context_mask = kv_cache.source_mask(x.device)
        for layer, block in enumerate(self.decoder_blocks):
            x = block(x, attn_mask=self_mask, position_bias=bias, kv_cache=kv_cache, layer=layer,
                      context=context, context_mask=context_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        if self.config.scale_decoder_outputs:
            x = x * self.config.n_embd**-0.5
        return self.lm_head(x)

    @property
    def decoder_start_id(self) -> int:
        start = self.config.decoder_start_token_id
        if start is None:
            raise UserError("model.decoder_start_token_id is not set; set it to the tokenizer's pad id "
                            "(T5's convention) or pass decoder_input_ids")
        return start

    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder inputs for `labels` (HF T5's `_shift_right`): the start token, then labels[:-1],
        with -100 replaced by `pad_token_id` (default: the start token, which is T5's pad)."""
        start = self.decoder_start_id
        pad = self.config.pad_token_id
        shifted = torch.full_like(labels, start)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, start if pad is None else pad)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, *,
                attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Decoder logits (B, T, vocab) and, with labels (B, T), the mean cross-entropy.

        decoder_input_ids default to `shift_right(labels)` (HF T5 behaviour); the loss is in fp32
        over labels that are not -100. attention_mask (B, S): 1 = real source token, 0 = padding.
        """
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels (from which they are built)")
            decoder_input_ids = self.shift_right(labels)
        logits = self.decode(decoder_input_ids, self.encode(input_ids, attention_mask),
                             attention_mask=attention_mask)
        loss = None
        if labels is not None:
            # fp32: a bf16 log-softmax over a large vocabulary loses the differences between logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return logits, loss

    def new_kv_cache(self, batch_size: int, max_len: int | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty decoder cache (self-attention keys/values of `batch_size` rows, each with its own
        length, up to `max_len`, default block_size, and every decoder layer's cross-attention
        keys/values of each row's encoder output)."""
        c = self.config
        max_len = min(max_len or c.block_size, c.block_size)
        return KVCache(c.decoder_layers, batch_size, c.kv_heads, c.head_dim, max_len, device, dtype)

    # ---- sizes --------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Exact parameter count; a tied weight counts once.

        exclude_embeddings drops the lookup tables that cost no matmul FLOPs: the token embedding
        (with the tied LM head, the same tensor) and the relative-position bias tables.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
            if self.relative:
                n -= self.encoder_rel_bias.weight.numel() + self.decoder_rel_bias.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, decoder_len: int | None = None) -> float:
        """Training FLOPs per source token (forward + backward), GPT's definition applied per stack.

        One example is `seq_len` source tokens (default block_size; the loop counts these as the
        step's tokens) and `decoder_len` target tokens (default seq_len; span corruption's
        targets are about a quarter of that: the training loop passes the objective's lengths,
        `Objective.example_lengths`). Every
        matmul weight costs 6 FLOPs per token it is applied to: encoder weights and the cross-
        attention key/value projections per source token, the other decoder weights and the LM
        head per target token. Attention's QK^T and AV add 12 * width * keys per query per
        layer (self-attention in both stacks, cross-attention against the seq_len source keys).
        """
        c = self.config
        S = c.block_size if seq_len is None else seq_len
        T = S if decoder_len is None else decoder_len
        width = c.n_head * c.head_dim

        def params(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        encoder = sum(params(b) for b in self.encoder_blocks) + (params(self.encoder_norm) if self.encoder_norm else 0)
        cross_kv = sum(params(b.cross_attn.kv) for b in self.decoder_blocks)
        decoder = (sum(params(b) for b in self.decoder_blocks) - cross_kv
                   + (params(self.decoder_norm) if self.decoder_norm else 0) + self.lm_head.weight.numel())
        matmul = 6.0 * ((encoder + cross_kv) * S + decoder * T)
        attention = 12.0 * width * (c.n_layer * S * S + c.decoder_layers * (T * T + T * S))
        return (matmul + attention) / S
