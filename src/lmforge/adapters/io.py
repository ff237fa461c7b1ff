"""Applying, saving, loading, merging and switching off adapters (`lmforge.adapters`).

The adapter of a run is everything fine-tuning changed: the tensors a method added (LoRA's
`lora_A`/`lora_B`, prefixes, the soft prompt) and the base tensors left trainable (the heads an
objective adds, e.g. a reward model's `score`; with `freeze`, the unfrozen blocks). `save_adapter`
writes them alone (`adapter.safetensors`) with `adapter_config.json`: the method, its options,
the trainable base tensors, the base's path and fingerprint — a hash of the base's frozen
tensors (names, shapes and a sample of values rounded to bf16, so fp32 and bf16 copies of one
base agree). `load_adapter` refuses an adapter whose fingerprint is not the model's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmforge.adapters.freeze import freeze_layers
from lmforge.adapters.lora import LoRALinear, apply_lora, lora_modules, merge_lora
from lmforge.adapters.options import AdapterOptions
from lmforge.adapters.prefix import PrefixAttention, apply_prefix
from lmforge.adapters.prompt import apply_prompt
from lmforge.errors import UserError
from lmforge.fsutil import atomic_dir, atomic_write_json
from lmforge.train.transforms import Transform

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
TRANSFORM_STATE = "transform_state.safetensors"  # what the Checkpointer writes (train.checkpoint)
# tensors that adapters add beside the base's (a QLoRA layer's are LoRALinear's too)
ADDED_SUFFIXES = (".lora_A", ".lora_B", ".prefix_keys", ".prefix_values", "soft_prompt.embeddings")


# ---- applying ---------------------------------------------------------------------------------


def apply_adapter(model: nn.Module, options: AdapterOptions, trainable: Sequence[str] = ()) -> nn.Module:
    """Apply `options.method` to the plain model in place (see `adapter_transform`)."""
    method = options.method
    if method == "qlora":
        from lmforge.adapters.qlora import qlora_transform

        model = qlora_transform(options)(model)
    elif method == "freeze":
        freeze_layers(model, options.freeze_layers)
    elif method == "lora":
        apply_lora(model, options.lora_targets, options.lora_rank, options.lora_alpha, options.lora_dropout)
    elif method == "prefix":
        check_fits_context(model, "prefix_len", options.prefix_len)
        apply_prefix(model, options.prefix_len)
    elif method == "prompt":
        check_fits_context(model, "prompt_len", options.prompt_len)
        apply_prompt(model, options.prompt_len)
    elif method != "full":
        raise UserError(f"adapter.method: unknown method {method!r}")
    keep_trainable(model, trainable)
    return model


def check_fits_context(model: nn.Module, key: str, n: int) -> None:
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    if block_size is not None and n > block_size:
        raise UserError(f"adapter.{key}={n} is longer than the model's context (block_size={block_size}); "
                        f"use at most {block_size}")


def keep_trainable(model: nn.Module, names: Sequence[str]) -> None:
    """Make the named base tensors (or every tensor of a named module) trainable again."""
    params = dict(model.named_parameters())
    for name in names:
        hits = [p for n, p in params.items() if n == name or n.startswith(name + ".")]
        if not hits:
            raise ValueError(f"no parameter or module {name!r} to keep trainable")
        for p in hits:
            p.requires_grad_(True)


def adapter_transform(options: AdapterOptions, trainable: Sequence[str] = ()) -> Transform | None:
    """The model transform of `options.method` (None for `full`), for `pretrain(..., transforms=[...])`.

    It swaps modules in place and freezes the base; `trainable` names base tensors (or modules)
    that stay trainable, e.g. the heads an objective adds (`Objective.new_heads`)."""
    if options.method == "full":
        return None

    def transform(model: nn.Module) -> nn.Module:
        return apply_adapter(model, options, trainable)

    transform.__name__ = f"adapter_{options.method}"
    return transform


# ---- inspecting -------------------------------------------------------------------------------


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied tensor counts once. QLoRA's NF4 base weights are
    buffers, not parameters: they count in the total as the weights they stand for."""
    from lmforge.adapters.qlora import quantized_bytes

    params = list(model.parameters())  # parameters() yields shared ones once
    total = sum(p.numel() for p in params) + quantized_bytes(model)[1]
    return sum(p.numel() for p in params if p.requires_grad), total


def added_names(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict() if k.endswith(ADDED_SUFFIXES)]


def trainable_base_names(model: nn.Module) -> list[str]:
    """Trainable tensors that are not added by an adapter (heads, unfrozen blocks)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith(ADDED_SUFFIXES)]


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors alone: those adapters added and the base tensors left trainable."""
    state = model.state_dict()
    names = set(added_names(model)) | set(trainable_base_names(model))
    return {k: v.detach() for k, v in state.items() if k in names}


