"""`lmforge plan`: the sizing arithmetic of a training run, before running it.

For a config: parameters (exact, and the 12·L·d² rule of thumb; active vs total for MoE),
training FLOPs per token, training memory per device (weights, gradients, AdamW state,
activations) for fp32 and bf16-mixed, with and without activation checkpointing, FSDP-sharded
over G GPUs, LoRA and QLoRA fine-tuning, the compute-optimal token budget (Chinchilla: ~20
tokens per parameter) and the wall time on a given GPU type, count and MFU.

The parts (their public names are importable from `lmforge.plan` itself):

- `lmforge.plan.params`: parameters (exact counts and the rule of thumb) and training FLOPs;
- `lmforge.plan.lora`: LoRA and QLoRA setups, their trainable parameters and the bytes of the
  frozen base model;
- `lmforge.plan.memory`: training memory per device (weights, gradients, AdamW state and
  activations tensor by tensor) and its peak;
- `lmforge.plan.report`: the plan of a config as data (`plan`, what `--json` prints) and as a
  table (`format_plan`), with the token budget and wall time.
"""

from lmforge.plan.lora import (
    DEFAULT_LORA_TARGETS,
    DQ_BLOCK,
    LORA_GROUPS,
    LORA_TARGETS,
    NF4_BLOCK,
    NF4_TENSOR_CONSTANTS,
    LoRA,
    frozen_base_bytes,
    lora_params,
    nf4_bytes,
)
from lmforge.plan.memory import (
    ADAMW_STATE_BYTES,
    MOE_PADDING,
    PRECISIONS,
    Precision,
    Stack,
    activation_memory,
    attention_kernel,
    block_activation_bytes,
    objective_lengths,
    stacks,
    training_memory,
)
from lmforge.plan.params import (
    block_linears,
    block_params,
    count_params,
    count_params_built,
    flops_per_token,
    mlp_params,
    n_blocks,
)
from lmforge.plan.report import (
    CHINCHILLA_TOKENS_PER_PARAM,
    DEFAULT_VOCAB,
    GPU_MEMORY_GIB,
    format_plan,
    plan,
)

__all__ = [
    "ADAMW_STATE_BYTES", "CHINCHILLA_TOKENS_PER_PARAM", "DEFAULT_LORA_TARGETS", "DEFAULT_VOCAB", "DQ_BLOCK",
    "GPU_MEMORY_GIB", "LORA_GROUPS", "LORA_TARGETS", "MOE_PADDING", "NF4_BLOCK", "NF4_TENSOR_CONSTANTS",
    "PRECISIONS", "LoRA", "Precision", "Stack", "activation_memory", "attention_kernel", "block_activation_bytes",
    "block_linears", "block_params", "count_params", "count_params_built", "flops_per_token", "format_plan",
    "frozen_base_bytes", "lora_params", "mlp_params", "n_blocks", "nf4_bytes", "objective_lengths", "plan",
    "stacks", "training_memory",
]
