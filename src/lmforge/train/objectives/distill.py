"""Knowledge distillation: `objective: distill`, section `distill`, on the pretraining data (`data.tokens`).

A student (any GPT recipe) learns next-token prediction from a frozen teacher's soft targets
(Hinton et al. 2015) mixed with the hard labels:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels)
           [+ hidden_weight * MSE(student hidden states, teacher hidden states)]

The KL is summed over the vocabulary and averaged over the target tokens (those not -100), as
trl's `GKDTrainer.generalized_jsd_loss` with beta=0 does; T^2 keeps the soft targets' gradient
on the scale of the hard labels' as T grows. `kd_loss`, `ce_loss` (and `hidden_loss`) of each
step go to metrics.jsonl. The val loss is the student's plain cross-entropy, so a distilled run
and the same student trained from scratch (`objective: clm`) are compared on the same number.

Hidden-state matching (`hidden_weight > 0`) needs equal widths (the student's `model.n_embd`
equal to the teacher's; no projection is learned): student block i (of Ls) is matched to
teacher block (i + 1) * Lt // Ls - 1 (of Lt), so the last blocks meet; the MSE of their outputs
(the residual stream) is averaged over the mapped blocks and the target positions.

The teacher is `models={"teacher": ...}` (`Objective.needs_models`; `lmforge distill` loads it,
`lmforge.compress.distill`): frozen, in eval mode, on the student's device, never wrapped for
DDP/FSDP (each process holds a replica) and never saved in the run's checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.models import unwrap
from lmforge.train.objectives.base import Batch, CausalLM


@dataclass
class DistillOptions:
    teacher: str = ""  # the teacher checkpoint (a checkpoint or run dir); `lmforge distill --teacher DIR`
    temperature: float = 2.0  # T: both distributions are softmax(logits / T)
    alpha: float = 0.5  # weight of the soft-target loss; 1 - alpha goes to the hard labels' cross-entropy
    hidden_weight: float = 0.0  # > 0: add this times the hidden-state MSE (needs the teacher's width)

    def check(self, where: str) -> None:
        if not self.temperature > 0:
            raise UserError(f"{where}config key distill.temperature: must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise UserError(f"{where}config key distill.alpha: must be in [0, 1], got {self.alpha}")
        if not self.hidden_weight >= 0:
            raise UserError(f"{where}config key distill.hidden_weight: must be >= 0, got {self.hidden_weight}")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over the vocabulary and
    averaged over the positions whose target is not -100 (in fp32)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(dim=-1)
    keep = targets != -100
    return per_token[keep].sum() / keep.sum().clamp(min=1) * temperature ** 2


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher block each student block is matched to: (i + 1) * Lt // Ls - 1."""
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers)]


def hidden_mse(student: list[Tensor], teacher: list[Tensor], targets: Tensor) -> Tensor:
    """Mean squared error of matched hidden states (B, T, C) at the positions whose target is not -100,
    averaged over the pairs."""
    keep = targets != -100
    losses = [F.mse_loss(s.float()[keep], t.float()[keep]) for s, t in zip(student, teacher, strict=True)]
    return torch.stack(losses).mean()


