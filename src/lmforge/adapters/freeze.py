"""Partial fine-tuning (`adapter.method: freeze`): the embeddings and the first k blocks frozen.

The embeddings are every `nn.Embedding` (token, learned positions, BERT's token types); a tied LM
head is the token embedding's tensor and is frozen with it. The blocks are every stack of
Transformer blocks (`blocks`; an encoder-decoder's `encoder_blocks` and `decoder_blocks`: the
first k of each). Frozen parameters get no gradients and no optimizer state.
"""

from __future__ import annotations

from torch import nn

from lmforge.errors import UserError
from lmforge.models.blocks import TransformerBlock


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's ModuleLists of TransformerBlocks, by name."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) and all(isinstance(b, TransformerBlock) for b in m)]


def freeze_layers(model: nn.Module, k: int) -> list[str]:
    """Freeze the embeddings and the first k blocks of each stack; returns the frozen parameters' names."""
    stacks = block_stacks(model)
    if not stacks:
        raise UserError(f"adapter.method freeze: {type(model).__name__} has no stack of Transformer blocks")
    for name, stack in stacks:
        if k > len(stack):
            raise UserError(f"adapter.freeze_layers={k} but {name} has only {len(stack)} blocks; "
                            f"use at most {len(stack)}")
    frozen: list[nn.Module] = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    for _, stack in stacks:
        frozen.extend(stack[:k])
    ids = {id(p) for m in frozen for p in m.parameters()}
    names = []
    for name, p in model.named_parameters():
        if id(p) in ids:
            p.requires_grad_(False)
            names.append(name)
    return names
