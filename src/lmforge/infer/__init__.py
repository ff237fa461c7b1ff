"""Inference: sampling and KV-cached autoregressive generation (token ids or text), one prompt or a batch."""

from lmforge.infer.generate import (
    generate,
    generate_batch,
    generate_text,
    generate_texts,
    sample_next,
)

__all__ = ["generate", "generate_batch", "generate_text", "generate_texts", "sample_next"]
