"""Compression of trained checkpoints (`lmforge quantize`; docs/COMPRESS.md).

- `formats`: the quantized tensor formats (RTN codes, scales, zero points, int4 packing);
- `modules`: the quantized Linears (`Int8Linear`, `Int8DynamicLinear`, `Int4Linear`) and their CPU kernels;
- `quantize`: `quantize_model` (module swap), `quant_config`, `apply_saved_quant` (`load_pretrained`'s hook);
- `heldout`: the held-out text a quantized model is measured on (perplexity before/after);
- `run`: the `lmforge quantize` command (a checkpoint dir in, a quantized checkpoint dir out);
- `gptq`, `awq`, `calib`: GPTQ and AWQ, and their calibration data.
"""

from lmforge.compress.formats import dequantize_groups, pack_int4, quantize_groups, unpack_int4
from lmforge.compress.modules import Int4Linear, Int8DynamicLinear, Int8Linear
from lmforge.compress.quantize import METHODS, apply_saved_quant, quant_config, quantize_model

__all__ = ["METHODS", "Int4Linear", "Int8DynamicLinear", "Int8Linear", "apply_saved_quant", "dequantize_groups",
           "pack_int4", "quant_config", "quantize_groups", "quantize_model", "unpack_int4"]
