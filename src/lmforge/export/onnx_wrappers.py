"""Export wrappers: lmforge models called with explicit tensors, the way an ONNX graph is called.

A model keeps its `KVCache` object (preallocated buffers, Python lengths) for generation; an ONNX
graph instead takes the past keys/values as inputs and returns the present ones as outputs, so one
graph serves prefill (past length 0) and every decode step. `PastCache` is a stand-in for
`KVCache` with that calling convention: the model's own `forward`/`decode` run unchanged, and
the cache answers their questions with tensors instead of Python ints —

- `past` is None (the "rows of different lengths" path): the model then takes each row's
  positions from `positions(T)` and the attention mask from `attention_mask(T)`, never a
  Python-level branch on the past length (which a traced graph would freeze);
- `update(layer, k, v)` concatenates the layer's past keys/values with the new ones and keeps
  the result as that layer's present;
- positions and masks come from the `attention_mask` input (HF's convention: (batch, past +
  sequence), 1 = real token), so left-padded batches decode like each row alone.

The wrappers (`DecoderWithPast`, `EncoderOnly`, `Seq2SeqEncoder`, `Seq2SeqDecoderWithPast`) are
plain `nn.Module`s around the model; the models themselves are not changed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PastCache:
    """A `KVCache` stand-in over explicit past keys/values (see the module docstring).

    past: one (key, value) pair per layer, each (batch, kv_heads, past_len, head_dim);
    mask: (batch, past_len + T) int/bool, 1 = real token (None: every row is whole, no padding).
    """

    past = None  # always the per-row path: positions and masks are tensors

    def __init__(self, past: list[tuple[Tensor, Tensor]], mask: Tensor | None = None) -> None:
        self.past_kv = past
        self.mask = mask
        self.present: list[tuple[Tensor, Tensor] | None] = [None] * len(past)

    @property
    def longest(self) -> int:
        """The past length (a symbolic size while exporting)."""
        return self.past_kv[0][0].shape[2]

    def positions(self, T: int, device: torch.device | None = None) -> Tensor:
        """(B, T) positions of the new tokens: the number of real tokens before each one."""
        k = self.past_kv[0][0]
        if self.mask is None:
            pos = torch.arange(T, device=k.device) + k.shape[2]
            return pos[None].expand(k.shape[0], T)
        return (self.mask.long().cumsum(-1)[:, -T:] - 1).clamp(min=0)

    def attention_mask(self, T: int, device: torch.device | None = None) -> Tensor:
        """(B or 1, 1, T, past + T) bool: causal over the slots, padded keys hidden, and every query
        sees at least itself (a padding query would otherwise attend to nothing and give NaNs)."""
        k = self.past_kv[0][0]
        total = k.shape[2] + T
        keys = torch.arange(total, device=k.device)
        queries = torch.arange(T, device=k.device) + k.shape[2]
        allowed = keys[None, :] <= queries[:, None]  # (T, total)
        if self.mask is None:
            return allowed[None, None]
        itself = keys[None, :] == queries[:, None]
        return ((allowed[None] & self.mask.bool()[:, None, :]) | itself[None])[:, None]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        past_k, past_v = self.past_kv[layer]
        k, v = torch.cat([past_k.to(k.dtype), k], dim=2), torch.cat([past_v.to(v.dtype), v], dim=2)
        self.present[layer] = (k, v)
        return k, v

    def advance(self, n: int) -> None:
        """Nothing to do: the caller feeds the presents back as the next step's past."""

    def has_cross(self) -> bool:
        return False  # cross-attention keys/values are recomputed from the encoder output

    def set_cross(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Not kept (see `has_cross`)."""


def pairs(flat: tuple[Tensor, ...]) -> list[tuple[Tensor, Tensor]]:
    """(k0, v0, k1, v1, ...) -> [(k0, v0), (k1, v1), ...]."""
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def flat_present(cache: PastCache) -> tuple[Tensor, ...]:
    return tuple(t for pair in cache.present for t in pair)


class DecoderWithPast(nn.Module):
    """GPT family: (input_ids, attention_mask, past k/v per layer) -> (logits, present k/v per layer)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        cache = PastCache(pairs(past), attention_mask)
        logits, _ = self.model(input_ids, kv_cache=cache)
        return (logits, *flat_present(cache))


class EncoderOnly(nn.Module):
    """BERT: (input_ids, attention_mask, token_type_ids) -> (last_hidden_state, embeddings).

    `embeddings` is the mean of the hidden states over the real tokens (`BERT.mean_pool`, what
    `lmforge embed` L2-normalizes). `BERT.encode` skips the mask when it is all ones, a branch on
    the mask's values that a graph cannot keep; this runs the same blocks with the mask always
    applied (the same numbers: an all-ones mask hides nothing).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor, Tensor]:
        m = self.model
        T = input_ids.shape[1]
        x = m.tok_embeddings(input_ids) + m.pos_embeddings.weight[:T] + m.type_embeddings(token_type_ids)
        x = m.dropout(m.emb_norm(x))
        mask = attention_mask.bool()[:, None, None, :]
        for block in m.blocks:
            x = block(x, attn_mask=mask)
        return x, m.mean_pool(x, attention_mask)


class Seq2SeqEncoder(nn.Module):
    """Encoder-decoder's encoder: (input_ids, attention_mask) -> encoder_hidden_states."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.encode(input_ids, attention_mask)


class Seq2SeqDecoderWithPast(nn.Module):
    """Encoder-decoder's decoder: (decoder_input_ids, encoder_hidden_states, encoder_attention_mask,
    past self-attention k/v per layer) -> (logits, present k/v per layer). Every row's decoder
    sequence has the same length (they all start from the start token); the cross-attention
    keys/values are recomputed from `encoder_hidden_states` at every step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids: Tensor, encoder_hidden_states: Tensor, encoder_attention_mask: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        cache = PastCache(pairs(past))
        logits = self.model.decode(decoder_input_ids, encoder_hidden_states, attention_mask=encoder_attention_mask,
                                   kv_cache=cache)
        return (logits, *flat_present(cache))