@contextlib.contextmanager
def block_outputs(model: nn.Module, layers: list[int]) -> Iterator[dict[int, Tensor]]:
    """The outputs of `model`'s blocks `layers` in the forwards run inside the block (hooks, so a
    DDP/FSDP-wrapped model's own forward runs as it is)."""
    outputs: dict[int, Tensor] = {}
    blocks = unwrap(model).blocks
    handles = [blocks[i].register_forward_hook(lambda module, args, out, i=i: outputs.__setitem__(i, out))
               for i in dict.fromkeys(layers)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def check_teacher(teacher_config: dict[str, Any], student_config: Any, opts: DistillOptions,
                  where: str = "the teacher") -> None:
    """Refuse a teacher this student cannot learn from (one line each): not a GPT, a shorter
    context than the student's, hidden matching across different widths."""
    arch = teacher_config.get("arch", "gpt")
    if arch != "gpt":
        raise UserError(f"{where} is a model.arch={arch} checkpoint; distillation needs a causal LM teacher (gpt)")
    if teacher_config.get("block_size", 0) < student_config.block_size:
        raise UserError(f"{where} has block_size {teacher_config.get('block_size')}, shorter than the student's "
                        f"model.block_size={student_config.block_size}; set model.block_size <= "
                        f"{teacher_config.get('block_size')}")
    if opts.hidden_weight > 0 and teacher_config.get("n_embd") != student_config.n_embd:
        raise UserError(f"distill.hidden_weight={opts.hidden_weight} matches hidden states, which needs the "
                        f"student's model.n_embd ({student_config.n_embd}) to equal the teacher's "
                        f"({teacher_config.get('n_embd')}); set distill.hidden_weight=0 or model.n_embd to theirs")


class Distill(CausalLM):
    """Next-token prediction against a frozen teacher's soft targets (see the module doc)."""

    name, Options = "distill", DistillOptions
    needs_models = ("teacher",)

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any, models: dict | None = None) -> None:
        if "teacher" not in (models or {}):
            raise UserError("objective distill trains against a teacher model, which `lmforge distill --teacher DIR "
                            "CONFIG` loads; run that command instead of pretrain")
        super().__init__(cfg, tokenizer, model_config, models)
        self.opts: DistillOptions = cfg.distill
        self.teacher: nn.Module = self.models["teacher"].requires_grad_(False).eval()
        teacher_config = unwrap(self.teacher).config
        check_teacher(teacher_config.to_dict(), model_config, self.opts)
        self.layers = (layer_map(model_config.n_layer, teacher_config.n_layer)
                       if self.opts.hidden_weight > 0 else [])
        self._sums: dict[str, float] = {}
        self._count, self._device = 0, torch.device("cpu")

    def flops_per_token(self, model: nn.Module) -> float:
        """The student's training FLOPs plus the teacher's forward (a third of its training FLOPs)."""
        block = self.model_config.block_size
        return super().flops_per_token(model) + unwrap(self.teacher).flops_per_token(block) / 3

    @torch.no_grad()
    def teacher_pass(self, input_ids: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The teacher's logits (and its matched blocks' outputs) for `input_ids`."""
        teacher = self.teacher
        if next(teacher.parameters()).device != input_ids.device:
            teacher.to(input_ids.device)  # once: `lmforge distill` loads it on the student's device
        with block_outputs(teacher, self.layers) as hidden:
            logits = teacher(input_ids)[0]
        return logits, [hidden[j] for j in self.layers]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        ids, targets = batch["input_ids"], batch["targets"]
        with block_outputs(model, list(range(len(self.layers)))) as hidden:
            logits, ce = model(ids, targets)
        teacher_logits, teacher_hidden = self.teacher_pass(ids)
        if teacher_logits.size(-1) != logits.size(-1):  # differently padded vocabularies: the real tokens
            vocab = self.tokenizer.vocab_size
            logits, teacher_logits = logits[..., :vocab], teacher_logits[..., :vocab]
        kd = kd_loss(logits, teacher_logits, targets, self.opts.temperature)
        loss = self.opts.alpha * kd + (1 - self.opts.alpha) * ce
        parts = {"kd_loss": kd, "ce_loss": ce}
        if self.layers:
            mse = hidden_mse([hidden[i] for i in range(len(self.layers))], teacher_hidden, targets)
            loss = loss + self.opts.hidden_weight * mse
            parts["hidden_loss"] = mse
        if model.training:
            self._device = ids.device
            for key, value in parts.items():
                self._sums[key] = self._sums.get(key, 0.0) + float(value.detach())
            self._count += 1
        return loss

    def eval_loss(self, model: nn.Module, batch: Batch, index: int) -> Tensor:
        """The student's plain cross-entropy: comparable with a run trained from scratch."""
        return model(batch["input_ids"], batch["targets"])[1]

    def step_metrics(self) -> dict[str, float]:
        """kd_loss, ce_loss (hidden_loss) averaged over the step's micro-batches and, under torchrun,
        over the processes (every process calls this once per step), then reset."""
        if not self._count:
            return {}
        keys = sorted(self._sums)
        means = torch.tensor([self._sums[k] / self._count for k in keys], dtype=torch.float64, device=self._device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(means)
            means /= torch.distributed.get_world_size()
        self._sums, self._count = {}, 0
        return {k: round(float(v), 6) for k, v in zip(keys, means.tolist(), strict=True)}
