"""Quantizing a model by module swap, and re-applying a saved quantization at load time.

`quantize_model(model, method)` swaps the model's Linears in place (the model stays a plain
`nn.Module` of its own class, as adapters do); `quant_config(model, method, ...)` is what
`quant_config.json` records; `apply_saved_quant(model, ckpt_dir)` swaps in empty modules of
the same kinds (or casts to fp16/bf16) so that the checkpoint's tensors load by name.

Which Linears: every `nn.Linear` of the model — attention (qkv, q, kv, out), MLPs (gate, up,
down; a Mixture-of-Experts' experts are such MLPs, so each expert's Linears too), BERT's MLM
transform — except the output layer and the small heads, which stay as they are:
`lm_head` (tied to the token embeddings in most presets; untied, it is the most
error-sensitive matrix, and GPTQ/AWQ practice keeps it), a MoE `router` (read as an fp32
weight by the routing), and the task heads `score`, `classifier`, `nsp_head`, `pooler`.
Embeddings and norms stay in their dtype. fp16/bf16 cast every parameter (the fixed
position tables, buffers, stay fp32).

`lm_head=True` quantizes the output layer too, to 8 bits whatever the method (int8 weight-only,
or W8A8 for int8-dynamic; 4-bit output layers err too much): for a small model over a large
vocabulary it is most of the bytes a decode step reads (GPT-2 6x384, vocab 50304: 77 of 120 MB
in fp32). A tied output layer becomes a quantized COPY (`quant_config.json`'s "lm_head" names its
method; the token embedding keeps its fp weights for the lookup), so the checkpoint grows by the
copy's bytes. Checkpoints without the key load as before; an lmforge without this option loads
an int8 / int8-dynamic one with the head right and refuses an int4-method one (its 8-bit head does
not fit the 4-bit module it would build) rather than load it wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.compress.methods import QUANT_METHODS
from lmforge.compress.modules import QUANT_MODULES, Int4Linear, Int8DynamicLinear, Int8Linear
from lmforge.errors import UserError

QUANT_CONFIG = "quant_config.json"
METHODS = QUANT_METHODS
BITS = {"int8": 8, "int8-dynamic": 8, "int4": 4, "gptq": 4, "awq": 4, "fp16": 16, "bf16": 16}
CAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
INT4_METHODS = ("int4", "gptq", "awq")
SKIPPED = ("lm_head", "router", "score", "classifier", "nsp_head", "pooler")  # module names kept as they are
GROUP_SIZES = (32, 64, 128)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"--method {method!r} is not a quantization method; use one of {', '.join(METHODS)}")


def quant_targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linears that quantization replaces (see the module docstring), in model order."""
    return [(name, m) for name, m in model.named_modules()
            if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in SKIPPED]


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANT_MODULES)]


def check_group_size(model: nn.Module, group_size: int) -> None:
    """Every target's in-features must be a multiple of the group size (UserError naming the layer)."""
    widths = {m.in_features for _, m in quant_targets(model)}
    for name, m in quant_targets(model):
        if m.in_features % group_size:
            fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
            hint = f"--group-size {fits[-1]} divides every one" if fits else "no group size of 32, 64, 128 fits"
            raise UserError(f"--group-size {group_size} does not divide {name}'s {m.in_features} input features; "
                            f"{hint} (widths {', '.join(map(str, sorted(widths)))})")


def swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every parameter in `dtype`, in place (tied parameters stay one tensor); buffers (the fixed
    position tables) keep their dtype."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model


def head_method(method: str) -> str:
    """How the output layer is quantized under `method` with lm_head=True (8 bits, see the module doc)."""
    return "int8-dynamic" if method == "int8-dynamic" else "int8"


