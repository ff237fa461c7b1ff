"""Export and interchange: Hugging Face conversion both ways (`hf`), ONNX (`onnx`: `to_onnx`, imported
from `lmforge.export.onnx` so torch.onnx loads only when used)."""

from lmforge.export.hf import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]
