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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model.eval()` for the block (no dropout), then the mode it had before, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


__all__ = ["ARCHITECTURES", "BERT", "EncoderDecoder", "GPT", "KVCache", "ModelConfig", "MoEConfig", "build_model", "eval_mode"]
