"""Export and interchange: Hugging Face conversion both ways (`hf`); ONNX later."""

from lmforge.export.hf import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]