def quantize_head(model: nn.Module, method: str) -> nn.Module:
    """The model's plain `lm_head` Linear swapped for an 8-bit copy (a tied weight stays the embedding's)."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:
        raise UserError(f"lm_head quantization: this {type(model).__name__} has no plain lm_head Linear")
    cls = Int8DynamicLinear if head_method(method) == "int8-dynamic" else Int8Linear
    swap(model, "lm_head", cls.from_linear(head))
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, *, group_size: int = 128, symmetric: bool = True,
                   calib: list[Tensor] | None = None, lm_head: bool = False, **options: Any) -> nn.Module:
    """Quantize `model` in place by module swap (see the module docstring) and return it.

    gptq and awq need `calib` (token ids (1, T) each, `lmforge.compress.calib.calibration_batches`);
    `options` go to `lmforge.compress.gptq.gptq_model` / `lmforge.compress.awq.awq_model`.
    `lm_head=True` quantizes the output layer too (8-bit; integer methods only)."""
    check_method(method)
    if quantized_modules(model):
        raise UserError("the model is quantized already; quantize the original full-precision checkpoint")
    if method in CAST:
        if lm_head:
            raise UserError(f"--method {method} casts every weight; lm_head quantization is for integer methods")
        return cast_parameters(model, CAST[method])
    model = quantize_linears(model, method, group_size, symmetric, calib, **options)
    return quantize_head(model, method) if lm_head else model


def quantize_linears(model: nn.Module, method: str, group_size: int, symmetric: bool,
                     calib: list[Tensor] | None, **options: Any) -> nn.Module:
    """`quantize_model`'s integer methods on `quant_targets` (not the output layer)."""
    if method in INT4_METHODS:
        check_group_size(model, group_size)
    if method in ("gptq", "awq"):
        if not calib:
            raise UserError(f"--method {method} needs calibration data (token sequences); pass --calib DIR")
        if method == "gptq":
            from lmforge.compress.gptq import gptq_model

            return gptq_model(model, calib, bits=4, group_size=group_size, symmetric=symmetric, **options)
        from lmforge.compress.awq import awq_model

        return awq_model(model, calib, bits=4, group_size=group_size, symmetric=symmetric, **options)
    for name, linear in quant_targets(model):
        if method == "int4":
            swap(model, name, Int4Linear.from_linear(linear, group_size, symmetric))
        else:
            swap(model, name, (Int8Linear if method == "int8" else Int8DynamicLinear).from_linear(linear))
    return model


def quant_config(model: nn.Module, method: str, *, group_size: int | None = None,
                 symmetric: bool = True) -> dict[str, Any]:
    """What `quant_config.json` holds for a model quantized with `method`."""
    int4 = method in INT4_METHODS
    modules = [name for name, _ in quantized_modules(model)]
    config = {"method": method, "bits": BITS[method], "group_size": group_size if int4 else None,
              "symmetric": symmetric if method != "fp16" and method != "bf16" else None,
              "dtype": str(CAST[method]).removeprefix("torch.") if method in CAST else None,
              "modules": modules}
    if "lm_head" in modules:  # only then: checkpoints without it stay byte-identical to before
        config["lm_head"] = head_method(method)
    return config


def check_not_quantized(ckpt_dir: str | Path, action: str) -> None:
    """A UserError if `ckpt_dir` is a quantized checkpoint, for stages that need full-precision
    weights (`action`, e.g. "convert to-hf"): they should be given the original checkpoint."""
    if (Path(ckpt_dir) / QUANT_CONFIG).is_file():
        method = read_quant_config(ckpt_dir)["method"]
        raise UserError(f"{ckpt_dir} is a quantized checkpoint ({method}, {QUANT_CONFIG}); {action} needs "
                        "full-precision weights: use the checkpoint it was quantized from")


def read_quant_config(ckpt_dir: str | Path) -> dict[str, Any]:
    file = Path(ckpt_dir) / QUANT_CONFIG
    try:
        config = json.loads(file.read_text())
        method, modules = config["method"], list(config.get("modules") or [])
    except FileNotFoundError:
        raise UserError(f"{file} is missing; {ckpt_dir} is not a quantized checkpoint") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{file}: not a valid quantization config ({type(e).__name__}: {e}); "
                        "quantize the checkpoint again") from None
    if method not in METHODS:
        raise UserError(f"{file}: unknown method {method!r}; this lmforge knows {', '.join(METHODS)}")
    return {**config, "modules": modules}


def empty_module(method: str, linear: nn.Linear, config: dict[str, Any]) -> nn.Module:
    if method not in METHODS:
        raise UserError(f"{QUANT_CONFIG}: unknown lm_head method {method!r}; this lmforge knows int8, int8-dynamic")
    bias = linear.bias is not None
    if method in INT4_METHODS:
        return Int4Linear(linear.in_features, linear.out_features, int(config["group_size"]), bias,
                          bool(config.get("symmetric", True)))
    cls = Int8Linear if method == "int8" else Int8DynamicLinear
    return cls(linear.in_features, linear.out_features, bias)


def apply_saved_quant(model: nn.Module, ckpt_dir: str | Path) -> nn.Module:
    """The quantization of `ckpt_dir` (its quant_config.json) applied to a freshly built plain model,
    before the checkpoint's tensors are loaded into it: empty quantized modules swapped in by name,
    or every parameter cast to fp16/bf16."""
    config = read_quant_config(ckpt_dir)
    method = config["method"]
    if method in CAST:
        return cast_parameters(model, CAST[method])
    file = Path(ckpt_dir) / QUANT_CONFIG
    for name in config["modules"]:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if type(linear) is not nn.Linear:
            raise UserError(f"{file}: module {name!r} is not a Linear of this model; the checkpoint's "
                            "config.json does not match its quant_config.json")
        module_method = (config.get("lm_head") or method) if name == "lm_head" else method
        swap(model, name, empty_module(module_method, linear, config).to(linear.weight.device))
    return model
