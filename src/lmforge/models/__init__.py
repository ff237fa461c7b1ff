"""Model architectures and the building blocks they share (attention, MLP, norms, positions)."""

import contextlib
from collections.abc import Iterator

from torch import nn

from lmforge.models.bert import BERT
from lmforge.models.blocks import KVCache
from lmforge.models.config import ModelConfig, MoEConfig
from lmforge.models.encdec import EncoderDecoder
from lmforge.models.gpt import GPT

# arch name -> class; each family's module adds itself here (see `build_model`)
ARCHITECTURES = {"gpt": GPT, "bert": BERT, "encdec": EncoderDecoder}


def build_model(config: ModelConfig):
    """The model `config.arch` names, freshly initialized (the one place that dispatches on arch)."""
    return ARCHITECTURES[config.arch](config)


# What a model can do, declared by its class (a `capabilities` frozenset, per instance where the
# config decides, e.g. MoE statistics) rather than guessed from its attributes:
CAPABILITIES = {
    "generate": "writes text token by token (`new_kv_cache`, cached forward): GPT, EncoderDecoder",
    "encoder_decoder": "generation feeds the prompt to an encoder and decodes from a start token",
    "embed": "`embed(input_ids, attention_mask)` gives sentence vectors: BERT",
    "classify": "`classify(input_ids, ...)` gives sequence-classification logits: BERT with num_labels",
    "nsp": "`nsp_logits(...)` gives next-sentence logits: BERT with nsp_head",
    "moe_stats": "`moe_stats()` reports Mixture-of-Experts routing: GPT with moe.num_experts > 0",
    "score": "`scores(idx)` gives per-position head outputs (B, T, num_labels): GPT with num_labels (reward models)",
}


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, however nested."""
    while True:
        inner = next((m for m in (getattr(model, "_orig_mod", None), getattr(model, "module", None))
                      if isinstance(m, nn.Module)), None)
        if inner is None:
            return model
        model = inner


def has_capability(model: nn.Module, name: str) -> bool:
    """Whether `model` (or the model a DDP / torch.compile wrapper holds) declares capability `name`
    (one of `CAPABILITIES`; an unknown name is a ValueError, so a typo cannot silently say no)."""
    if name not in CAPABILITIES:
        raise ValueError(f"unknown model capability {name!r}; known: {', '.join(CAPABILITIES)}")
    return name in getattr(unwrap(model), "capabilities", frozenset())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model.eval()` for the block (no dropout), then the mode it had before, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


__all__ = ["ARCHITECTURES", "BERT", "CAPABILITIES", "EncoderDecoder", "GPT", "KVCache", "ModelConfig", "MoEConfig",
           "build_model", "eval_mode", "has_capability", "unwrap"]
