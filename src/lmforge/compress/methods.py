"""The method names of `lmforge quantize` and `lmforge prune`, importable without torch (the CLI parser
lists them as argument choices)."""

QUANT_METHODS = ("int8", "int8-dynamic", "int4", "gptq", "awq", "fp16", "bf16")
PRUNE_METHODS = ("heads", "neurons", "magnitude", "2:4")
