"""Model architectures and the building blocks they share (attention, MLP, norms, positions)."""

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


__all__ = ["ARCHITECTURES", "BERT", "EncoderDecoder", "GPT", "KVCache", "ModelConfig", "MoEConfig", "build_model"]
