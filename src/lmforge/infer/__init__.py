"""Inference: the generation engine (continuous batching, step API) and the generate functions over it."""

from lmforge.infer.detok import TextStream
from lmforge.infer.engine import Engine, Event, SamplingParams
from lmforge.infer.generate import (
    generate,
    generate_batch,
    generate_text,
    generate_texts,
    sample_next,
)

__all__ = ["Engine", "Event", "SamplingParams", "TextStream", "generate", "generate_batch", "generate_text",
           "generate_texts", "sample_next"]
