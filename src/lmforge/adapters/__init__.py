"""Parameter-efficient fine-tuning, applied to a plain model from outside by module swap.

Methods (`adapter.method`): `full` (nothing to do), `freeze` (embeddings and the first k blocks
frozen), `lora` (low-rank updates on targeted Linears, `lmforge.adapters.lora`), `qlora` (LoRA
over NF4 base weights, `lmforge.adapters.qlora`), `prefix` (trained per-layer key/value
prefixes, `lmforge.adapters.prefix`) and `prompt` (a trained soft prompt,
`lmforge.adapters.prompt`). Saving, loading, merging and disabling: `lmforge.adapters.io`.
See docs/POSTTRAIN.md, section "Adapters".
"""

from lmforge.adapters.io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_config,
    adapter_state,
    adapter_transform,
    adapters_disabled,
    apply_adapter,
    apply_saved_adapter,
    base_fingerprint,
    load_adapter,
    merge_adapters,
    read_adapter_config,
    save_adapter,
    trainable_counts,
    write_adapter_config,
)
from lmforge.adapters.lora import LoRALinear, apply_lora, lora_target_names
from lmforge.adapters.options import DEFAULT_LORA_TARGETS, METHODS, AdapterOptions

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "DEFAULT_LORA_TARGETS", "METHODS", "AdapterOptions", "LoRALinear",
           "adapter_config", "adapter_state", "adapter_transform", "adapters_disabled", "apply_adapter",
           "apply_lora", "apply_saved_adapter", "base_fingerprint", "load_adapter", "lora_target_names",
           "merge_adapters", "read_adapter_config", "save_adapter", "trainable_counts", "write_adapter_config"]
