"""Inference: sampling and KV-cached autoregressive generation (token ids or text)."""

from lmforge.infer.generate import generate, generate_text, sample_next

__all__ = ["generate", "generate_text", "sample_next"]
