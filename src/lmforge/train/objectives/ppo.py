"""PPO-RLHF (InstructGPT-style): `objective: ppo`, section `ppo`; the math as public functions.

The rollout loop is `lmforge.posttrain.ppo.train_ppo` (the setup pipeline's second loop): it
samples replies to prompts with the generation engine, scores them with the reward model and
the frozen reference (the same base with its adapters disabled), and turns them into a batch
of tensors; this module owns what happens to such a batch:

- `adaptive_kl_coef`: the KL coefficient after a rollout batch, when it adapts to a target KL;
- `kl_rewards`: per-token rewards, -kl_coef * (log pi(a_t) - log pi_ref(a_t)) at every reply
  token, plus the reward model's score at the reply's last token;
- `gae`: generalized advantage estimation (Schulman et al. 2016) over the reply tokens, and
  the returns (advantages + values) the value head regresses on;
- `whiten`: advantages shifted and scaled to mean 0, variance 1 over the reply tokens;
- `policy_loss`: the clipped surrogate (Schulman et al. 2017) and its clip fraction;
- `value_loss`: the squared error, clipped around the rollout's values, and its clip fraction;
- `entropy`: the policy's mean per-token entropy.

Tensors are (B, T) over the positions of a right-padded batch: position t holds the action
(token) `input_ids[:, t + 1]`, chosen from the model's output at position t; `mask` is 1 on the
reply's tokens and 0 on the prompt and the padding. Means are over the masked positions of
the whole batch (one token, one vote), as in `trl`.

The value head is the model's scalar head (`GPT.score`, `model.num_labels = 1`) on the policy
itself: V(s_t) = score(norm(h_t)), read from the same forward as the logits (see
`logits_and_values`). See docs/POSTTRAIN.md ("## PPO") for why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.models import unwrap
from lmforge.train.objectives.base import Batch, Objective


@dataclass
class PPOOptions:
    kl_coef: float = 0.05  # beta of the per-token KL penalty against the reference (the start, when adaptive)
    kl_target: float = 0.0  # > 0: beta adapts to keep the rollout KL (nats per reply) near it (Ziegler et al.)
    kl_horizon: int = 160  # adaptive beta: replies over which a 20% KL error changes beta by 20%
    clip_range: float = 0.2  # epsilon of the clipped surrogate: ratios outside 1 +- eps get no gradient
    value_clip: float = 0.2  # the value update is clipped to +- this around the rollout's values (0: no clip)
    value_coef: float = 0.1  # weight of the value loss in the total loss
    entropy_coef: float = 0.0  # weight of an entropy bonus (0: none, as InstructGPT)
    gamma: float = 1.0  # discount over reply tokens
    lam: float = 0.95  # GAE lambda
    ppo_epochs: int = 4  # passes over each rollout batch
    rollout_batch: int = 16  # prompts per rollout (one training step)
    minibatch: int = 4  # replies per optimizer update (rollout_batch must be a multiple)
    max_new_tokens: int = 32  # reply length limit
    temperature: float = 1.0  # sampling temperature (the log-probabilities use the same one)
    whiten_advantages: bool = True  # advantages to mean 0, variance 1 over each rollout batch
    stop_penalty: float = 0.0  # subtracted from the score of a reply that did not end by itself
    eval_prompts: int = 32  # held-out prompts scored at each evaluation (0: all)

    def check(self, where: str) -> None:
        def bad(key: str, need: str) -> UserError:
            return UserError(f"{where}config key ppo.{key}: must be {need}, got {getattr(self, key)}")

        for key in ("ppo_epochs", "rollout_batch", "minibatch", "max_new_tokens", "kl_horizon"):
            if getattr(self, key) < 1:
                raise bad(key, ">= 1")
        for key in ("kl_coef", "kl_target", "value_clip", "value_coef", "entropy_coef", "stop_penalty", "eval_prompts"):
            if getattr(self, key) < 0:
                raise bad(key, ">= 0")
        if self.clip_range <= 0:
            raise bad("clip_range", "> 0")
        if self.temperature <= 0:
            raise bad("temperature", "> 0 (PPO samples; greedy replies have no log-probabilities to ratio)")
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:
                raise bad(key, "in [0, 1]")
        if self.kl_target > 0 and self.kl_coef <= 0:
            raise bad("kl_coef", "> 0 when ppo.kl_target is set (the adaptive coefficient scales it)")
        if self.rollout_batch % self.minibatch:
            raise UserError(f"{where}config key ppo.minibatch: {self.minibatch} does not divide "
                            f"ppo.rollout_batch={self.rollout_batch}; pick a divisor")


# ---- the math ---------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the positions where mask is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """x shifted to mean 0 and scaled to variance 1 over the masked positions (the variance with
    Bessel's correction, as `trl`'s `masked_whiten`); 0 outside the mask."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = (((x - mean) ** 2) * mask).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def adaptive_kl_coef(coef: float, kl: float, target: float, replies: int, horizon: int) -> float:
    """The adaptive KL coefficient (Ziegler et al. 2019, as `trl`'s AdaptiveKLController): after a
    batch of `replies` whose mean KL (nats per reply) is `kl`, beta *= 1 + e * replies / horizon,
    e = clip(kl / target - 1, -0.2, 0.2); `target` <= 0: beta stays."""
    if target <= 0:
        return coef
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * replies / horizon)


