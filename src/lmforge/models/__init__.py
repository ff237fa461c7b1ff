"""Model architectures and the building blocks they share (attention, MLP, norms, positions)."""

from lmforge.models.blocks import KVCache
from lmforge.models.config import ModelConfig
from lmforge.models.gpt import GPT

__all__ = ["GPT", "KVCache", "ModelConfig"]
