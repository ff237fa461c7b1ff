"""A layout applied to tensors: our state dict from an HF one and back, shape-checked.

Both directions walk the same `TensorRule` table (`arch.rules(config)`), so from-hf and to-hf
cannot drift apart, and every shape check names the tensor at fault. Optional rule groups a file
lacks as a whole (BERT's MLM head) are left out for the caller to initialize; `dropped_in_hf`
names our tensors an HF class has no place for.
"""

from __future__ import annotations

import torch

from lmforge.errors import UserError
from lmforge.export.hf.registry import arch_for, hf_layout_for
from lmforge.export.hf.rules import HFArch, TensorRule
from lmforge.models.config import ModelConfig

# --------------------------------------------------------------------------------------------
# Tensor mapping (both directions, shape-checked)


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our tensors' shapes for config c; a tied alias (lm_head.weight) is left out."""
    from lmforge.models import build_model
    from lmforge.train.checkpoint import tied_aliases

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(ModelConfig.from_dict(c.to_dict()))
    aliases = tied_aliases(model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in aliases}


def with_base_prefix(arch: HFArch, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names as the task classes write them; files saved from the base model class (the original
    `gpt2` files: "h.0.attn.c_attn.weight"; sentence-transformers' BertModel) lack its prefix."""
    if any(k.startswith(arch.base_prefix) for k in hf_state):
        return dict(hf_state)
    return {k if k.startswith(arch.head_prefixes) else arch.base_prefix + k: v for k, v in hf_state.items()}


def _their_shapes(rule: TensorRule, our_shape: tuple[int, ...], c: ModelConfig) -> list[tuple[int, ...]]:
    if rule.transpose:
        return [tuple(reversed(our_shape))]
    kv = c.kv_heads * c.head_dim
    if len(rule.theirs) == 3:  # q, k, v rows of the fused projection
        return [(c.n_head * c.head_dim, *our_shape[1:]), (kv, *our_shape[1:]), (kv, *our_shape[1:])]
    if len(rule.theirs) == 2:  # k, v rows of a cross-attention's fused kv
        return [(kv, *our_shape[1:]), (kv, *our_shape[1:])]
    return [our_shape]


def state_from_hf(c: ModelConfig, model_type: str, hf_state: dict[str, torch.Tensor],
                  source: str = "HF weights") -> dict[str, torch.Tensor]:
    """Our state dict (a tied lm_head omitted) from an HF one; errors name the HF tensor.

    Optional rule groups the file lacks entirely are left out of the result (the caller
    initializes them); a group present in part is an error like any missing tensor.
    """
    arch = arch_for(model_type, source)
    expected = expected_shapes(c)
    remaining = with_base_prefix(arch, hf_state)
    rules = arch.rules(c)
    absent = {r.optional for r in rules if r.optional} - {
        r.optional for r in rules if r.optional and any(t in remaining for t in (*r.theirs, *r.aliases))}
    state: dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.optional in absent:
            continue
        if rule.aliases:
            present = [n for n in (*rule.theirs, *rule.aliases) if n in remaining]
            if present and present[0] != rule.theirs[0]:
                remaining[rule.theirs[0]] = remaining[present[0]]
            for name in rule.aliases:
                remaining.pop(name, None)
        parts = []
        for name, shape in zip(rule.theirs, _their_shapes(rule, expected[rule.ours], c)):
            if name not in remaining:
                raise UserError(f"{source}: missing tensor {name!r}; the weights do not match config.json "
                                "(truncated or from another model)")
            tensor = remaining.pop(name)
            if tuple(tensor.shape) != shape:
                raise UserError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but config.json "
                                f"implies {shape}; the weights and config.json do not match")
            parts.append(tensor)
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        state[rule.ours] = tensor.t().contiguous() if rule.transpose else tensor
    if c.tie_embeddings:
        remaining.pop(arch.tied_head, None)  # a tied head saved twice by older writers
    extra = sorted(k for k in remaining if not arch.derived.search(k))
    if extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} in all); lmforge's "
                        f"{model_type} mapping does not know it (an unsupported variant?)")
    return state


def state_to_hf(c: ModelConfig, state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The HF state dict (HF names and layouts) for our state dict; the inverse of `state_from_hf`.

    Our tensors the HF class cannot hold (BERT's MLM head in a classification model) are left
    out; `dropped_in_hf` names them.
    """
    arch = hf_layout_for(c)
    expected = expected_shapes(c)
    out: dict[str, torch.Tensor] = {}
    rules = arch.rules(c)
    extra = sorted(set(state) - set(expected) - ({"lm_head.weight"} if c.tie_embeddings else set()))
    if extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]!r}; the checkpoint does not match its config.json")
    for rule in rules:
        if rule.ours not in state:
            raise UserError(f"{source}: missing tensor {rule.ours!r}; the checkpoint is incomplete")
        tensor = state[rule.ours]
        if tuple(tensor.shape) != expected[rule.ours]:
            raise UserError(f"{source}: tensor {rule.ours!r} has shape {tuple(tensor.shape)}, config.json "
                            f"implies {expected[rule.ours]}; the checkpoint is inconsistent")
        if rule.transpose:
            out[rule.theirs[0]] = tensor.t().contiguous()
        elif len(rule.theirs) == 1:
            out[rule.theirs[0]] = tensor.contiguous()
            out.update({name: tensor.clone() for name in rule.aliases})  # copies: safetensors refuses shared memory
        else:
            sizes = [s[0] for s in _their_shapes(rule, expected[rule.ours], c)]
            for name, part in zip(rule.theirs, tensor.split(sizes, dim=0)):
                out[name] = part.contiguous()
    return out


def dropped_in_hf(c: ModelConfig) -> list[str]:
    """Our tensors that the HF layout for config c has no place for (to-hf reports them)."""
    return sorted(set(expected_shapes(c)) - {rule.ours for rule in hf_layout_for(c).rules(c)})
