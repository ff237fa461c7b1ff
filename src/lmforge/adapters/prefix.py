"""Prefix tuning (Li & Liang 2021): trained key/value vectors that every self-attention layer's
queries attend to before the sequence's own keys.

`PrefixAttention` is an `Attention` subclass swapped in for each self-attention module
(`apply_prefix`): the qkv/out Linears and their tensor names stay, and it adds
`prefix_keys`/`prefix_values` (kv_heads, prefix_len, head_dim). Its forward computes q, k, v (and
the KV cache update) as `Attention` does, then prepends the prefix to the keys and values, with a
mask that lets every query see every prefix position and the rest as before: causal, packed rows
(`doc_ids`: each example of a packed row sees the prefix), KV-cache rows of different lengths,
BERT's padding, T5's position bias (0 on the prefix). The prefix never enters the KV cache and
takes no positions: the sequence's tokens keep positions 0, 1, ..., so `block_size` is not
consumed and a base model's position handling is untouched; RoPE is not applied to the prefix
keys (they are learned as they are used, as in `peft`'s prefix tuning). Deviation from the paper:
no MLP reparameterization of the prefix (peft's default too); instead the prefix starts from real
activations — the keys/values the model computes for `prefix_len` random tokens — which the paper
reports as the better initialization. Objectives and data know nothing of it.

The same module serves prompt tuning (`lmforge.adapters.prompt`): there the prefix of each layer
comes from a `source` (the soft prompt's keys/values at that layer), not from parameters.
`recording=True` makes the module store the (k, v) it computed in `recorded` and attend without
a prefix (how the prompt's and the initial prefix's keys/values are obtained).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.adapters.lora import set_submodule
from lmforge.errors import UserError
from lmforge.models.bert import BERT
from lmforge.models.blocks import Attention, KVCache, apply_rope
from lmforge.models.encdec import EncoderDecoder


class PrefixAttention(Attention):
    """Self-attention with a trained key/value prefix (build with `from_attention`)."""

    @classmethod
    def from_attention(cls, attn: Attention) -> PrefixAttention:
        """A PrefixAttention holding `attn`'s own submodules and settings (no copy), no prefix yet."""
        if attn.cross:
            raise ValueError("prefix tuning applies to self-attention, not cross-attention")
        new = cls.__new__(cls)
        new.__dict__.update(attn.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):  # its own containers, same entries
            new.__dict__[key] = dict(attn.__dict__[key])
        new.disabled, new.recording, new.recorded = False, False, None
        object.__setattr__(new, "source", None)  # not a submodule: shared by every layer
        return new

    def set_prefix(self, keys: Tensor, values: Tensor) -> None:
        """Trainable prefix keys/values, each (kv_heads, prefix_len, head_dim)."""
        self.prefix_keys = nn.Parameter(keys.detach().clone(memory_format=torch.contiguous_format))
        self.prefix_values = nn.Parameter(values.detach().clone(memory_format=torch.contiguous_format))

    def set_source(self, source) -> None:
        """Take the prefix from `source.prefix_kv(layer)` ((1, kv_heads, P, head_dim) each) instead."""
        object.__setattr__(self, "source", source)

    def prefix(self, layer: int) -> tuple[Tensor, Tensor] | None:
        if self.disabled or self.recording:
            return None
        if self.source is not None:
            return self.source.prefix_kv(layer)
        return self.prefix_keys[None], self.prefix_values[None]

    def forward(self, x: Tensor, *, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None,
                attn_mask: Tensor | None = None, position_bias: Tensor | None = None,
                kv_cache: KVCache | None = None, layer: int = 0) -> Tensor:
        prefix = self.prefix(layer)
        if prefix is None and not self.recording:
            return super().forward(x, context=context, rope=rope, attn_mask=attn_mask,
                                   position_bias=position_bias, kv_cache=kv_cache, layer=layer)
        B, T, _ = x.shape
        q, k, v = self._keys_values(x, None, kv_cache, layer)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.recording:
            self.recorded = (k, v)
        past: int | None = 0
        if kv_cache is not None:
            past = kv_cache.past  # None: rows of different lengths, attn_mask holds the causal part
            k, v = kv_cache.update(layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        mask = self.combined_mask(attn_mask, position_bias, T, k.shape[2], past, q)
        if prefix is not None:
            pk, pv = (t.to(q.dtype).expand(B, -1, -1, -1) for t in prefix)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            mask = with_prefix_columns(mask, T, pk.shape[2])
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            enable_gqa=self.n_kv_head != self.n_head)
        return self.resid_dropout(self.out(y.transpose(1, 2).reshape(B, T, -1)))

    def combined_mask(self, attn_mask: Tensor | None, position_bias: Tensor | None, T: int, S: int,
                      past: int | None, q: Tensor) -> Tensor | None:
        """One mask over the sequence's own S keys: bool (True = may attend), or a float bias."""
        allowed = attn_mask
        if self.causal and past is not None:
            causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
            allowed = causal if allowed is None else allowed & causal
        if position_bias is None:
            return allowed
        bias = position_bias.to(q.dtype)
        return bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))


def with_prefix_columns(mask: Tensor | None, T: int, P: int) -> Tensor | None:
    """`mask` over (.., T, S) keys widened to (.., T, P + S): every query sees every prefix position."""
    if mask is None:
        return None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(-1, -1, T, -1)
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([fill(*mask.shape[:3], P, dtype=mask.dtype, device=mask.device), mask], dim=-1)


def self_attentions(model: nn.Module) -> list[tuple[str, Attention]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and not m.cross]


def swap_attentions(model: nn.Module) -> list[PrefixAttention]:
    """Replace every self-attention module with a PrefixAttention (in place); returns them in order."""
    swapped = []
    for name, attn in self_attentions(model):
        if isinstance(attn, PrefixAttention):
            raise UserError(f"adapter: {name} has a prefix (or prompt) adapter already")
        new = PrefixAttention.from_attention(attn)
        set_submodule(model, name, new)
        swapped.append(new)
    if not swapped:
        raise UserError(f"adapter.method prefix: {type(model).__name__} has no self-attention to prefix")
    return swapped


@torch.no_grad()
def record_keys_values(model: nn.Module, attns: list[PrefixAttention], ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The keys/values each of `attns` computes when the model reads `ids` (1, P) (no prefix)."""
    was_training = model.training
    model.eval()
    for a in attns:
        a.recording = True
    try:
        if isinstance(model, EncoderDecoder):
            model(ids, decoder_input_ids=ids)
        elif isinstance(model, BERT):
            model.encode(ids)
        else:
            model(ids)
        return [a.recorded for a in attns]
    finally:
        for a in attns:
            a.recording, a.recorded = False, None
        model.train(was_training)


def apply_prefix(model: nn.Module, prefix_len: int, *, seed: int = 0, freeze: bool = True) -> list[PrefixAttention]:
    """Prefix tuning on every self-attention of `model` (in place): prefixes initialized from the
    keys/values of `prefix_len` random tokens; with `freeze` the base stops requiring gradients."""
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, prefix_len), generator=generator).to(device)
    attns = swap_attentions(model)
    recorded = record_keys_values(model, attns, ids)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for attn, (k, v) in zip(attns, recorded):
        attn.set_prefix(k[0], v[0])
    return attns
