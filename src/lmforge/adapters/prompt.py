"""Prompt tuning (Lester et al. 2021): `prompt_len` trained input embeddings (a soft prompt) read
before every sequence, the base model frozen. GPT-family models (causal decoders).

Design: the paper prepends the soft prompt to the input embeddings, which changes the sequence
length every objective, packer and generator sees. In a causal model the prompt's positions never
see the tokens after them, so each layer's keys/values of the prompt depend on the prompt alone:
prepending it is exactly the same as running the prompt through the blocks by itself and giving
every layer its keys/values as a prefix. That is what this module does — `SoftPrompt` holds the
embeddings (`soft_prompt.embeddings`, (prompt_len, n_embd)) and runs them through the model's
blocks (batch 1, in a forward pre-hook of the model) to get each layer's keys/values, and every self-attention is a
`lmforge.adapters.prefix.PrefixAttention` that takes its prefix from it. So objectives, packing
(`doc_ids`: every example sees the prompt), the KV cache and the generation engine (rows of
different lengths) work unchanged, and the prompt costs one batch-1 pass of `prompt_len` tokens
per forward (in training; inference without gradients reuses it until a weight changes). Under
DDP it trains as anywhere; under FSDP2 it cannot (the second pass of each block escapes FSDP's
gather/free bookkeeping): a clear error there — use prefix or lora.

Positions: with RoPE the prompt sits at positions -prompt_len..-1, so a token at position t sees
prompt position j at distance t - j, exactly as if prepended (RoPE is relative), while the
sequence keeps positions 0, 1, ... With learned or sinusoidal positions the prompt gets no
position vector (a trained embedding absorbs any constant) and the sequence keeps its positions
(the paper shifts them by prompt_len; here `block_size` is not consumed). Initialization: the
embeddings of `prompt_len` random vocabulary tokens (the paper's "sampled vocabulary").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.adapters.prefix import PrefixAttention, swap_attentions
from lmforge.errors import UserError
from lmforge.models.blocks import rope_tables
from lmforge.models.gpt import GPT


class SoftPrompt(nn.Module):
    """The soft prompt of a GPT and the per-layer keys/values it yields (`prefix_kv`)."""

    def __init__(self, embeddings: Tensor, model: GPT, attns: list[PrefixAttention]) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(embeddings.detach().clone())
        # the model's blocks and attentions, not submodules of this one (they are the model's)
        object.__setattr__(self, "refs", (model.blocks, attns))
        c = model.config
        self.rope = (c.head_dim, c.rope_theta) if c.pos_encoding == "rope" else None
        self.kv: list[tuple[Tensor, Tensor]] | None = None
        self.kv_key: tuple | None = None
        self.fresh = False  # kv was computed by before_forward for the pass now running

    def prefix_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """Layer `layer`'s prompt keys/values (1, kv_heads, P, head_dim). Computed at the start of
        the model's forward (`before_forward`) or, for another entry point, when layer 0 asks."""
        if layer == 0:
            if self.fresh:
                self.fresh = False
            else:
                self.refresh()
        return self.kv[layer]

    def before_forward(self) -> None:
        """The prompt's keys/values for the forward about to run. Computing them here, before any
        block runs, rather than inside the first attention, keeps every block's calls sequential
        (FSDP2 gathers and frees a block's weights around each call; a nested call would free them
        under the running one)."""
        if not self.refs[1][0].disabled:
            self.refresh()
            self.fresh = True

    def refresh(self) -> None:
        """Compute the keys/values afresh when gradients are wanted (training: a new graph each
        pass); without gradients (generation) reuse them until a weight, device, dtype or mode
        changes."""
        blocks = self.refs[0]
        if is_fsdp(blocks[0]):
            raise UserError("adapter.method prompt does not work under train.parallel=fsdp (the prompt's "
                            "keys/values come from a second pass of each block, which FSDP2 frees); use ddp, "
                            "or adapter.method prefix or lora")
        key = (self.embeddings._version, self.embeddings.data_ptr(), self.embeddings.device,
               torch.is_autocast_enabled(self.embeddings.device.type), self.training,
               sum(p._version for p in blocks.parameters()))
        if torch.is_grad_enabled() or key != self.kv_key or self.kv is None:
            self.kv = self.compute()
            self.kv_key = None if torch.is_grad_enabled() else key

    def compute(self) -> list[tuple[Tensor, Tensor]]:
        blocks, attns = self.refs
        P = self.embeddings.shape[0]
        rope = None
        if self.rope is not None:  # positions -P..-1: the tables of P..1, sines negated
            cos, sin = rope_tables(P + 1, *self.rope)
            device = self.embeddings.device
            rope = (cos[1:].flip(0).to(device), (-sin[1:]).flip(0).to(device))
        for a in attns:
            a.recording = True
        try:
            h = self.embeddings[None]
            for layer, block in enumerate(blocks):
                h = block(h, rope=rope, layer=layer)
            return [a.recorded for a in attns]
        finally:
            for a in attns:
                a.recording, a.recorded = False, None


def apply_prompt(model: nn.Module, prompt_len: int, *, seed: int = 0, freeze: bool = True) -> SoftPrompt:
    """Prompt tuning on a GPT (in place): `model.soft_prompt` and prefix-reading self-attentions;
    with `freeze` the base stops requiring gradients."""
    if not isinstance(model, GPT):
        raise UserError(f"adapter.method prompt: works on GPT-family (decoder) models, not "
                        f"{type(model).__name__}; use prefix or lora")
    if hasattr(model, "soft_prompt"):
        raise UserError("adapter.method prompt: the model has a soft prompt already")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=generator)
    embeddings = model.tok_embeddings.weight.detach()[ids.to(model.tok_embeddings.weight.device)]
    attns = swap_attentions(model)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    model.soft_prompt = SoftPrompt(embeddings, model, attns)
    for attn in attns:
        attn.set_source(model.soft_prompt)
    model.register_forward_pre_hook(soft_prompt_pre_hook)
    return model.soft_prompt


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def soft_prompt_pre_hook(model: nn.Module, args: tuple) -> None:
    """The model's forward pre-hook: a plain function reading `model.soft_prompt`, so a deep copy
    of the model calls its own soft prompt."""
    model.soft_prompt.before_forward()