def kl_rewards(logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor, mask: Tensor,
               kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards and per-token KL estimates (log pi - log pi_ref) of a rollout batch.

    rewards[b, t] = -kl_coef * kl[b, t] on reply tokens, plus scores[b] at row b's last masked
    position; 0 outside the mask. scores: (B,) the reward model's score of each full sequence.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = last_index(mask)
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def last_index(mask: Tensor) -> Tensor:
    """(B,) the last position where each row's mask is 1 (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, torch.zeros_like(positions)).amax(dim=1)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns by generalized advantage estimation, over each row's masked span.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where the
    value and advantage after a row's last reply token are 0 (the episode ends there). Returns
    (advantages, returns = advantages + values), both 0 outside the mask.
    """
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, device=rewards.device)
    next_advantage = torch.zeros(B, device=rewards.device)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        # what position t - 1 sees as "next": this position if it is a reply token, else nothing
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantage
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float) -> tuple[Tensor, Tensor]:
    """The clipped surrogate: mean over reply tokens of max(-A r, -A clip(r, 1 - eps, 1 + eps)),
    r = exp(logprobs - old_logprobs); and the fraction of tokens where the clipped term won."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               value_clip: float) -> tuple[Tensor, Tensor]:
    """0.5 * mean over reply tokens of max((V - R)^2, (V_clipped - R)^2), V_clipped = old V +
    clamp(V - old V, -c, c) (c = value_clip; 0: unclipped); and the fraction where the clipped term won."""
    if value_clip <= 0:
        return 0.5 * masked_mean((values - returns) ** 2, mask), torch.zeros((), device=values.device)
    clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    return loss, masked_mean((clipped_loss > unclipped_loss).float(), mask)


def entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over reply tokens of the entropy of softmax(logits) (logits (B, T, V))."""
    logp = logits.float().log_softmax(dim=-1)
    per_token = -(logp.exp() * logp).sum(dim=-1)
    return masked_mean(per_token, mask)


def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """(B, T) log softmax(logits / temperature) of the chosen tokens: logits (B, T, V) of positions
    0..T-1 and ids (B, T) the token each position chose (the inputs shifted by one)."""
    logp = (logits.float() / temperature).log_softmax(dim=-1)
    return logp.gather(-1, ids[..., None]).squeeze(-1)


