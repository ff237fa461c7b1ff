"""Compression of trained checkpoints (`lmforge quantize`; docs/COMPRESS.md).

- `formats`: the quantized tensor formats (RTN codes, scales, zero points, int4 packing);
- `modules`: the quantized Linears (`Int8Linear`, `Int8DynamicLinear`, `Int4Linear`) and their CPU kernels;
- `quantize`: `quantize_model` (module swap), `quant_config`, `apply_saved_quant` (`load_pretrained`'s hook);
- `heldout`: the held-out text a quantized model is measured on (perplexity before/after);
- `run`: the `lmforge quantize` command (a checkpoint dir in, a quantized checkpoint dir out);
- `gptq`, `awq`, `calib`: GPTQ and AWQ, and their calibration data.
"""

import importlib

# The names below load on first use (PEP 562): importing a light submodule (`heldout`, the argument
# defaults the CLI parser reads) must not import torch, which costs seconds per command.
EXPORTS = {"dequantize_groups": "formats", "pack_int4": "formats", "quantize_groups": "formats",
           "unpack_int4": "formats", "Int4Linear": "modules", "Int8DynamicLinear": "modules",
           "Int8Linear": "modules", "METHODS": "quantize", "apply_saved_quant": "quantize",
           "quant_config": "quantize", "quantize_model": "quantize"}
__all__ = sorted(EXPORTS)


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{EXPORTS[name]}"), name)
