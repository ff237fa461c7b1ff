"""Shared Transformer building blocks: norms, positional encodings, attention, MLP, KV cache.

Every architecture file (GPT, BERT, the encoder-decoder) only wires these blocks
together, so a fix or speed-up here reaches all of them. The blocks know nothing about
training, parallelism or adapters; those are applied to a built model from outside.

Tensor layout inside attention is (batch, heads, time, head_dim), the layout
`F.scaled_dot_product_attention` wants; activations between blocks are (batch, time, n_embd).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------
# Norms


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): x / rms(x) * weight, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """A `layernorm` (with or without bias) or `rmsnorm` over the last dimension."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")


# --------------------------------------------------------------------------------------------
# Positions


def sinusoidal_table(max_len: int, dim: int, base: float = 10000.0) -> Tensor:
    """The fixed (max_len, dim) position table of "Attention Is All You Need" (Vaswani et al.).

    PE[pos, 2i] = sin(pos / base^(2i/dim)), PE[pos, 2i+1] = cos(pos / base^(2i/dim)); it is
    added to the token embeddings.
    """
    position = torch.arange(max_len, dtype=torch.float32)[:, None]
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = position * inv_freq  # (max_len, ceil(dim/2))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : dim // 2])  # odd dim: one cosine column fewer
    return table


