"""`Objective`: what every training objective owns, and the defaults (next-token prediction).

An objective owns everything about itself that the rest of lmforge needs to know:

- its config section (`Options`, a dataclass: `mlm.mask_prob`, `span.noise_density`, ...), whose
  `check(where)` validates the values when the config is loaded (`lmforge.config`);
- which models it trains (`check(model_config)`, asked by training and by `lmforge plan`) and
  what it changes in the model config (`configure_model`: MLM's NSP head);
- the special tokens it needs (`extra_tokens`, appended to the run's tokenizer);
- the shape of one example (`lengths`: positions through the encoder or only stack, and
  through the decoder), its FLOPs (`model_flops`) and its memory factors: how many passes of
  each example go through the model (`views`) and what the model computes at its end
  (`output`: "logits" through the LM head, or "embeddings", sentence vectors without it). The
  training loop's MFU and `lmforge plan` ask these same methods;
- how a batch is cut from the data (`source`, `make_batch`, `global_batch`) and its loss.

Every objective keeps the loop's contract that a batch is a pure function of (seed, step): the
windows and every random choice come from one numpy generator seeded by `(seed, step)` over the
*global* batch, and each process takes its rows. Resume stays exact and N processes see what
one process sees. Models are called by the conventions in each objective's `loss` (all return
`(logits, loss)`); the objective never reaches into a model's internals, so DDP/FSDP wrappers,
whose hooks run only through `forward`, keep working.

New heads: an objective whose `configure_model` adds a head to a pretrained model (a reward
model's scalar head) names its tensors in `new_heads`; a run that starts from a checkpoint
without them (`--init-from`, `lmforge align --base`) initializes them fresh instead of refusing
the checkpoint, and the model config keys `configure_model` changes may differ from the
checkpoint's.

Extra models: an objective that needs more than the model it trains (DPO's frozen reference, a
reward model for PPO) names them in `needs_models`; the setup pipeline builds/loads them and
passes them in as `models={"reference": ...}` (`self.models`). They are not trained, not wrapped
for DDP/FSDP and not saved in the run's checkpoints. `step_metrics()` returns extra numbers of
the last step for `metrics.jsonl` (e.g. DPO's reward margin).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.train.batches import TokenBatches

Batch = dict[str, Tensor]
EVAL_STREAM = 1 << 40  # generator stream of the fixed eval batches, far from any training step
TOKENS_UNSET = "data.tokens is not set; point it at a dir from `lmforge tokenize` (--set data.tokens=DIR)"


class Objective:
    """Base: next-token prediction on `TokenBatches` windows; subclasses override what differs."""

    name: ClassVar[str] = "clm"
    arch: ClassVar[str] = "gpt"  # the model family the objective trains
    Options: ClassVar[type | None] = None  # the dataclass of its config section `cfg.<name>`, if any
    extra_tokens: ClassVar[tuple[str, ...]] = ()  # tokens the tokenizer must have (added if missing)
    uses_all_parameters: ClassVar[bool] = True  # False: some parameters get no gradient (DDP must look)
    views: ClassVar[int] = 1  # passes of each example through the model per step
    output: ClassVar[str] = "logits"  # "logits" (the LM head runs) or "embeddings" (sentence vectors)
    needs_models: ClassVar[tuple[str, ...]] = ()  # extra models the objective reads (not trained)
    # tensors the objective adds to the model (its `configure_model`: e.g. a reward model's scalar
    # head `score.weight`) that an --init-from checkpoint may lack: freshly initialized, not refused
    new_heads: ClassVar[tuple[str, ...]] = ()

    # ---- what the objective is, without data: training and `lmforge plan` both ask ------------

    @classmethod
    def check(cls, model_config: Any) -> None:
        """Refuse a model this objective cannot train."""
        if model_config.arch != cls.arch:
            raise UserError(f"objective {cls.name} trains model.arch={cls.arch}, "
                            f"but model.arch is {model_config.arch}; change one of them")

    @classmethod
    def configure_model(cls, cfg: Any, model_config: Any) -> None:
        """Adjust the model config the objective needs (e.g. MLM's NSP head); the run's config too."""

    @classmethod
    def lengths(cls, cfg: Any, block_size: int) -> tuple[int, int | None]:
        """Positions of one example: (encoder or only stack, decoder or None)."""
        return block_size, None

    @classmethod
    def model_flops(cls, model: nn.Module, seq_len: int, decoder_len: int | None) -> float:
        """Training FLOPs per (encoder) token of one example of these lengths through `model`."""
        lengths = (seq_len,) if decoder_len is None else (seq_len, decoder_len)
        return float(model.flops_per_token(*lengths))

    # ---- a run's objective ---------------------------------------------------------------

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any,
                 models: dict[str, nn.Module] | None = None) -> None:
        self.cfg, self.tokenizer, self.model_config = cfg, tokenizer, model_config
        self.models = dict(models or {})
        missing = [m for m in self.needs_models if m not in self.models]
        if missing:
            raise UserError(f"objective {self.name} needs the model(s) {', '.join(missing)}")

    @property
    def options(self) -> Any:
        """This objective's config section (`cfg.<name>`)."""
        return getattr(self.cfg, self.name)

    def step_metrics(self) -> dict[str, float]:
        """Extra numbers of the last loss call for the step's `metrics.jsonl` line; none by default."""
        return {}

    def flops_per_token(self, model: nn.Module) -> float:
        """Training FLOPs per token as a step counts tokens (block_size per example), for MFU:
        the FLOPs of one example (`lengths`) spread over block_size tokens."""
        block = self.model_config.block_size
        seq_len, decoder_len = self.lengths(self.cfg, block)
        return self.model_flops(model, seq_len, decoder_len) * seq_len / block

    # ---- data -------------------------------------------------------------------------

    def window_length(self, block_size: int) -> int:
        """How many raw tokens one example consumes (clm: block_size inputs + 1 shifted target)."""
        return block_size + 1

    def source(self, tokens_dir: Any, split: str) -> TokenBatches:
        if tokens_dir is None:  # a run started from a checkpoint has its tokenizer, not its data
            raise UserError(TOKENS_UNSET)
        return TokenBatches(tokens_dir, split, self.window_length(self.model_config.block_size) - 1)

    def make_batch(self, windows: np.ndarray, rng: np.random.Generator, source: TokenBatches) -> Batch:
        return {"input_ids": torch.from_numpy(windows[:, :-1]), "targets": torch.from_numpy(windows[:, 1:])}

    def global_batch(self, source: TokenBatches, seed: int, step: int, rows: int) -> Batch:
        rng = np.random.default_rng([seed, step])
        return self.make_batch(source.windows(rng, rows), rng, source)

    def batch_for(self, source: TokenBatches, seed: int, step: int, batch_size: int, grad_accum: int,
                  rank: int, world_size: int) -> list[Batch]:
        """This process's micro-batches of optimizer step `step` (its rows of the global batch)."""
        batch = self.global_batch(source, seed, step, batch_size * grad_accum * world_size)
        per_rank = batch_size * grad_accum
        lo = rank * per_rank
        return [{k: v[lo + i:lo + i + batch_size] for k, v in batch.items()}
                for i in range(0, per_rank, batch_size)]

    def eval_batches(self, source: TokenBatches, seed: int, eval_steps: int, batch_size: int, rank: int,
                     world_size: int) -> Iterator[Batch]:
        """Fixed batches (the same at every eval, so losses are comparable across steps)."""
        for i in range(eval_steps):
            yield from self.batch_for(source, seed, EVAL_STREAM + i, batch_size, 1, rank, world_size)

    # ---- loss ---------------------------------------------------------------------------

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["input_ids"], batch["targets"])[1]

    def eval_loss(self, model: nn.Module, batch: Batch, index: int) -> Tensor:
        return self.loss(model, batch)


class CausalLM(Objective):
    """Next-token prediction (GPT): inputs are a window, targets the same window shifted by one."""
