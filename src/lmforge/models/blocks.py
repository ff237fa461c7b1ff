"""Shared Transformer building blocks: norms, positional encodings, attention, MLP, KV cache.

Every architecture file (GPT now; BERT and the encoder-decoder later) only wires these blocks
together, so a fix or speed-up here reaches all of them. The blocks know nothing about
training, parallelism or adapters; those are applied to a built model from outside.

Tensor layout inside attention is (batch, heads, time, head_dim), the layout
`F.scaled_dot_product_attention` wants; activations between blocks are (batch, time, n_embd).
"""

from __future__ import annotations

import math

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


# --------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to `max_len`.

    `length` tokens are cached; a forward pass over T new tokens writes them at positions
    [length, length+T) of each layer (`update`) and the model then calls `advance(T)`.
    Buffers are allocated on the first `update` of each layer, in the device and dtype of the
    keys being written, so one cache works for fp32, bf16 autocast and CUDA without the caller
    having to know which.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        self.n_layer, self.batch_size, self.max_len = n_layer, batch_size, max_len
        self.shape = (batch_size, n_kv_head, max_len, head_dim)
        self.device, self.dtype = device, dtype
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (batch, kv_heads, T, head_dim) after the cached ones; return all of them."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len={self.max_len}; "
                             "reset() or crop() it first")
        if self.keys[layer] is None:
            device, dtype = self.device or k.device, self.dtype or k.dtype
            self.keys[layer] = torch.zeros(self.shape, device=device, dtype=dtype)
            self.values[layer] = torch.zeros(self.shape, device=device, dtype=dtype)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        """Mark n more tokens as cached (called once per forward, after all layers wrote)."""
        self.length += n

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (e.g. to roll back a draft)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} tokens to {length}")
        self.length = length

    def reset(self) -> None:
        """Empty the cache; the buffers are kept for reuse."""
        self.length = 0


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
    """Multi-head self-attention with grouped-query heads, optional RoPE and a KV cache.

    One module for every family: `causal=True` for decoders, False for BERT-style encoders;
    `attn_mask` (bool, True = may attend, broadcastable to (B, heads, T, S)) carries padding
    masks. q/k/v come from one fused `qkv` Linear (one matmul instead of three); HF converters
    concatenate Llama's q_proj/k_proj/v_proj into it, or copy GPT-2's c_attn as is.
    Cross-attention (encoder-decoder) will need q and kv from different inputs, i.e. a
    separate `q` and `kv` projection; it is not implemented yet.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int | None = None, *,
                 causal: bool = True, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        self.head_dim = n_embd // n_head
        self.causal = causal
        self.dropout = dropout
        kv_dim = self.n_kv_head * self.head_dim
        self.split_sizes = (n_embd, kv_dim, kv_dim)
        self.qkv = nn.Linear(n_embd, n_embd + 2 * kv_dim, bias=bias)
        self.out = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = Dropout(dropout)

    def forward(self, x: Tensor, *, rope: tuple[Tensor, Tensor] | None = None,
                attn_mask: Tensor | None = None, kv_cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        """x: (B, T, n_embd); rope: cos/sin for these T positions; kv_cache: see `KVCache`."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(self.split_sizes, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(layer, k, v)
            if k.dtype != q.dtype:  # a cache allocated in another dtype than this forward's
                k, v = k.to(q.dtype), v.to(q.dtype)

        if self._use_cpu_attention(q, attn_mask, kv_cache):
            y = self._cpu_attention(q, k, v)
            return self.resid_dropout(self.out(y.transpose(1, 2).reshape(B, T, C)))

        # Causal masking without a mask tensor whenever queries and keys start together
        # (training, prefill): SDPA's is_causal takes the fast kernel. With cached keys the
        # new queries sit at the bottom-right of the score matrix and need an explicit mask,
        # except a single query, which may see every cached key anyway.
        is_causal = self.causal and past == 0 and attn_mask is None
        if self.causal and not is_causal and T > 1:
            causal_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            attn_mask = causal_mask if attn_mask is None else attn_mask & causal_mask
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.out(y))

    # Why a hand-written path on CPU: SDPA's CPU flash kernel does not support dropout, so
    # training with attention dropout falls back to SDPA's unfused math path, with PyTorch's
    # slow CPU dropout mask (see `cpu_keep_mask`) and extra masking passes; and in bf16 the
    # flash kernel's backward is slow. Plain matmul + softmax + `cpu_keep_mask` measured, per
    # layer of the `small` preset (bf16, forward + backward, 1 thread): 144 -> 86 ms with
    # dropout 0.2, 48 -> 33 ms without. In fp32 without dropout (the `nano` preset) SDPA is
    # faster, so it keeps that case. The hand-written path materializes the (T, T) scores, so
    # without dropout (which makes SDPA materialize them too) it is limited to short contexts;
    # it never takes a mask or a KV cache (inference), where SDPA handles the offsets, and
    # CUDA always takes SDPA.
    CPU_ATTENTION_MAX_LEN = 512

    def _use_cpu_attention(self, q: Tensor, attn_mask: Tensor | None, kv_cache: KVCache | None) -> bool:
        if q.device.type != "cpu" or attn_mask is not None or kv_cache is not None:
            return False
        if self.training and self.dropout > 0:
            return True
        return q.dtype in (torch.bfloat16, torch.float16) and q.shape[2] <= self.CPU_ATTENTION_MAX_LEN

    def _cpu_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d) [+ causal mask]) v, with dropout on the probabilities."""
        if self.n_kv_head != self.n_head:  # grouped-query: each kv head serves a group of q heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        T = q.shape[2]
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # scaling q: T*d, not T*T, products
        if self.causal:  # an added -inf bias, not masked_fill: its backward is free
            scores = scores + torch.full((T, T), float("-inf"), dtype=scores.dtype, device=q.device).triu_(1)
        probs = scores.softmax(dim=-1)
        mask = cpu_keep_mask(probs, self.dropout) if self.training and self.dropout > 0 else None
        if mask is None:
            return dropout(probs, self.dropout, self.training) @ v  # eval, or a p too small for 16 bits
        keep, scale = mask
        return (probs * keep) @ (v * scale)  # dropout's scale on v: T*d, not T*T, products


# --------------------------------------------------------------------------------------------
# MLP


class MLP(nn.Module):
    """Position-wise feed-forward: up, activation, down — or `swiglu` (Llama: gate and up).

    Activations, named as Hugging Face names them: `gelu` is the exact (erf) GELU of BERT and
    nanoGPT; `gelu_tanh` is the tanh approximation GPT-2 was trained with (HF `gelu_new`), so
    converted GPT-2 weights reproduce HF's logits; `relu` is the original Transformer's. On
    CPUs the exact GELU is also the fast one (~6x faster than tanh-GELU in bf16 here).
    """

    ACTIVATIONS = {
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }

    def __init__(self, n_embd: int, hidden: int, kind: str = "gelu", *, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if kind not in (*self.ACTIVATIONS, "swiglu"):
            raise ValueError(f"unknown mlp {kind!r}")
        self.kind = kind
        self.gate = nn.Linear(n_embd, hidden, bias=bias) if kind == "swiglu" else None
        self.up = nn.Linear(n_embd, hidden, bias=bias)
        self.down = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            h = F.silu(self.gate(x)) * self.up(x)
        else:
            h = self.ACTIVATIONS[self.kind](self.up(x))
        return self.dropout(self.down(h))


# --------------------------------------------------------------------------------------------
# The Transformer block


class TransformerBlock(nn.Module):
    """Self-attention and feed-forward sublayers, each wrapped in a residual connection.

    `model.norm_position` picks where the norms sit:
    - `pre` (GPT-2, Llama, T5): x + attn(norm(x)), then x + mlp(norm(x)); trains stably deep.
    - `post` (the original Transformer, BERT): norm(x + attn(x)), then norm(x + mlp(x)).
    `causal` makes the self-attention causal (decoders) or bidirectional (encoders). Every
    architecture builds its stack from this one block.
    """

    def __init__(self, config, *, causal: bool) -> None:
        super().__init__()
        c = config
        self.pre_norm = c.norm_position == "pre"
        self.attn_norm = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.attn = Attention(c.n_embd, c.n_head, c.kv_heads, causal=causal, bias=c.bias,
                              dropout=c.dropout)
        self.mlp_norm = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        from lmforge.models.moe import make_ffn  # moe.py builds on MLP above: imported here, not at the top

        self.mlp = make_ffn(c)  # MLP, or a Mixture-of-Experts of MLPs when model.moe.num_experts > 0

    def forward(self, x: Tensor, *, rope: tuple[Tensor, Tensor] | None = None,
                attn_mask: Tensor | None = None, kv_cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), rope=rope, attn_mask=attn_mask, kv_cache=kv_cache, layer=layer)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, rope=rope, attn_mask=attn_mask, kv_cache=kv_cache, layer=layer))
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
