"""The vocabulary every HF mapping is written in: `TensorRule`, `HFArch` and config.json field checks.

Each supported HF `model_type` is an `HFArch` (`registry.py` lists them): how its config.json
becomes our `ModelConfig` and back, and a table of `TensorRule`s pairing each of our tensors with
the HF tensor(s) it is made of. `need_key` and `only_value` read config.json fields for the families'
`config_from_hf`, failing with a one-line `UserError` that names the field and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.errors import UserError
from lmforge.models.config import ModelConfig


@dataclass(frozen=True)
class TensorRule:
    """One of our tensors and the HF tensor(s) it is made of.

    Several `theirs` are concatenated along dim 0 in our layout (Llama's or T5's q/k/v
    projections into our fused `qkv`, T5's cross-attention k/v into our `kv`); `transpose` marks
    GPT-2's Conv1D, which stores weights as (in, out).
    """

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False
    # Non-empty: the rule belongs to this named group of tensors that HF files may lack as a
    # whole (e.g. "MLM head"); from-hf then initializes the group and reports it.
    optional: str = ""
    # More HF names of the one tensor (single-tensor rules): from-hf reads the first name
    # present and ignores the rest, to-hf writes a copy under each (HF BERT's decoder bias).
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class HFArch:
    """How one HF `model_type` maps onto lmforge."""

    model_type: str
    hf_class: str | Callable[[ModelConfig], str]  # config.json `architectures[0]` written by to-hf
    config_from_hf: Callable[[dict[str, Any], str], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    rules: Callable[[ModelConfig], list[TensorRule]]
    base_prefix: str  # the base model's prefix, which files saved from the base class lack
    # HF tensors that are derived buffers, not weights (older files saved them): skipped on read
    derived: re.Pattern[str]
    head_prefixes: tuple[str, ...] = ("lm_head.",)  # HF tensors outside the base model
    tied_head: str = "lm_head.weight"  # the HF name of an output matrix tied to the input embedding
    # Which heads the weights hold (BERT: pooler, NSP, classifier), folded into the config
    heads_from_weights: Callable[[ModelConfig, dict[str, tuple[int, ...]]], None] | None = None

    def class_for(self, c: ModelConfig) -> str:
        return self.hf_class if isinstance(self.hf_class, str) else self.hf_class(c)


# --------------------------------------------------------------------------------------------
# Config helpers


def need_key(hf: dict[str, Any], key: str, where: str) -> Any:
    if hf.get(key) is None:
        raise UserError(f"{where}: required field {key!r} is missing; is this a complete HF config.json?")
    return hf[key]


def only_value(hf: dict[str, Any], key: str, default: Any, allowed: tuple[Any, ...], where: str) -> Any:
    """hf[key] (or default), which must be one of `allowed`: lmforge implements only those."""
    value = hf.get(key, default)
    if value not in allowed:
        raise UserError(f"{where}: {key}={value!r} is not supported; allowed: "
                        f"{', '.join(repr(a) for a in allowed)}")
    return value
