"""The `adapter` config section: which fine-tuning method, and its knobs (`lmforge.adapters`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import UserError

METHODS = ("full", "freeze", "lora", "qlora", "prefix", "prompt")

# every Linear inside the blocks' attention (self- and cross-attention) and MLP (each MoE expert's;
# not the router): every linear layer, as the QLoRA paper recommends; the same on every family
DEFAULT_LORA_TARGETS = ("*attn", "mlp")


@dataclass
class AdapterOptions:
    """`adapter.*`: method full|freeze|lora|qlora|prefix|prompt and their settings.

    `lora_targets` are module-name patterns (shell globs, `fnmatch`): a pattern matches a module
    whose full dotted name it matches, or whose name ends with `.` + the pattern — so `qkv`
    matches `blocks.0.attn.qkv` and `blocks.1.*` every Linear of block 1. A matched Linear is
    adapted; a matched other module (`attn`, `mlp`) has every Linear inside it adapted (an MoE
    router excepted). A pattern that selects no Linear is an error naming it
    (`lmforge.adapters.lora.lora_target_names`).
    """

    method: str = "full"
    freeze_layers: int = 0  # freeze: the embeddings and this many first blocks are frozen
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the LoRA branch's input
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    prefix_len: int = 16  # prefix: learned key/value positions per layer
    prompt_len: int = 16  # prompt: learned soft-prompt embeddings
    nf4_block: int = 64  # qlora: weights per absmax scale
    nf4_double_quant: bool = True  # qlora: quantize the absmax scales too (8 bits, blocks of 256)

    def check(self, where: str) -> None:
        key = f"{where}config key adapter."
        if self.method not in METHODS:
            raise UserError(f"{key}method: {self.method!r} is not one of {', '.join(METHODS)}")
        if not isinstance(self.freeze_layers, int) or self.freeze_layers < 0:
            raise UserError(f"{key}freeze_layers: must be an integer >= 0, got {self.freeze_layers!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank <= 0:
            raise UserError(f"{key}lora_rank: must be a positive integer, got {self.lora_rank!r}")
        if not self.lora_alpha > 0:
            raise UserError(f"{key}lora_alpha: must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"{key}lora_dropout: must be in [0, 1), got {self.lora_dropout!r}")
        targets = self.lora_targets
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise UserError(f"{key}lora_targets: must be a non-empty list of module-name patterns, got {targets!r}")
        for name in ("prefix_len", "prompt_len", "nf4_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"{key}{name}: must be a positive integer, got {value!r}")
        if self.nf4_block % 2:
            raise UserError(f"{key}nf4_block: must be even (two 4-bit codes per byte), got {self.nf4_block}")
