"""Several LoRA adapters on one base, chosen per row of a batch (`lmforge serve --adapter NAME=DIR`).

    model, tokenizer = load_pretrained("runs/base")
    adapters = serve_adapters(model, {"poet": "runs/ft-poet", "legal": "runs/ft-legal/adapter"})
    engine = Engine(model, before_forward=adapters.set_rows)
    engine.add(prompt_ids, params, tag="poet")      # tag None: the base alone

`serve_adapters` reads each adapter (a LoRA fine-tuning run dir, one of its checkpoint dirs, or an
adapter dir written by `save_adapter`), checks it was trained on this base (the fingerprint of
`adapter_config.json`) and swaps every Linear that any adapter targets, in place, for a
`MultiLoRALinear`: an `nn.Linear` holding the base's own weight and bias Parameters (the state
dict keeps the base layout) and each adapter's A, B and scaling that targets it (adapters may
target different modules and have different ranks). `AdapterSet.set_rows(tags)`, called before
every forward (the Engine's `before_forward`), says which rows use which adapter; each Linear then
computes base(x) and, for each adapter present in the batch, s·B A x[rows] added to those rows
(`index_add_`; the whole batch at once when every row uses one adapter). A row's output is exactly
what `LoRALinear` computes for it. A batch of base rows only costs one Python check per Linear.

Grouping rows per adapter was measured against one batched gather of stacked A/B per row (equal
ranks only) on the demo's Linear shapes on CPU (rank 64, 3 adapters and base rows mixed): the
grouping is faster (decode, 16 rows: 0.4 ms against 1.6 ms per Linear; the gather copies A and B
for every row), and simpler, so it is kept (docs/SERVE.md, "Several LoRA adapters on one base").

Only LoRA serves per row: prefix and prompt adapters change attention inputs, full and freeze
fine-tunes the base weights themselves. A QLoRA adapter is served over the full-precision base
(its update is applied to the unquantized weights, as peft and vLLM serve QLoRA adapters), so its
tokens can differ slightly from its QLoRA model's (whose base went through NF4). An adapter that
targets MoE experts is refused: the experts see routed tokens, not batch rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.adapters.io import (
    ADAPTER_CONFIG,
    base_fingerprint,
    read_adapter_config,
    read_adapter_tensors,
    switchable,
)
from lmforge.adapters.lora import lora_target_names, set_submodule
from lmforge.errors import UserError
from lmforge.models.moe import MoE

SERVABLE = ("lora", "qlora")


class RowGroups:
    """Which rows of the current batch use which adapter, shared by every `MultiLoRALinear` of a
    model: `groups` is ((slot, rows), ...) for the adapters present (rows a 1-D index tensor, or
    None for the whole batch); () when every row uses the base."""

    def __init__(self) -> None:
        self.groups: tuple[tuple[int, Tensor | None], ...] = ()
        self.batch = 0


class LoRAUpdate(nn.Module):
    """One adapter's update of one Linear: s · B A x (A: rank × in, B: out × rank, as buffers)."""

    def __init__(self, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        super().__init__()
        self.register_buffer("lora_A", lora_A, persistent=False)
        self.register_buffer("lora_B", lora_B, persistent=False)
        self.scaling = scaling

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling  # LoRALinear.delta's arithmetic

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scaling={self.scaling}"


class MultiLoRALinear(nn.Linear):
    """A Linear plus several adapters' updates, each applied to the rows `RowGroups` gives it."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, rows: RowGroups) -> MultiLoRALinear:
        """A MultiLoRALinear holding `linear`'s own weight and bias Parameters (no copy), no update yet."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.rows = rows
        new.updates = nn.ModuleDict()  # str(slot) -> LoRAUpdate, registered so .to() moves them
        new.by_slot: list[LoRAUpdate | None] = []
        return new

    def add_update(self, slot: int, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        w = self.weight
        update = LoRAUpdate(lora_A.to(w.device, w.dtype), lora_B.to(w.device, w.dtype), scaling)
        self.updates[str(slot)] = update
        self.by_slot += [None] * (slot + 1 - len(self.by_slot))
        self.by_slot[slot] = update

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        groups = self.rows.groups
        if not groups:
            return out
        if x.shape[0] != self.rows.batch:
            raise RuntimeError(f"MultiLoRALinear: input of {x.shape[0]} rows, but set_rows gave {self.rows.batch} "
                               "tags; call AdapterSet.set_rows with the batch's tags before every forward")
        for slot, rows in groups:
            update = self.by_slot[slot] if slot < len(self.by_slot) else None
            if update is None:
                continue  # this adapter does not target this Linear
            if rows is None:
                out = out + update(x).to(out.dtype)
            else:
                out.index_add_(0, rows, update(x.index_select(0, rows)).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapters={len(self.updates)}"


class AdapterSet:
    """The adapters `serve_adapters` put on a model, by name; `set_rows` picks them per row."""

    def __init__(self, names: Sequence[str], rows: RowGroups, model: nn.Module) -> None:
        self.names = list(names)
        self.slots = {name: i for i, name in enumerate(self.names)}
        self.rows = rows
        self.model = model
        self.tags: list[str | None] | None = None

    def __contains__(self, name: object) -> bool:
        return name in self.slots

    def __len__(self) -> int:
        return len(self.names)

    def set_rows(self, tags: Sequence[str | None]) -> None:
        """Row i of the next forward uses adapter tags[i] (None: the base alone). The Engine's
        `before_forward`. ValueError for a name not served (callers check names first: `in`)."""
        tags = list(tags)
        if tags == self.tags:
            return
        groups = self.groups_of(tags)  # may raise: then nothing changes
        self.tags = tags
        self.rows.groups, self.rows.batch = groups, len(tags)

    def groups_of(self, tags: list[str | None]) -> tuple[tuple[int, Tensor | None], ...]:
        rows_of: dict[int, list[int]] = {}
        for row, tag in enumerate(tags):
            if tag is None:
                continue
            slot = self.slots.get(tag)
            if slot is None:
                raise ValueError(f"no adapter named {tag!r} is served; served: {', '.join(self.names) or 'none'}")
            rows_of.setdefault(slot, []).append(row)
        device = next(self.model.parameters()).device
        return tuple((slot, None if len(rows) == len(tags) else torch.tensor(rows, device=device))
                     for slot, rows in rows_of.items())


# ---- reading adapters -------------------------------------------------------------------------


@dataclass
class LoRAAdapter:
    """One adapter as read from its dir: per targeted Linear, (A, B), and its scaling α/r."""

    name: str
    path: Path
    method: str
    scaling: float
    weights: dict[str, tuple[Tensor, Tensor]]


def adapter_dir(path: str | Path) -> Path:
    """The dir holding `adapter_config.json`: `path` itself (an adapter or checkpoint dir), or a
    run dir's best (else latest) checkpoint."""
    from lmforge.train.checkpoint import resolve_checkpoint

    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        return path
    ckpt = resolve_checkpoint(path)
    if not (ckpt / ADAPTER_CONFIG).is_file():
        raise UserError(f"{ckpt} has no {ADAPTER_CONFIG}: a plain checkpoint, not a LoRA fine-tune; serve it "
                        "with --ckpt, or give a LoRA fine-tuning run dir, its checkpoint dir or its adapter/ dir")
    return ckpt


def read_lora(model: nn.Module, name: str, path: str | Path, fingerprint: str) -> LoRAAdapter:
    """Adapter `name` from `path`, checked against the plain base `model` (whose fingerprint is
    given); any problem is a UserError naming the adapter and its dir."""
    try:
        return read_checked(model, name, adapter_dir(path), fingerprint)
    except UserError as e:
        raise UserError(f"adapter {name}={path}: {e}") from None


def read_checked(model: nn.Module, name: str, path: Path, fingerprint: str) -> LoRAAdapter:
    config, options = read_adapter_config(path)
    method = options.method
    if method not in SERVABLE:
        raise UserError(f"{path} is a {method} fine-tune; only LoRA (and QLoRA) adapters can be served per request: "
                        "serve this model alone with --ckpt")
    if config.get("trainable"):
        raise UserError(f"{path} also trained base tensors ({', '.join(config['trainable'][:3])}), which cannot "
                        "differ per request; serve this model alone with --ckpt")
    if config.get("base_fingerprint") not in (None, fingerprint):
        raise UserError(f"{path} was trained on base {config.get('base')} (fingerprint {config['base_fingerprint']}), "
                        f"not on the served base (fingerprint {fingerprint}); serve it on its own base")
    targets = lora_target_names(model, options.lora_targets)
    experts = {id(m) for moe in model.modules() if isinstance(moe, MoE) for m in moe.experts.modules()}
    inside = next((t for t in targets if id(model.get_submodule(t)) in experts), None)
    if inside is not None:
        raise UserError(f"{path} adapts the MoE expert Linear {inside!r}: experts see routed tokens, not batch rows, "
                        "so it cannot be served per request; serve this model alone with --ckpt")
    tensors = read_adapter_tensors(path)
    weights = {}
    for target in targets:
        linear = model.get_submodule(target)
        a, b = tensors.get(f"{target}.lora_A"), tensors.get(f"{target}.lora_B")
        rank = options.lora_rank
        if a is None or b is None:
            raise UserError(f"{path}: adapter tensor {target}.lora_A/lora_B is missing; the adapter is incomplete")
        if tuple(a.shape) != (rank, linear.in_features) or tuple(b.shape) != (linear.out_features, rank):
            raise UserError(f"{path}: {target}.lora_A/lora_B have shapes {tuple(a.shape)}/{tuple(b.shape)}, not "
                            f"{(rank, linear.in_features)}/{(linear.out_features, rank)}; the adapter does not fit")
        weights[target] = (a, b)
    return LoRAAdapter(name, path, method, options.lora_alpha / options.lora_rank, weights)


# ---- serving ----------------------------------------------------------------------------------


def serve_adapters(model: nn.Module, adapters: Mapping[str, str | Path]) -> AdapterSet:
    """Put the LoRA adapters {name: dir} on the plain base `model` (in place), all at once, each
    selectable per row with `AdapterSet.set_rows`. UserError (naming the adapter and its dir) for
    a dir that is not a LoRA adapter, an adapter for another base, or a model that is not plain."""
    check_plain(model)
    for name in adapters:
        if not isinstance(name, str) or not name:
            raise UserError(f"adapter name {name!r}: give a non-empty name (--adapter NAME=DIR)")
    fingerprint = base_fingerprint(model.state_dict())
    read = [read_lora(model, name, path, fingerprint) for name, path in adapters.items()]
    rows = RowGroups()
    for slot, adapter in enumerate(read):
        for target, (a, b) in adapter.weights.items():
            layer = model.get_submodule(target)
            if not isinstance(layer, MultiLoRALinear):
                layer = MultiLoRALinear.from_linear(layer, rows)
                set_submodule(model, target, layer)
            layer.add_update(slot, a, b, adapter.scaling)
    return AdapterSet([a.name for a in read], rows, model)


def check_plain(model: nn.Module) -> None:
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        raise UserError("this model serves adapters already; give every adapter in one serve_adapters call")
    if switchable(model):
        raise UserError("the served checkpoint carries an adapter itself; serve its base with --ckpt BASE and this "
                        "fine-tune as --adapter NAME=DIR")
