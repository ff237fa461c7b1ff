"""Model transforms: module swaps applied to the plain model from outside, after its weights are
loaded (`--init-from`) and before parallelism and the optimizer (`lmforge.train.setup`).

The hook that LoRA, QLoRA, prefix tuning and quantization use. A transform is a callable
`transform(model) -> model` that swaps modules in place (e.g. replaces each `nn.Linear` of the
attention with a subclass) and returns the model. The contract, checked by `apply_transforms`:
every tensor name of the plain model's state dict is still there with the same shape (a swapped
Linear keeps `weight` and `bias` and adds its own tensors beside them), so checkpoints keep the
layout that `load_pretrained`, `--init-from` and `convert to-hf` read; the tensors a transform
adds are saved in the checkpoint's `transform_state.safetensors` and restored by `--resume`.
Frozen parameters (`requires_grad=False`) get no optimizer state.

Transforms are passed to `pretrain(cfg, out, transforms=[fn, "name", ...])` as callables or
by the names they were registered under (`register_transform`), which a config key can name.
A transform that changes what the model computes (LoRA's update) must fold its tensors into
the base weights before export; convert reads the base tensors only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import nn

from lmforge.errors import UserError

Transform = Callable[[nn.Module], nn.Module]

# name -> transform; filled by `register_transform`
TRANSFORMS: dict[str, Transform] = {}


def register_transform(name: str) -> Callable[[Transform], Transform]:
    """Decorator: make a transform available by name (`pretrain(..., transforms=["name"])`)."""
    def add(fn: Transform) -> Transform:
        if name in TRANSFORMS and TRANSFORMS[name] is not fn:
            raise ValueError(f"model transform {name!r} is already registered ({TRANSFORMS[name]!r})")
        TRANSFORMS[name] = fn
        return fn
    return add


def resolve_transforms(items: Iterable[str | Transform]) -> list[Transform]:
    """Callables as given; names looked up in `TRANSFORMS` (an unknown name is a UserError)."""
    out = []
    for item in items:
        if callable(item):
            out.append(item)
        elif item in TRANSFORMS:
            out.append(TRANSFORMS[item])
        else:
            known = ", ".join(sorted(TRANSFORMS)) or "none registered"
            raise UserError(f"model transform {item!r} is not known; available: {known}")
    return out


def transform_name(fn: Transform) -> str:
    return next((name for name, t in TRANSFORMS.items() if t is fn), getattr(fn, "__name__", repr(fn)))


def apply_transforms(model: nn.Module, transforms: Sequence[str | Transform]) -> nn.Module:
    """Apply the transforms in order; each must keep every tensor name and shape of the model."""
    for fn in resolve_transforms(transforms):
        before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        result = fn(model)
        if not isinstance(result, nn.Module):
            raise TypeError(f"model transform {transform_name(fn)} returned {type(result).__name__}, not the model")
        after = {k: tuple(v.shape) for k, v in result.state_dict().items()}
        lost = sorted(k for k in before if after.get(k) != before[k])
        if lost:
            k = lost[0]
            now = "is gone" if k not in after else f"changed shape {before[k]} -> {after[k]}"
            raise ValueError(f"model transform {transform_name(fn)}: tensor {k!r} {now}; a transform must keep "
                             "the model's tensor names and shapes (add its own tensors beside them)")
        model = result
    return model