def base_fingerprint(state: Mapping[str, Tensor], exclude: Sequence[str] = ()) -> str:
    """A hash of the tensors' names, shapes and a strided sample of their values (as bf16)."""
    digest = hashlib.sha256()
    skip = set(exclude)
    for name in sorted(k for k in state if k not in skip and not k.endswith(ADDED_SUFFIXES)):
        t = state[name].detach()
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        if not t.is_floating_point():
            continue
        flat = t.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024]
        digest.update(sample.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


# ---- saving and loading -----------------------------------------------------------------------


def adapter_config(model: nn.Module, options: AdapterOptions, base: str | Path | None,
                   fingerprint: str | None = None) -> dict:
    """What `adapter_config.json` holds. The fingerprint is taken from the model's frozen base
    tensors unless given (e.g. from the base checkpoint, `base_fingerprint(read_weights(base))`)."""
    trainable = trainable_base_names(model)
    if fingerprint is None:
        fingerprint = base_fingerprint(model.state_dict(), exclude=trainable)
    return {"method": options.method, "options": asdict(options), "trainable": trainable,
            "base": None if base is None else str(base), "base_fingerprint": fingerprint,
            "tensors": sorted(adapter_state(model))}


def write_adapter_config(ckpt_dir: str | Path, model: nn.Module, options: AdapterOptions,
                         base: str | Path | None) -> None:
    """`ckpt_dir/adapter_config.json` (a run's checkpoint dirs: `load_pretrained` re-applies it)."""
    atomic_write_json(Path(ckpt_dir) / ADAPTER_CONFIG, adapter_config(model, options, base))


def save_adapter(out: str | Path, model: nn.Module, options: AdapterOptions, base: str | Path | None) -> Path:
    """`out/adapter.safetensors` (the adapter's tensors alone) and `out/adapter_config.json`, atomically."""
    if options.method == "full":
        raise UserError("adapter.method full has no adapter to save; the checkpoint is the whole model")
    state = {k: v.contiguous().cpu() for k, v in adapter_state(model).items()}
    config = adapter_config(model, options, base)
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS))
        atomic_write_json(tmp / ADAPTER_CONFIG, config)
    return Path(out)


def read_adapter_config(path: str | Path) -> tuple[dict, AdapterOptions]:
    file = Path(path) / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
        known = {f.name for f in fields(AdapterOptions)}
        options = AdapterOptions(**{k: v for k, v in config["options"].items() if k in known})
    except FileNotFoundError:
        raise UserError(f"{file} is missing; {path} is not an adapter dir") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{file}: not a valid adapter config ({type(e).__name__}: {e}); re-save the adapter") from None
    options.check(f"{file}: ")
    return config, options


def read_adapter_tensors(path: Path) -> dict[str, Tensor]:
    for name in (ADAPTER_WEIGHTS, TRANSFORM_STATE):
        if (path / name).exists():
            try:
                return load_file(str(path / name))
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{path / name} is truncated or corrupt ({str(e).splitlines()[0]})") from None
    return {}


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the adapter saved in `path` to the plain base `model` (in place) and load its tensors.

    Refuses (UserError) an adapter saved for another base: its fingerprint must match the model's."""
    path = Path(path)
    config, options = read_adapter_config(path)
    mine = base_fingerprint(model.state_dict(), exclude=config.get("trainable", ()))
    if config.get("base_fingerprint") not in (None, mine):
        raise UserError(f"adapter {path} was saved for base {config.get('base')} (fingerprint "
                        f"{config['base_fingerprint']}), not for this model (fingerprint {mine}); "
                        "load it onto the base it was trained from")
    return load_into(model, path, config, options)


def load_into(model: nn.Module, path: Path, config: dict, options: AdapterOptions) -> nn.Module:
    model = apply_adapter(model, options, config.get("trainable", ()))
    state = read_adapter_tensors(path)
    expected = model.state_dict()
    for key, value in state.items():
        if key not in expected or tuple(expected[key].shape) != tuple(value.shape):
            raise UserError(f"{path}: adapter tensor {key!r} does not fit this model "
                            f"(expected {tuple(expected[key].shape) if key in expected else 'no such tensor'})")
    missing = sorted(set(added_names(model)) - set(state))
    if missing:
        raise UserError(f"{path}: adapter tensor {missing[0]!r} is missing (no {ADAPTER_WEIGHTS} or "
                        f"{TRANSFORM_STATE} holds it); the adapter is incomplete")
    model.load_state_dict(state, strict=False)
    return model


def apply_saved_adapter(model: nn.Module, ckpt_dir: str | Path) -> nn.Module:
    """Re-apply the adapter of a fine-tuning checkpoint dir (`adapter_config.json` beside its
    `model.safetensors`, whose tensors are already in `model`): the method's module swaps, then
    the adapter tensors from `adapter.safetensors` or `transform_state.safetensors`. For `full`
    and `freeze` there is nothing to do (`model.safetensors` is the whole fine-tuned model)."""
    ckpt_dir = Path(ckpt_dir)
    config, options = read_adapter_config(ckpt_dir)
    if options.method in ("full", "freeze"):
        return model
    return load_into(model, ckpt_dir, config, options)


# ---- merging and disabling --------------------------------------------------------------------


def merge_adapters(model: nn.Module) -> nn.Module:
    """The plain model back (in place): every LoRA update folded into its weight.

    Prefix and prompt tuning add attention inputs that no weight can hold: a UserError."""
    if any(isinstance(m, PrefixAttention) for m in model.modules()):
        raise UserError("prefix and prompt adapters cannot be merged into the base weights; use the "
                        "fine-tuned checkpoint as it is (generate/chat/eval load it with its adapter)")
    return merge_lora(model)


def switchable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (LoRALinear, PrefixAttention))]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes what its base computes (LoRA updates and prefixes off).

    A merged LoRA is unmerged for the block and merged again after it."""
    modules = switchable(model)
    before = [m.disabled for m in modules]
    merged = [m for _, m in lora_modules(model) if m.merged]
    for m in merged:
        m.unmerge()
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(modules, before):
            m.disabled = was
        for m in merged:
            m.merge()