def logits_and_values(model: nn.Module, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The LM logits (B, T, V) and the value head's values (B, T) of ids (B, T), from ONE forward:
    the final norm's output (what `GPT.scores` reads) is caught on its way to the LM head and
    passed through the scalar head `score`."""
    raw = unwrap(model)
    if getattr(raw, "score", None) is None:
        raise UserError("objective ppo: the policy has no scalar head (model.num_labels=1 on a GPT) for its values")
    hidden: list[Tensor] = []
    handle = raw.norm.register_forward_hook(lambda module, inputs, output: hidden.append(output))
    try:
        logits = model(ids)[0]
    finally:
        handle.remove()
    return logits, raw.score(hidden[-1]).squeeze(-1).float()


# ---- the objective ---------------------------------------------------------------------------


class PPO(Objective):
    """PPO on rollout batches (see the module docstring). `loss(model, batch)` takes a minibatch
    made by `lmforge.posttrain.ppo`: input_ids (B, T + 1), and (B, T) tensors mask, old_logprobs,
    old_values, advantages, returns; it returns pg_loss + value_coef * value_loss -
    entropy_coef * entropy, and `step_metrics` the parts of the last call."""

    name, arch, Options = "ppo", "gpt", PPOOptions
    new_heads = ("score.weight",)  # the value head: absent from a base checkpoint, initialized here
    # memory and FLOPs as `lmforge plan` models them: one policy forward/backward per sequence (the
    # reference's and the reward model's forwards keep no activations); generation is not counted
    views = 1

    @classmethod
    def configure_model(cls, cfg: Any, model_config: Any) -> None:
        model_config.num_labels = cfg.model.num_labels = 1  # the value head: GPT.score

    def __init__(self, cfg: Any, tokenizer: Any, model_config: Any, models: dict | None = None) -> None:
        super().__init__(cfg, tokenizer, model_config, models)
        self.opts: PPOOptions = cfg.ppo
        self.last: dict[str, float] = {}

    def source(self, tokens_dir: Any, split: str) -> Any:
        """The prompts of `data.file` (train) / the held-out ones (val), as `PromptSource`."""
        from lmforge.posttrain.ppo import prompt_source

        return prompt_source(self.cfg, self.tokenizer, split)

    def make_batch(self, windows: np.ndarray, rng: np.random.Generator, source: Any) -> Batch:
        """A stand-in minibatch of the shapes PPO trains on (`lmforge.peakmem` measures a step with
        it): full-context sequences whose second half is the reply, random advantages and returns.
        Real minibatches come from rollouts (`lmforge.posttrain.ppo`)."""
        ids = torch.from_numpy(windows)
        rows, width = ids.shape[0], ids.shape[1] - 1
        mask = torch.zeros(rows, width)
        mask[:, width // 2:] = 1.0
        noise = torch.from_numpy(rng.standard_normal((3, rows, width))).float() * mask
        return {"input_ids": ids, "mask": mask, "old_logprobs": -noise[0].abs(), "old_values": noise[1],
                "advantages": noise[2], "returns": noise[1] + noise[2]}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        o, ids, mask = self.opts, batch["input_ids"], batch["mask"].float()
        logits, values = logits_and_values(model, ids[:, :-1])
        logprobs = token_logprobs(logits, ids[:, 1:], o.temperature)
        pg, clip_fraction = policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask, o.clip_range)
        vf, vf_clip_fraction = value_loss(values, batch["old_values"], batch["returns"], mask, o.value_clip)
        ent = entropy(logits.float() / o.temperature, mask)
        loss = pg + o.value_coef * vf - o.entropy_coef * ent
        with torch.no_grad():
            approx_kl = 0.5 * masked_mean((logprobs - batch["old_logprobs"]) ** 2, mask)
        self.last = {"pg_loss": pg.detach(), "value_loss": vf.detach(), "clip_fraction": clip_fraction.detach(),
                     "value_clip_fraction": vf_clip_fraction.detach(), "entropy": ent.detach(),
                     "approx_kl": approx_kl}
        return loss

    def step_metrics(self) -> dict[str, float]:
        return {k: round(float(v), 6) for k, v in self.last.items()}