def rope_tables(max_len: int, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin tables, each (max_len, head_dim), for rotary embeddings (HF Llama convention).

    The frequencies are laid out as two concatenated halves (not interleaved pairs), matching
    `rotate_half`, so Llama checkpoints load without permuting q/k weights.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (batch, heads, time, head_dim) by the angles of cos/sin (time, head_dim)."""
    # Cast the tables to x's dtype: under bf16 autocast q/k are bf16 and fp32 tables would
    # silently promote the whole attention to fp32 (HF Llama does the same cast).
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def relative_position_bucket(relative_position: Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> Tensor:
    """T5's bucket (0..num_buckets-1) of each relative position `key_pos - query_pos`.

    Bidirectional (encoder): half the buckets are for keys after the query, half for keys before
    it. Causal (decoder): keys after the query all share bucket 0 (they are masked anyway). In
    each half, the first half of the buckets are exact distances 0, 1, ...; the rest grow
    logarithmically up to `max_distance`, beyond which every distance shares the last bucket
    (Raffel et al. 2020; Mesh TensorFlow `_relative_position_bucket`, reproduced exactly).
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log(0) for distance 0 is -inf; torch.where keeps the exact bucket there
    log_bucket = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                              * (num_buckets - max_exact)).long()
    log_bucket = torch.clamp(log_bucket, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """T5's learned relative position bias: one scalar per (bucket, head), added to the scores.

    T5 computes it once per stack (in its first layer) and every layer of the stack adds the same
    bias; the encoder's is bidirectional, the decoder's causal. Cross-attention has none.
    """

    def __init__(self, n_head: int, num_buckets: int = 32, max_distance: int = 128, *,
                 bidirectional: bool = True) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.zeros(num_buckets, n_head))

    def forward(self, query_len: int, key_len: int, offset: int | Tensor = 0) -> Tensor:
        """The (1, heads, query_len, key_len) bias for queries at positions offset.. (KV cache), or
        (B, heads, query_len, key_len) for a (B,) tensor of offsets (rows of different lengths)."""
        device = self.weight.device
        if isinstance(offset, Tensor):
            query_pos = offset.to(device)[:, None, None] + torch.arange(query_len, device=device)[:, None]
        else:
            query_pos = torch.arange(offset, offset + query_len, device=device)[None, :, None]
        key_pos = torch.arange(key_len, device=device)
        bucket = relative_position_bucket(key_pos - query_pos, self.bidirectional, self.num_buckets,
                                          self.max_distance)
        return F.embedding(bucket, self.weight).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of every layer for incremental decoding: `batch_size` rows of up to `max_len`
    positions, preallocated, and each row with its own length (`lengths`).

    A forward pass over T new tokens per row writes them after each row's cached ones (`update`)
    and the model then calls `advance(T)`. When every row has the same length (`past` is that
    length) positions are `past + arange(T)` and attention needs no mask beyond causality, so a
    single sequence costs what it always did; when lengths differ, `positions` numbers each
    row's tokens from its own length and `attention_mask` hides the keys past each row's end.
    Buffers are allocated on the first `update` of each layer, in the device and dtype of the
    keys being written, so one cache works for fp32, bf16 autocast and CUDA without the caller
    having to know which.

    `view(start, stop)` is the same cache seen through rows start..stop-1 (it shares the buffers
    and lengths): a generation engine runs one forward over its decoding rows and another over
    the rows it is prefilling. `move_row` copies a row into another slot (a finished request's
    slot is refilled from the last row, so the running rows stay a contiguous block).

    `cross[layer]` holds a decoder layer's cross-attention keys/values of the encoder output,
    (batch_size, heads, source_len, head_dim) buffers filled per row (`set_cross`) and read by
    `cross_kv`; `source_lengths` is each row's source length (`source_mask` masks the rest).
    `reset` empties the rows (and drops the cross buffers when it covers the whole cache); `crop`
    keeps the cross keys/values.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int | Sequence[int], head_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """n_kv_head: one count for every layer, or one per layer (a pruned model, `ModelConfig.layer_heads`)."""
        self.n_layer, self.batch_size, self.max_len = n_layer, batch_size, max_len
        heads = [n_kv_head] * n_layer if isinstance(n_kv_head, int) else list(n_kv_head)
        self.layer_shapes = [(batch_size, h, max_len, head_dim) for h in heads]
        self.shape = self.layer_shapes[0]  # every layer's, unless pruned
        self.device, self.dtype = device, dtype
        # lists shared with every view: change them in place, never rebind them
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * n_layer
        self.lengths = [0] * batch_size
        self.source_lengths = [0] * batch_size
        self.start, self.stop = 0, batch_size
        self._memo: dict = {}  # device tensors derived from the lengths (per forward)

    # ---- rows -----------------------------------------------------------------------------

    def view(self, start: int, stop: int) -> KVCache:
        """This cache restricted to rows start..stop-1 (absolute row numbers); shares all state."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows {start}..{stop - 1} are not within the cache's {self.batch_size} rows")
        view = copy.copy(self)
        view.start, view.stop, view._memo = start, stop, {}
        return view

    def _rows(self) -> range:
        return range(self.start, self.stop)

    @property
    def past(self) -> int | None:
        """The rows' common length, or None when they differ (see `positions`, `attention_mask`)."""
        first = self.lengths[self.start]
        return first if all(self.lengths[i] == first for i in self._rows()) else None

    @property
    def length(self) -> int:
        """The rows' common length; ValueError when they differ (read `lengths` then)."""
        past = self.past
        if past is None:
            raise ValueError(f"the rows have different lengths {self.lengths[self.start:self.stop]}")
        return past

    @property
    def longest(self) -> int:
        return max(self.lengths[self.start:self.stop])

    def _memoized(self, name: str, T: int, device: torch.device | None, make,
                  lengths: list[int] | None = None) -> Tensor:
        """`make(lengths)`, a device tensor derived from the rows' lengths (default: `lengths`), made
        once per forward rather than once per layer."""
        key = (name, tuple(self.lengths[self.start:self.stop] if lengths is None else lengths), T, device)
        if key not in self._memo:
            if len(self._memo) > 16:
                self._memo.clear()
            self._memo[key] = make(key[1])
        return self._memo[key]

    def positions(self, T: int, device: torch.device | None = None) -> Tensor | None:
        """(B, T) position of each of the next T tokens of each row; None when all rows have one
        length (the positions are then `past + arange(T)`)."""
        if self.past is not None:
            return None
        return self._memoized("positions", T, device, lambda lengths: torch.tensor(
            lengths, device=device)[:, None] + torch.arange(T, device=device))

    def attention_mask(self, T: int, device: torch.device | None = None) -> Tensor | None:
        """(B, 1, T, longest + T) bool, True where the next T queries may attend: the keys up to
        and including the query's own position in its row (causal, and nothing past the row's end).
        None when all rows have one length (causality is then the attention's business)."""
        pos = self.positions(T, device)
        if pos is None:
            return None
        keys = torch.arange(self.longest + T, device=device)
        return (keys <= pos[..., None])[:, None]

    # ---- self-attention keys/values -----------------------------------------------------

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (rows, kv_heads, T, head_dim) after each row's cached ones; return every row's
        keys/values up to the longest row's end (positions past a shorter row's end are masked)."""
        T = k.shape[2]
        end = self.longest + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len={self.max_len}; "
                             "reset() or crop() it first")
        if self.keys[layer] is None:
            device, dtype = self.device or k.device, self.dtype or k.dtype
            self.keys[layer] = torch.zeros(self.layer_shapes[layer], device=device, dtype=dtype)
            self.values[layer] = torch.zeros(self.layer_shapes[layer], device=device, dtype=dtype)
        keys, values = self.keys[layer][self.start:self.stop], self.values[layer][self.start:self.stop]
        past = self.past
        if past is not None:
            keys[:, :, past:past + T] = k
            values[:, :, past:past + T] = v
        else:  # row b's tokens go to its own positions lengths[b]..lengths[b]+T-1
            pos = self.positions(T, k.device)
            rows = self._memoized("rows", 0, k.device,
                                  lambda lengths: torch.arange(len(lengths), device=k.device)[:, None])
            keys[rows, :, pos] = k.transpose(1, 2).to(keys.dtype)
            values[rows, :, pos] = v.transpose(1, 2).to(values.dtype)
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        """Mark n more tokens as cached in every row (called once per forward, after all layers wrote)."""
        for i in self._rows():
            self.lengths[i] += n

    def set_lengths(self, lengths: Sequence[int]) -> None:
        """Shorten each row to its length (e.g. after a right-padded prefill: the padding is forgotten)."""
        if len(lengths) != self.stop - self.start or any(
                not 0 <= n <= self.lengths[i] for i, n in zip(self._rows(), lengths)):
            raise ValueError(f"cannot set rows of lengths {self.lengths[self.start:self.stop]} to {list(lengths)}")
        self.lengths[self.start:self.stop] = list(lengths)

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens of every row (e.g. to roll back a draft)."""
        if not all(0 <= length <= self.lengths[i] for i in self._rows()):
            raise ValueError(f"cannot crop a cache of {self.lengths[self.start:self.stop]} tokens to {length}")
        self.set_lengths([length] * (self.stop - self.start))

    def reset(self) -> None:
        """Empty the rows (and their cross-attention keys/values); the buffers are kept for reuse,
        except the cross-attention ones when the whole cache is reset."""
        for i in self._rows():
            self.lengths[i] = self.source_lengths[i] = 0
        if self.start == 0 and self.stop == self.batch_size:
            self.cross[:] = [None] * self.n_layer

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` (its cached keys/values, cross keys/values and lengths) into row `dst`."""
        n, s = self.lengths[src], self.source_lengths[src]
        for buffer in (*self.keys, *self.values):
            if buffer is not None:
                buffer[dst, :, :n] = buffer[src, :, :n]
        for pair in self.cross:
            if pair is not None:
                for buffer in pair:
                    buffer[dst, :, :s] = buffer[src, :, :s]
        self.lengths[dst], self.source_lengths[dst] = n, s

    # ---- cross-attention keys/values ----------------------------------------------------

    def has_cross(self) -> bool:
        """Whether every row holds its encoder output's cross-attention keys/values."""
        return self.cross[0] is not None and all(self.source_lengths[i] for i in self._rows())

    def set_cross(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store a layer's cross-attention keys/values (rows, kv_heads, S, head_dim) for these rows;
        their source length becomes S (`set_source_lengths` tells a padded source's real one)."""
        S, pair = k.shape[2], self.cross[layer]
        if pair is None or pair[0].shape[2] < S:
            shape = (self.batch_size, k.shape[1], max(S, self.max_len), k.shape[3])
            grown = tuple(torch.zeros(shape, device=self.device or k.device, dtype=self.dtype or k.dtype)
                          for _ in range(2))
            if pair is not None:
                for old, new in zip(pair, grown):
                    new[:, :, :old.shape[2]] = old
            self.cross[layer] = pair = grown
        pair[0][self.start:self.stop, :, :S] = k
        pair[1][self.start:self.stop, :, :S] = v
        for i in self._rows():
            self.source_lengths[i] = S

    def set_source_lengths(self, lengths: Sequence[int]) -> None:
        """Each row's real source length (the rest of its cross keys/values is padding, masked)."""
        self.source_lengths[self.start:self.stop] = list(lengths)

    def cross_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """A layer's cross-attention keys/values of these rows, up to the longest source."""
        pair = self.cross[layer]
        if pair is None or not self.has_cross():
            raise ValueError("cross-attention needs `context` (the encoder output) or a filled kv_cache")
        S = max(self.source_lengths[self.start:self.stop])
        return pair[0][self.start:self.stop, :, :S], pair[1][self.start:self.stop, :, :S]

    def source_mask(self, device: torch.device | None = None) -> Tensor | None:
        """(B, 1, 1, S) bool, True on each row's real source positions; None when all rows have one."""
        lengths = self.source_lengths[self.start:self.stop]
        if all(n == lengths[0] for n in lengths):
            return None
        return self._memoized("source", 0, device, lambda n: (torch.arange(max(n), device=device)
                                                              < torch.tensor(n, device=device)[:, None])[:, None, None],
                              lengths)


# --------------------------------------------------------------------------------------------
# Dropout


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """`F.dropout` with a cheaper random mask on CPU (`cpu_keep_mask`); the same semantics."""
    if not training or p == 0.0:
        return x
    mask = cpu_keep_mask(x, p)
    if mask is None:
        return F.dropout(x, p, training=True)
    keep, scale = mask
    return (x * keep).mul_(scale)


def cpu_keep_mask(x: Tensor, p: float) -> tuple[Tensor, float] | None:
    """A dropout keep-mask for x on CPU as uint8 0/1 (x * keep is one fast pass), and the scale.

    PyTorch's CPU dropout draws one Mersenne-Twister number per element (`bernoulli_`), on one
    thread: for the `small` preset (attention probabilities are 16*6*256*256 elements per
    layer) that was the largest single cost of a training step. Here each 64-bit draw is split
    into four 16-bit lanes and an element is kept when its lane is >= round(p * 2^16); kept
    elements are to be scaled by 2^16 / (2^16 - that threshold), so the expectation is exactly
    x and the realized drop rate is within 2^-17 of p. None off CPU (fused, parallel RNG
    there) or for a p that 16 bits cannot resolve.
    """
    threshold = round(p * 65536)
    if x.device.type != "cpu" or not 0 < threshold < 65536:
        return None
    n = x.numel()
    lanes = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)
    keep = lanes[:n].view(x.shape) >= threshold - 32768  # int16 lanes are uniform on [-2^15, 2^15)
    # uint8, not bool: bf16 * bool and bool -> bf16 casts take slow paths, bf16 * uint8 does not
    return keep.view(torch.uint8), 65536 / (65536 - threshold)


class Dropout(nn.Dropout):
    """`nn.Dropout` that uses `dropout` above (a faster mask on CPU, the same semantics)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


# --------------------------------------------------------------------------------------------
# Attention


class Attention(nn.Module):
    """Multi-head attention: causal or bidirectional self-attention, or cross-attention.

    One module for every family: `causal=True` for decoders, False for BERT-style encoders;
    `cross=True` for an encoder-decoder's cross-attention, whose queries come from `x` and keys/
    values from `context` (the encoder output). `attn_mask` (bool, True = may attend,
    broadcastable to (B, heads, T, S)) carries padding masks; `position_bias` (float, added to
    the scores, e.g. T5's relative bias) is folded into one additive mask together with the
    padding and causal masks. Self-attention takes q/k/v from one fused `qkv` Linear (one matmul
    instead of three; HF converters concatenate Llama's or T5's q/k/v into it, or copy GPT-2's
    c_attn as is); cross-attention has a `q` and a fused `kv` Linear. `scale` multiplies the
    scores (default 1/sqrt(head_dim); T5 uses 1.0, its init absorbs the scaling). `head_dim`
    defaults to n_embd // n_head (T5 v1.1 has heads * head_dim != n_embd).
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int | None = None, *,
                 causal: bool = True, bias: bool = True, dropout: float = 0.0, cross: bool = False,
                 scale: float | None = None, head_dim: int | None = None) -> None:
        super().__init__()
        if cross and causal:
            raise ValueError("cross-attention is never causal: every query sees the whole encoder output")
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        self.head_dim = head_dim or n_embd // n_head
        self.causal, self.cross = causal, cross
        self.dropout = dropout
        self.scale = scale
        q_dim, kv_dim = n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.split_sizes = (q_dim, kv_dim, kv_dim)
        if cross:
            self.q = nn.Linear(n_embd, q_dim, bias=bias)
            self.kv = nn.Linear(n_embd, 2 * kv_dim, bias=bias)
        else:
            self.qkv = nn.Linear(n_embd, q_dim + 2 * kv_dim, bias=bias)
        self.out = nn.Linear(q_dim, n_embd, bias=bias)
        self.resid_dropout = Dropout(dropout)

    def _heads(self, t: Tensor, n: int) -> Tensor:
        """(B, T, n * head_dim) -> (B, n, T, head_dim)."""
        return t.view(*t.shape[:2], n, self.head_dim).transpose(1, 2)

    def _keys_values(self, x: Tensor, context: Tensor | None, kv_cache: KVCache | None,
                     layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, heads, T|S, head_dim) for self- or cross-attention (cache-aware)."""
        if not self.cross:
            q, k, v = self.qkv(x).split(self.split_sizes, dim=-1)
            return self._heads(q, self.n_head), self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
        q = self._heads(self.q(x), self.n_head)
        if context is None:  # the encoder output's keys/values, computed at the first step
            if kv_cache is None:
                raise ValueError("cross-attention needs `context` (the encoder output) or a filled kv_cache")
            k, v = kv_cache.cross_kv(layer)
            return q, k.to(q.dtype), v.to(q.dtype)
        k, v = self.kv(context).split(self.split_sizes[1:], dim=-1)
        k, v = self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
        if kv_cache is not None:
            kv_cache.set_cross(layer, k, v)
        return q, k, v

    def forward(self, x: Tensor, *, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None,
                attn_mask: Tensor | None = None, position_bias: Tensor | None = None,
                kv_cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """x: (B, T, n_embd); context: (B, S, n_embd) for cross-attention; rope: cos/sin for
        these T positions; position_bias: (1 or B, heads, T, S) added to the scores; kv_cache:
        see `KVCache` (self-attention appends to it; cross-attention fills its `cross` when given
        `context`, else reads it). With a cache whose rows differ in length, `attn_mask` must be
        the cache's `attention_mask` (it holds the causal part)."""
        B, T, _ = x.shape
        q, k, v = self._keys_values(x, context, kv_cache, layer)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past: int | None = 0
        if kv_cache is not None and not self.cross:
            past = kv_cache.past  # None: rows of different lengths, attn_mask is causal already
            k, v = kv_cache.update(layer, k, v)
            if k.dtype != q.dtype:  # a cache allocated in another dtype than this forward's
                k, v = k.to(q.dtype), v.to(q.dtype)

        if self._use_cpu_attention(q, attn_mask, kv_cache, position_bias, k.shape[2]):
            y = self._cpu_attention(q, k, v)
            return self.resid_dropout(self.out(y.transpose(1, 2).reshape(B, T, -1)))

        # Causal masking without a mask tensor whenever queries and keys start together
        # (training, prefill): SDPA's is_causal takes the fast kernel. With cached keys the
        # new queries sit at the bottom-right of the score matrix and need an explicit mask,
        # except a single query, which may see every cached key anyway. An additive bias
        # cannot be combined with is_causal, so then the causal mask is folded into it.
        is_causal = self.causal and past == 0 and attn_mask is None and position_bias is None
        if self.causal and not is_causal and T > 1 and past is not None:
            causal_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            attn_mask = causal_mask if attn_mask is None else attn_mask & causal_mask
        if position_bias is not None:
            # SDPA wants a float mask in the query's dtype (bf16 under autocast)
            bias = position_bias.to(q.dtype)
            attn_mask = bias if attn_mask is None else torch.where(attn_mask, bias, float("-inf"))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.out(y))

    # Why a hand-written path on CPU: SDPA's CPU flash kernel does not support dropout, so
    # training with attention dropout falls back to SDPA's unfused math path, with PyTorch's
    # slow CPU dropout mask (see `cpu_keep_mask`) and extra masking passes; and in bf16 the
    # flash kernel's backward is slow. Plain matmul + softmax + `cpu_keep_mask` measured, per
    # layer of the `small` preset (bf16, forward + backward, 1 thread): 144 -> 86 ms with
    # dropout 0.2, 48 -> 33 ms without. In fp32 without dropout (the `nano` preset) SDPA is
    # faster, so it keeps that case. The hand-written path materializes the (T, S) scores, so
    # without dropout (which makes SDPA materialize them too) it is limited to short contexts;
    # it never takes a mask, a position bias or a KV cache (inference), where SDPA handles the
    # offsets, and CUDA always takes SDPA.
    CPU_ATTENTION_MAX_LEN = 512

    def _use_cpu_attention(self, q: Tensor, attn_mask: Tensor | None, kv_cache: KVCache | None,
                           position_bias: Tensor | None = None, key_len: int | None = None) -> bool:
        if (q.device.type != "cpu" or attn_mask is not None or position_bias is not None
                or kv_cache is not None):
            return False
        if self.training and self.dropout > 0:
            return True
        longest = max(q.shape[2], key_len or 0)
        return q.dtype in (torch.bfloat16, torch.float16) and longest <= self.CPU_ATTENTION_MAX_LEN

    def _cpu_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q k^T * scale [+ causal mask]) v, with dropout on the probabilities."""
        if self.n_kv_head != self.n_head:  # grouped-query: each kv head serves a group of q heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        T = q.shape[2]
        scale = self.head_dim**-0.5 if self.scale is None else self.scale
        scores = (q * scale) @ k.transpose(-2, -1)  # scaling q: T*d, not T*S, products
        if self.causal:  # an added -inf bias, not masked_fill: its backward is free
            scores = scores + torch.full((T, T), float("-inf"), dtype=scores.dtype, device=q.device).triu_(1)
        probs = scores.softmax(dim=-1)
        mask = cpu_keep_mask(probs, self.dropout) if self.training and self.dropout > 0 else None
        if mask is None:
            return dropout(probs, self.dropout, self.training) @ v  # eval, or a p too small for 16 bits
        keep, scale = mask
        return (probs * keep) @ (v * scale)  # dropout's scale on v: T*d, not T*S, products


# --------------------------------------------------------------------------------------------
# MLP


class MLP(nn.Module):
    """Position-wise feed-forward: up, activation, down — or gated: act(gate(x)) * up(x), down.

    Activations, named as Hugging Face names them: `gelu` is the exact (erf) GELU of BERT and
    nanoGPT; `gelu_tanh` is the tanh approximation GPT-2 was trained with (HF `gelu_new`), so
    converted GPT-2 weights reproduce HF's logits; `relu` is the original Transformer's and
    T5 v1.0's. On CPUs the exact GELU is also the fast one (~6x faster than tanh-GELU in bf16
    here). Gated: `swiglu` (Llama, SiLU gate) and `geglu` (T5 v1.1's "gated-gelu", tanh-GELU gate).
    """

    ACTIVATIONS = {
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }
    GATES = {"swiglu": F.silu, "geglu": lambda x: F.gelu(x, approximate="tanh")}

    def __init__(self, n_embd: int, hidden: int, kind: str = "gelu", *, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if kind not in (*self.ACTIVATIONS, *self.GATES):
            raise ValueError(f"unknown mlp {kind!r}")
        self.kind = kind
        self.gate = nn.Linear(n_embd, hidden, bias=bias) if kind in self.GATES else None
        self.up = nn.Linear(n_embd, hidden, bias=bias)
        self.down = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            h = self.GATES[self.kind](self.gate(x)) * self.up(x)
        else:
            h = self.ACTIVATIONS[self.kind](self.up(x))
        return self.dropout(self.down(h))


# --------------------------------------------------------------------------------------------
# The Transformer block


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention and feed-forward sublayers, each residual.

    `model.norm_position` picks where the norms sit:
    - `pre` (GPT-2, Llama, T5): x + attn(norm(x)), then x + mlp(norm(x)); trains stably deep.
    - `post` (the original Transformer, BERT): norm(x + attn(x)), then norm(x + mlp(x)).
    `causal` makes the self-attention causal (decoders) or bidirectional (encoders).
    `cross_attention` adds an encoder-decoder decoder's sublayer between the two, attending to
    `context` (the encoder output) under `context_mask` (the encoder's padding). Every
    architecture builds its stack from this one block.
    """

    def __init__(self, config, *, causal: bool, cross_attention: bool = False, layer: int | None = None) -> None:
        """layer: the block's index, for a pruned model's per-layer widths (`ModelConfig.layer_heads`,
        `layer_mlp_hidden`); None: the config's uniform widths."""
        super().__init__()
        c = config
        self.pre_norm = c.norm_position == "pre"
        attention = dict(bias=c.bias, dropout=c.dropout, scale=c.attn_scale, head_dim=c.head_dim)
        self.attn_norm = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        heads = (c.n_head, c.kv_heads) if layer is None else (c.heads_in(layer), c.kv_heads_in(layer))
        self.attn = Attention(c.n_embd, *heads, causal=causal, **attention)
        self.cross_norm = self.cross_attn = None
        if cross_attention:
            self.cross_norm = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
            self.cross_attn = Attention(c.n_embd, c.n_head, c.kv_heads, causal=False, cross=True, **attention)
        self.mlp_norm = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        # MLP, or a Mixture-of-Experts of MLPs when model.moe.num_experts > 0 (moe.py builds on
        # MLP above, hence the import here rather than at the top)
        from lmforge.models.moe import make_ffn

        if layer is None or c.layer_mlp_hidden is None:
            self.mlp = make_ffn(c)
        else:
            self.mlp = MLP(c.n_embd, c.ffn_hidden_in(layer), c.mlp, bias=c.bias, dropout=c.dropout)

    def forward(self, x: Tensor, *, rope: tuple[Tensor, Tensor] | None = None,
                attn_mask: Tensor | None = None, position_bias: Tensor | None = None,
                kv_cache: KVCache | None = None, layer: int = 0, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        """position_bias: added to the self-attention scores (T5's relative bias); context and
        context_mask: the encoder output (B, S, n_embd) and its bool (B, 1, 1, S) padding mask."""
        self_attn = dict(rope=rope, attn_mask=attn_mask, position_bias=position_bias, kv_cache=kv_cache,
                         layer=layer)
        cross = dict(context=context, attn_mask=context_mask, kv_cache=kv_cache, layer=layer)
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), **self_attn)
            if self.cross_attn is not None:
                x = x + self.cross_attn(self.cross_norm(x), **cross)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, **self_attn))
        if self.cross_attn is not None:
            x = self.cross_norm(x + self.cross_attn(x, **cross))
        return self.mlp_norm(x + self.mlp(x))


def init_normal_(module: nn.Module, std: float) -> None:
    """GPT-2 init for one module: N(0, std) for Linear/Embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def scaled_init_std(init_std: float, n_layer: int) -> float:
    """The std of residual-output projections: init_std / sqrt(2 * n_layer).

    Each block adds two outputs (attention, MLP) to the residual stream; scaling them keeps the
    stream's variance at init roughly independent of depth (GPT-2 paper, section 2.3).
    """
    return init_std / math.sqrt(2 * n_layer)
