"""Parameter-efficient fine-tuning, applied to a plain model from outside by module swap.

Methods (`adapter.method`): `full` (nothing to do), `freeze` (embeddings and the first k blocks
frozen), `lora` (low-rank updates on targeted Linears), `qlora` (LoRA over NF4 base weights,
`lmforge.adapters.qlora`), `prefix` (learned per-layer key/value prefixes) and `prompt` (learned
soft-prompt embeddings). See docs/POSTTRAIN.md, section "Adapters".
"""

from lmforge.adapters.options import METHODS, AdapterOptions

__all__ = ["METHODS", "AdapterOptions"]
