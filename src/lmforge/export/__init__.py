"""Export and interchange: Hugging Face conversion both ways (`hf`)."""

from lmforge.export.hf import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]
