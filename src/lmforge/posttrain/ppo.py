"""PPO-RLHF (InstructGPT-style): `train_ppo`, the setup pipeline's second loop (issue 12).

    lmforge align configs/ppo.yaml --base BASE --reward REWARD_RUN --data prompts.jsonl --out runs/ppo

One training step is one rollout batch followed by several PPO epochs over it:

1. **prompts**: `ppo.rollout_batch` prompts of `data.file` (prompt-only lines, or the prompt
   turns of chat / instruction / preference lines, rendered with the chat template; a plain
   `prompt` as it is), drawn by (seed, step), so a resumed run draws the same ones;
2. **rollouts**: replies sampled by the generation engine (`lmforge.infer.engine.Engine`, KV
   cache, continuous batching) at `ppo.temperature`, each request with a seed of (seed, step,
   row), up to `ppo.max_new_tokens` or a stop token (the template's end of turn, EOS);
3. **scores**: the reward model's score of each full sequence
   (`lmforge.posttrain.reward.sequence_rewards`), minus `ppo.stop_penalty` for a reply that
   did not end by itself; the policy's log-probabilities and values, and the reference's
   log-probabilities (the same base with its adapters disabled, `adapters_disabled`; a separate
   frozen copy of the base for `adapter.method: full|freeze`);
4. **advantages**: per-token rewards (-beta * (log pi - log pi_ref), the score at the last
   reply token; beta = `ppo.kl_coef`, or adapted after each step to hold the rollout KL near
   `ppo.kl_target`), GAE, whitened advantages (`lmforge.train.objectives.ppo`);
5. **updates**: `ppo.ppo_epochs` passes over the batch in shuffled minibatches of
   `ppo.minibatch` replies, one optimizer step each (`PPO.loss`: clipped surrogate + value
   loss), with the loop's parts from `lmforge.train.steps` (clipping, the non-finite stop).

Every `train.eval_every` steps (and before the first and after the last) the held-out prompts
(`data.val_file`, else 5% of `data.file` by content hash) are answered with fixed seeds and
scored: `val_reward` (mean score) and `val_kl` (mean over replies of the summed per-token
log pi - log pi_ref, an unbiased estimate of KL(pi || pi_ref) per reply). Metrics go to
metrics.jsonl, checkpoints and Ctrl-C/--resume work as in pretraining (`best`: the highest
val_reward - kl_coef * val_kl), and the run ends with summary.json and report.md.

The model runs in eval mode throughout (no dropout), so the ratio pi/pi_old is exactly 1 on the
first minibatch of each rollout, as PPO assumes. PPO runs on one process.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.config import Config, dump_yaml, to_dict
from lmforge.errors import Interrupted, UserError
from lmforge.fsutil import atomic_write_json, atomic_write_text
from lmforge.infer.engine import Engine, SamplingParams
from lmforge.track.loggers import Trackers
from lmforge.train import checkpoint as ckpt
from lmforge.train import distributed as dist
from lmforge.train.device import autocast
from lmforge.train.objectives.base import EVAL_STREAM
from lmforge.train.objectives.ppo import adaptive_kl_coef, gae, kl_rewards, logits_and_values, token_logprobs, whiten
from lmforge.train.optim import lr_at
from lmforge.train.report import read_metrics, write_run_report
from lmforge.train.setup import TrainSetup, setup_training
from lmforge.train.steps import (
    Checkpointer,
    MetricsLog,
    StopFlag,
    apply_gradients,
    check_finite,
    clip_gradients,
    progress_bar,
    set_lr,
    update_best,
)

# ---- prompts ----------------------------------------------------------------------------------


@dataclass
class PromptSource:
    """The prompts of one split, encoded: what `PPO.source` gives the setup pipeline."""

    prompts: list[list[int]]
    where: list[str]  # "file:line" of each
    skipped: int = 0  # prompts too long for the context with max_new_tokens of reply

    split: str = "train"
    file: str = ""

    @property
    def num_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def summary(self) -> dict[str, Any]:
        return {"file": self.file, "examples": len(self.prompts), "prompts": len(self.prompts),
                "skipped_too_long": self.skipped}

    def describe(self) -> str:
        return (f"ppo {self.split} prompts: {len(self.prompts):,} from {self.file}"
                + (f" ({self.skipped} too long for the context with the reply, skipped)" if self.skipped else ""))


@dataclass
class Prompt:
    """A prompt-only line: `messages` (chat turns ending with a user turn) or a plain `prompt` text."""

    messages: list[dict] | None
    prompt: str | None
    where: str
    key: str  # content key, for the train/val split


def prompt_only(record: dict[str, Any]) -> bool:
    """A line with a prompt and no reply: {"messages": [... no assistant turn]} or {"prompt": "..."}."""
    if "chosen" in record or "completion" in record:
        return False
    messages = record.get("messages")
    if isinstance(messages, list):
        return not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
    return "prompt" in record


def read_prompt_lines(path: Path) -> list[Prompt]:
    """A prompts file: every line {"messages": [turns ending with a user turn]} or {"prompt": "text"}."""
    from lmforge.data.readers import iter_jsonl_objects
    from lmforge.posttrain.data import check_messages

    prompts = []
    for lineno, record in iter_jsonl_objects(path):
        where = f"{path}:{lineno}"
        if not prompt_only(record):
            raise UserError(f"{where}: not a prompt line (line 1 is one); write {{\"messages\": [turns ending with a "
                            "user turn]}} or {\"prompt\": \"...\"}, one format per file")
        if "messages" in record:
            messages = check_messages(record["messages"], where, need_reply=False)
            if messages[-1]["role"] != "user":
                raise UserError(f"{where}: the prompt 'messages' end with a {messages[-1]['role']} message; "
                                "end them with the user turn to answer")
            prompts.append(Prompt(messages, None, where, json.dumps(messages, ensure_ascii=False, sort_keys=True)))
        elif not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise UserError(f"{where}: 'prompt' must be a non-empty string; fix the line")
        else:
            prompts.append(Prompt(None, record["prompt"], where, json.dumps(record["prompt"], ensure_ascii=False)))
    return prompts


def read_prompt_items(path: Path) -> list[Any]:
    """The lines of a prompts file (`read_prompt_lines`), of preference pairs (a line with
    `chosen`: `read_pairs`) or of SFT examples (`read_sft`): the format of the first line decides."""
    from lmforge.data.readers import iter_jsonl_objects
    from lmforge.posttrain.data import read_pairs, read_sft

    if not path.is_file():
        raise UserError(f"{path}: no such file; give --data a JSONL of prompts (chat, instruction, "
                        "prompt/completion, preference or prompt-only lines)")
    first = next((record for _, record in iter_jsonl_objects(path)), None)
    if first is None:
        raise UserError(f"{path}: no prompts; write one JSON object per line")
    if "chosen" in first:
        return read_pairs(path)
    return read_prompt_lines(path) if prompt_only(first) else read_sft(path)


def prompt_messages(item: Any) -> list[dict] | str:
    """The prompt of an example or pair: its turns before the (last) assistant reply, or a
    prompt/completion line's prompt text."""
    if getattr(item, "prompt", None) is not None and getattr(item, "messages", None) is None:
        return item.prompt
    messages = list(item.messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def encode_prompt(template: Any, tokenizer: Any, item: Any) -> list[int]:
    prompt = prompt_messages(item)
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return list(template.encode(prompt, add_generation_prompt=True))


def prompt_source(cfg: Config, tokenizer: Any, split: str) -> PromptSource:
    """The train or held-out prompts of `data.file` (`data.val_file` for the held-out ones when set,
    else the 5% of `data.file` that `split_items` holds out by content hash)."""
    from lmforge.posttrain.data import split_items
    from lmforge.tokenizer.chat import chat_template

    if not cfg.data.file:
        raise UserError("objective ppo needs prompts: give --data FILE (or data.file)")
    file = cfg.data.val_file if split == "val" and cfg.data.val_file else cfg.data.file
    items = read_prompt_items(Path(file))
    if file == cfg.data.file:
        items = split_items(items, split)
    template = chat_template(tokenizer)
    room = cfg.model.block_size - cfg.ppo.max_new_tokens
    source = PromptSource([], [], split=split, file=str(file))
    for item in items:
        ids = encode_prompt(template, tokenizer, item)
        if not 0 < len(ids) <= room:
            source.skipped += 1
            continue
        source.prompts.append(ids)
        source.where.append(item.where)
    if not source.prompts and (split == "train" or items):
        raise UserError(f"{file}: no {split} prompt fits the context ({cfg.model.block_size} tokens) with "
                        f"ppo.max_new_tokens={cfg.ppo.max_new_tokens}; lower ppo.max_new_tokens or shorten the prompts")
    return source


# ---- rollouts ---------------------------------------------------------------------------------


def sample_replies(model: nn.Module, prompts: list[list[int]], seeds: list[int], *, max_new_tokens: int,
                   temperature: float, stop_ids: set[int],
                   autocast_dtype: torch.dtype | None = None) -> list[tuple[list[int], bool]]:
    """One sampled reply per prompt (the engine, all in one batch): (tokens, ended by a stop token)."""
    engine = Engine(model, max_batch=len(prompts), autocast_dtype=autocast_dtype)
    rids = [engine.add(p, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                         stop_ids=frozenset(stop_ids)))
            for p, seed in zip(prompts, seeds)]
    tokens: dict[int, list[int]] = {rid: [] for rid in rids}
    stopped: dict[int, bool] = {}
    while engine.has_work:
        for event in engine.step():
            tokens[event.request_id].append(event.token_id)
            if event.finished:
                stopped[event.request_id] = event.reason == "stop"
    return [(tokens[rid], stopped[rid]) for rid in rids]


def sequence_batch(prompts: list[list[int]], replies: list[list[int]],
                   device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded prompt + reply ids (B, T + 1) and the reply mask (B, T): position t is 1 when
    it chooses a reply token (ids[:, t + 1])."""
    width = max(len(p) + len(r) for p, r in zip(prompts, replies))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width - 1))
    for row, (p, r) in enumerate(zip(prompts, replies)):
        ids[row, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        mask[row, len(p) - 1:len(p) - 1 + len(r)] = 1.0
    return ids.to(device), mask.to(device)


def rollout_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of one reply: a pure function of (seed, step, row), so resume is exact."""
    return int(np.random.default_rng([seed, step, row]).integers(2**62))


@dataclass
class Scorer:
    """What scores a rollout: the reward model, and the reference's logits (a frozen model, or the
    policy with its adapters disabled)."""

    reward_model: nn.Module
    reference: Callable[[Tensor], Tensor]  # ids (B, T) -> logits (B, T, V)
    temperature: float
    stop_penalty: float
    device: torch.device
    precision: str

    @torch.no_grad()
    def score(self, policy: nn.Module, ids: Tensor, mask: Tensor, sequences: list[list[int]],
              ended: list[bool]) -> dict[str, Tensor]:
        """The policy's log-probabilities and values, the reference's log-probabilities, and the
        reward model's (stop-penalized) scores of a rollout batch."""
        from lmforge.posttrain.reward import sequence_rewards

        with autocast(self.device, self.precision):
            logits, values = logits_and_values(policy, ids[:, :-1])
            logprobs = token_logprobs(logits, ids[:, 1:], self.temperature)
            del logits
            ref_logprobs = token_logprobs(self.reference(ids[:, :-1]), ids[:, 1:], self.temperature)
            scores = sequence_rewards(self.reward_model, sequences).float().to(self.device)
        scores = scores - self.stop_penalty * (1 - torch.tensor(ended, dtype=torch.float32, device=self.device))
        return {"logprobs": logprobs * mask, "values": values * mask, "ref_logprobs": ref_logprobs * mask,
                "scores": scores}


# ---- the loop ---------------------------------------------------------------------------------


@dataclass
class PPOLoop:
    """The PPO loop over a `TrainSetup` (see the module docstring)."""

    s: TrainSetup
    scorer: Scorer
    stop_ids: set[int]
    report: Any  # lmforge.posttrain.run.RunReport: parameters, memory, the data in summary.json
    write_files: Callable[[Path], None] | None = None  # files each checkpoint carries (adapter_config.json)
    reward_dir: str = ""  # for summary.json's inputs
    on_report: Callable[[], Path | None] | None = None  # at the end, before the summary: OUT/adapter
    metrics: MetricsLog = field(init=False)
    checkpointer: Checkpointer = field(init=False)

    def __post_init__(self) -> None:
        s, t = self.s, self.s.cfg.train
        self.opts = s.cfg.ppo
        self.metrics = MetricsLog(s.metrics_path, s.info)
        self.checkpointer = Checkpointer(s.out, s.info, keep_last=t.keep_last, model_config=s.model_cfg.to_dict(),
                                         tokenizer_file=s.tokenizer_file, config=to_dict(s.cfg),
                                         base_keys=s.base_keys, write_files=self.write_files)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.precision)

    # ---- one rollout batch -------------------------------------------------------------------

    def sample_and_score(self, prompts: list[list[int]], seeds: list[int]) -> tuple[Tensor, Tensor, dict, list]:
        """Replies to the prompts, and their ids (B, T + 1), reply mask (B, T), scores (`Scorer.score`)
        and whether each ended by itself."""
        o, s = self.opts, self.s
        replies = sample_replies(s.raw_model, prompts, seeds, max_new_tokens=o.max_new_tokens,
                                 temperature=o.temperature, stop_ids=self.stop_ids,
                                 autocast_dtype=self.autocast_dtype)
        ids, mask = sequence_batch(prompts, [r for r, _ in replies], s.device)
        ended = [e for _, e in replies]
        scored = self.scorer.score(s.model, ids, mask, [p + r for p, (r, _) in zip(prompts, replies)], ended)
        return ids, mask, scored, ended

    def rollout(self, prompts: list[list[int]], seeds: list[int]) -> dict[str, Any]:
        """One rollout batch: replies, scores, advantages and returns (the PPO batch) and its stats."""
        o = self.opts
        ids, mask, scored, ended = self.sample_and_score(prompts, seeds)
        beta = self.s.state["kl_coef"]
        rewards, kl = kl_rewards(scored["logprobs"], scored["ref_logprobs"], scored["scores"], mask, beta)
        advantages, returns = gae(rewards, scored["values"], mask, o.gamma, o.lam)
        if o.whiten_advantages:
            advantages = whiten(advantages, mask)
        batch = {"input_ids": ids, "mask": mask, "old_logprobs": scored["logprobs"], "old_values": scored["values"],
                 "advantages": advantages, "returns": returns}
        stats = {"reward": scored["scores"].mean().item(), "kl": kl.sum(dim=1).mean().item(), "kl_coef": beta,
                 "reply_len": mask.sum(dim=1).mean().item(), "ended": sum(ended) / len(ended)}
        return {"batch": batch, "stats": stats, "tokens": int(mask.sum().item())}

    def update(self, batch: dict[str, Tensor], step: int, lr: float) -> dict[str, float]:
        """`ppo_epochs` passes over the batch in shuffled minibatches, one optimizer step each;
        the mean of each logged number over the updates."""
        s, o, t = self.s, self.opts, self.s.cfg.train
        rng = np.random.default_rng([t.seed, step, 1])
        totals: dict[str, float] = {}
        updates = 0
        for _ in range(o.ppo_epochs):
            order = rng.permutation(o.rollout_batch)
            for lo in range(0, o.rollout_batch, o.minibatch):
                rows = torch.as_tensor(order[lo:lo + o.minibatch], device=s.device)
                mb = {k: v[rows] for k, v in batch.items()}
                width = int(mb["mask"].sum(dim=0).nonzero().max().item()) + 1  # drop all-padding columns
                mb = {k: v[:, :width + 1] if k == "input_ids" else v[:, :width] for k, v in mb.items()}
                with autocast(s.device, s.precision):
                    loss = s.objective.loss(s.model, mb)
                (s.scaler.scale(loss) if s.scaler else loss).backward()
                norm = clip_gradients(s.model, s.optimizer, s.scaler, t.grad_clip)
                record = {"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": float(norm)}
                check_finite(record, scaler=s.scaler, metrics=self.metrics, checkpointer=self.checkpointer,
                             info=s.info)
                apply_gradients(s.optimizer, s.scaler)
                for k, v in {"loss": record["loss"], "grad_norm": record["grad_norm"],
                             **s.objective.step_metrics()}.items():
                    totals[k] = totals.get(k, 0.0) + v
                updates += 1
        return {k: v / updates for k, v in totals.items()}

    def train_step(self, step: int) -> dict[str, Any]:
        """One rollout batch and its PPO updates: the step's metrics record."""
        s, o, t = self.s, self.opts, self.s.cfg.train
        lr = lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                   decay_steps=t.lr_decay_steps or t.max_steps)
        set_lr(s.optimizer, lr)
        t0 = time.perf_counter()
        prompts = s.train_batches.prompts
        rng = np.random.default_rng([t.seed, step])
        picked = rng.choice(len(prompts), o.rollout_batch, replace=len(prompts) < o.rollout_batch)
        out = self.rollout([prompts[i] for i in picked], [rollout_seed(t.seed, step, r) for r in range(len(picked))])
        means = self.update(out["batch"], step, lr)
        s.state["kl_coef"] = adaptive_kl_coef(s.state["kl_coef"], out["stats"]["kl"], o.kl_target, len(picked),
                                              o.kl_horizon)
        dt = time.perf_counter() - t0
        s.state["tokens_seen"] += out["tokens"]
        record = {"step": step + 1, "loss": means.pop("loss"), "lr": lr, "grad_norm": means.pop("grad_norm"),
                  **out["stats"], **means, "ms_per_step": dt * 1000, "tokens_per_s": out["tokens"] / dt}
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}

    # ---- evaluation --------------------------------------------------------------------------

    def eval_prompts(self) -> list[list[int]]:
        """The held-out prompts an evaluation answers (the first `ppo.eval_prompts`; the train
        prompts when there are no held-out ones)."""
        prompts = self.s.val_batches.prompts or self.s.train_batches.prompts
        return prompts[:self.opts.eval_prompts] if self.opts.eval_prompts else prompts

    def evaluate(self) -> dict[str, float]:
        """Mean reward and KL to the reference of replies to the held-out prompts (fixed seeds)."""
        prompts = self.eval_prompts()
        rewards, kls = [], []
        for lo in range(0, len(prompts), self.opts.rollout_batch):
            chunk = prompts[lo:lo + self.opts.rollout_batch]
            seeds = [rollout_seed(self.s.cfg.train.seed, EVAL_STREAM, lo + i) for i in range(len(chunk))]
            stats = self.eval_chunk(chunk, seeds)
            rewards += stats[0]
            kls += stats[1]
        reward, kl = float(np.mean(rewards)), float(np.mean(kls))
        return {"val_reward": round(reward, 6), "val_kl": round(kl, 6),
                "val_objective": round(reward - self.opts.kl_coef * kl, 6)}

    def eval_chunk(self, prompts: list[list[int]], seeds: list[int]) -> tuple[list[float], list[float]]:
        """Scores and KLs to the reference (nats per reply) of replies to held-out prompts."""
        _, _, scored, _ = self.sample_and_score(prompts, seeds)
        kl = (scored["logprobs"] - scored["ref_logprobs"]).sum(dim=1)
        return scored["scores"].tolist(), kl.tolist()

    # ---- checkpoints, the run ----------------------------------------------------------------

    def save(self, step: int, best: bool = False) -> None:
        s = self.s
        self.checkpointer.save(step, s.model, s.optimizer, s.state, scaler=s.scaler, device=s.device, best=best)

    def evaluate_and_save(self, step: int, record: dict[str, Any]) -> bool:
        """Evaluation at eval steps (best: the highest val_objective), the metrics line and the
        step's checkpoint; whether a checkpoint was saved."""
        t = self.s.cfg.train
        if not ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps):
            self.metrics.log(record)
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                self.save(step)
                return True
            return False
        record.update(self.evaluate())
        improved = update_best(self.s.state, step, -record["val_objective"])
        self.metrics.log(record)
        self.save(step, best=improved)
        return True

    def start(self) -> int:
        """config.yaml, metrics trimmed to the resumed step, the held-out scores before training
        (kept in the trainer state, so a resumed run still reports them); the first step."""
        s = self.s
        s.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(s.out / "config.yaml", dump_yaml(s.cfg))
        start = s.state["step"]
        self.metrics.trim(start)
        t = s.cfg.train
        if s.info.is_main and t.loggers:  # experiment tracking (lmforge.track), as the training loop does
            self.metrics.trackers = Trackers(s.out, t.loggers, to_dict(s.cfg), start_step=start,
                                             uri=t.tracking_uri, experiment=t.experiment)
        if s.resume_from is not None:  # PPO's own entries of the trainer state
            saved = ckpt.read_trainer_state(s.resume_from)
            s.state.update(initial_eval=saved.get("initial_eval"), kl_coef=saved.get("kl_coef"))
        if s.state.get("kl_coef") is None:
            s.state["kl_coef"] = self.opts.kl_coef  # the adaptive coefficient's start (or the fixed one)
        if s.state.get("initial_eval") is None:
            s.state["initial_eval"] = self.evaluate()
        ie = s.state["initial_eval"]
        print(f"ppo: {len(s.train_batches.prompts):,} train prompts, {len(s.val_batches.prompts):,} held-out; "
              f"before training: val reward {ie['val_reward']:.4f}, val KL {ie['val_kl']:.4f}"
              f"{f'; resuming from step {start}' if start else ''}", flush=True)
        return start

    def run(self, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        try:
            return self.steps(on_step)
        finally:
            self.metrics.close()  # the trackers' runs end (an interrupted one is resumed by --resume)

    def steps(self, on_step: Callable[[int], None] | None) -> dict[str, Any]:
        s, t = self.s, self.s.cfg.train
        step = self.start()
        wall0 = time.perf_counter()
        stop_reason = "max_steps"
        bar = progress_bar(t.max_steps, step, s.info, "ppo")
        with StopFlag() as stop_flag:
            while step < t.max_steps:
                record = self.train_step(step)
                step = s.state["step"] = step + 1
                saved = self.evaluate_and_save(step, record)
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}", refresh=False)
                if on_step is not None:
                    on_step(step)
                if stop_flag.requested:
                    if not saved:
                        self.save(step)
                    stop_reason = "interrupted"
                    break
        bar.close()
        summary = self.finish(stop_reason, time.perf_counter() - wall0)
        if stop_reason == "interrupted":
            raise Interrupted(f"interrupted at step {step}; checkpoint saved in {s.out}/checkpoints; "
                              "continue with the same command plus --resume")
        return summary

    def finish(self, stop_reason: str, wall: float) -> dict[str, Any]:
        """The run report (`write_run_report`), then summary.json (stage align) with PPO's numbers
        and the post-training ones (`RunReport`: parameters, memory, OUT/adapter), and report.md's
        PPO section."""
        s = self.s
        if s.state["step"]:  # the reply tokens of a step, as generated (the report's tokens/s)
            s.tokens_per_step = max(1, s.state["tokens_seen"] // s.state["step"])
        summary = write_run_report(s, stop_reason=stop_reason, wall_time_s=wall)
        metrics = self.ppo_metrics()
        summary["metrics"] = {**summary["metrics"], **metrics}
        summary = self.report.finish(summary, self.on_report() if self.on_report else None)
        summary["inputs"] = {**summary.get("inputs", {}), "reward": {"path": self.reward_dir}}
        atomic_write_json(s.out / "summary.json", summary)
        if self.metrics.trackers is not None:
            self.metrics.trackers.finish(summary)
        report = (s.out / "report.md").read_text()
        records = read_metrics(s.metrics_path)
        evals = [r for r in records if "val_reward" in r]
        if records:
            plot_ppo(records, s.out / "reward.png", s.state["initial_eval"])
        atomic_write_text(s.out / "report.md", report.rstrip("\n") + "\n\n"
                          + "\n".join(ppo_report_lines(metrics, evals)) + "\n")
        if "final_val_reward" in metrics:
            print(f"ppo: held-out reward {metrics['initial_val_reward']:.4f} -> {metrics['final_val_reward']:.4f}, "
                  f"KL to the reference {metrics['final_val_kl']:.4f} nats per reply "
                  f"({len(self.eval_prompts())} prompts)", flush=True)
        return summary

    def ppo_metrics(self) -> dict[str, Any]:
        """summary.json's PPO numbers: held-out reward and KL before and after, the last rollout's."""
        s = self.s
        records = read_metrics(s.metrics_path)
        evals = [r for r in records if "val_reward" in r]
        initial = s.state["initial_eval"]
        final = {f"final_{k}": evals[-1][k] for k in ("val_reward", "val_kl", "val_objective")} if evals else {}
        return {"initial_val_reward": initial["val_reward"], "initial_val_kl": initial["val_kl"], **final,
                "final_reward": records[-1]["reward"] if records else None,
                "final_kl": records[-1]["kl"] if records else None,
                "train_prompts": len(s.train_batches.prompts), "val_prompts": len(s.val_batches.prompts),
                "prompts_skipped": s.train_batches.skipped + s.val_batches.skipped}


def plot_ppo(records: list[dict[str, Any]], out_png: Path, initial: dict[str, float] | None = None) -> None:
    """reward.png: the rollout and held-out reward (left axis) and KL to the reference (right) per
    step; `initial`: the held-out scores before training (step 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [*([{"step": 0, **initial}] if initial else []), *(r for r in records if "val_reward" in r)]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot([r["step"] for r in records], [r["reward"] for r in records], lw=0.8, alpha=0.6, label="reward (rollout)")
    ax.plot([r["step"] for r in evals], [r["val_reward"] for r in evals], "o-", ms=3, label="reward (held out)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward model score")
    ax.grid(alpha=0.3)
    kl_ax = ax.twinx()
    kl_ax.plot([r["step"] for r in records], [r["kl"] for r in records], color="gray", lw=0.8, ls=":",
               label="KL (rollout)")
    kl_ax.plot([r["step"] for r in evals], [r["val_kl"] for r in evals], "s--", color="gray", ms=3,
               label="KL (held out)")
    kl_ax.set_ylabel("KL to the reference (nats per reply)")
    lines, kl_lines = ax.get_legend_handles_labels(), kl_ax.get_legend_handles_labels()
    ax.legend(lines[0] + kl_lines[0], lines[1] + kl_lines[1], loc="upper left", fontsize=8)
    ax.set_title("PPO: reward and KL")
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)


def ppo_report_lines(metrics: dict[str, Any], evals: list[dict[str, Any]]) -> list[str]:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["## PPO", "",
             f"- held-out reward: {fmt(metrics['initial_val_reward'])} before training, "
             f"{fmt(metrics.get('final_val_reward'))} after; KL to the reference: "
             f"{fmt(metrics['initial_val_kl'])} -> {fmt(metrics.get('final_val_kl'))} (nats per reply)",
             f"- prompts: {metrics['train_prompts']} train, {metrics['val_prompts']} held-out"
             f" ({metrics['prompts_skipped']} too long, skipped)", "", "![reward and KL](reward.png)", "",
             "| step | reward (rollout) | KL (rollout) | val reward | val KL | entropy | clip fraction | value loss |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['step']} | {fmt(r['reward'])} | {fmt(r['kl'])} | {fmt(r['val_reward'])} | {fmt(r['val_kl'])} "
              f"| {fmt(r.get('entropy'))} | {fmt(r.get('clip_fraction'))} | {fmt(r.get('value_loss'))} |"
              for r in evals]
    return lines


# ---- the run ----------------------------------------------------------------------------------


def value_head_transform(model: nn.Module) -> nn.Module:
    """The value head (`score`, added by `PPO.configure_model`) starts at zero, so the first values
    are 0 whatever the base, and trains even when the adapters froze everything else."""
    with torch.no_grad():
        model.score.weight.zero_()
    model.score.weight.requires_grad_(True)
    return model


def load_reward_model(reward: str | Path, base: Path, device: torch.device) -> tuple[nn.Module, Path]:
    """The reward checkpoint (a run dir: its best), frozen, checked to be a reward model that reads
    the base's token ids."""
    from lmforge.posttrain.reward import check_reward_model
    from lmforge.tokenizer import Tokenizer

    if not reward:
        raise UserError("objective ppo needs a reward model: give --reward DIR (a run of configs/reward.yaml)")
    try:
        path = ckpt.resolve_checkpoint(reward)
    except UserError as e:
        raise UserError(f"--reward {reward}: {e}") from None
    tokenizer = Tokenizer.load(base / "tokenizer.json")
    model, reward_tokenizer = ckpt.load_pretrained(path, device)
    try:
        check_reward_model(model)
    except UserError as e:
        raise UserError(f"--reward {reward}: {e}") from None
    if reward_tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise UserError(f"--reward {reward}: its tokenizer is not the base's ({tokenizer.source}); train the "
                        "reward model from the same base")
    return model.requires_grad_(False), path


def reference_for(s: TrainSetup, base: Path) -> Callable[[Tensor], Tensor]:
    """The frozen reference's logits: the policy with its adapters disabled (one base serves as
    both), or, when the run trains the base's own weights (`adapter.method: full|freeze`), a
    frozen copy of the base."""
    from lmforge.adapters import adapters_disabled

    if s.cfg.adapter.method in ("full", "freeze"):
        from lmforge.posttrain.run import load_base_for_reference

        frozen = load_base_for_reference(base, s.device)
        return lambda ids: frozen(ids)[0]

    def disabled(ids: Tensor) -> Tensor:
        with adapters_disabled(s.raw_model):
            return s.model(ids)[0]

    return disabled


def stop_ids_of(tokenizer: Any) -> set[int]:
    """Tokens that end a reply: the chat template's end of turn (and other stop ids), and EOS."""
    from lmforge.tokenizer.chat import chat_template
    from lmforge.tokenizer.tok import EOS

    eos = tokenizer.special_id_or_none(EOS)
    return set(chat_template(tokenizer).stop_ids) | ({eos} if eos is not None else set())


def train_ppo(cfg: Config, out: str | Path, *, base: str | Path, reward: str | Path, data: str | Path,
              resume: bool = False, overwrite: bool = False, force: bool = False,
              on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """PPO-RLHF of `base` (+ `cfg.adapter`) against the reward model `reward` on the prompts of
    `data`, written to `out` (see the module docstring); returns the summary. The base, the
    config and the adapter are handled as `lmforge.posttrain.run.posttrain` does (a LoRA base
    merged first; the model and tokenizer from the base; adapter_config.json in each checkpoint;
    OUT/adapter at the end); a bad input is one UserError and a run dir this call made is removed."""
    from lmforge.posttrain.run import RunReport, base_config, merged_base, resolve_base
    from lmforge.train.device import resolve_device

    if cfg.objective != "ppo":
        raise UserError(f"train_ppo runs objective ppo, but the config's objective is {cfg.objective}; "
                        "use configs/ppo.yaml")
    out, base = Path(out), resolve_base(base)
    cfg = base_config(cfg, base, data)
    # the rows of one optimizer step: what the fit check, lmforge plan and the memory measurement size
    cfg.train.batch_size, cfg.train.grad_accum = cfg.ppo.minibatch, 1
    info = dist.init_distributed(cfg.train.parallel, cfg.train.device)
    created = not out.exists()
    try:
        try:
            if info.enabled:
                raise UserError("ppo runs on one process; start it without torchrun (train.parallel=none)")
            reward_model, reward_dir = load_reward_model(reward, base, resolve_device(cfg.train.device))
            init = merged_base(base, out, info)
            s = setup_training(cfg, out, info, resume=resume, overwrite=overwrite, init_from=init,
                               transforms=ppo_transforms(cfg), force=force, models={"reward": reward_model})
            loop = ppo_loop(s, init, reward_model, reward_dir, RunReport(s, base, "align"))
        except BaseException:
            if created and info.is_main:
                shutil.rmtree(out, ignore_errors=True)  # nothing half-written
            raise
        return loop.run(on_step)
    finally:
        dist.shutdown()


def ppo_transforms(cfg: Config) -> list[Any]:
    """The adapter (the value head kept trainable), then the value head's zero start."""
    from lmforge.posttrain.run import adapter_transforms

    return [*adapter_transforms(cfg), value_head_transform]


def ppo_loop(s: TrainSetup, init: Path, reward_model: nn.Module, reward_dir: Path, report: Any) -> PPOLoop:
    """The loop of a set-up run: the scorer (reward model, reference), stop tokens, checkpoint files."""
    from lmforge.posttrain.run import adapter_fingerprint, checkpoint_files, save_run_adapter

    s.model.eval()  # no dropout: the ratio to the rollout's policy starts at exactly 1
    s.tokens_per_step = s.cfg.ppo.rollout_batch * s.cfg.ppo.max_new_tokens  # reply tokens per step, at most
    o = s.cfg.ppo
    scorer = Scorer(reward_model, reference_for(s, init), o.temperature, o.stop_penalty, s.device, s.precision)
    report.start()
    fingerprint = adapter_fingerprint(init, s.raw_model) if s.cfg.adapter.method != "full" else None
    return PPOLoop(s, scorer, stop_ids_of(s.tokenizer), report,
                   write_files=checkpoint_files(s.cfg, init, s.raw_model, fingerprint), reward_dir=str(reward_dir),
                   on_report=lambda: save_run_adapter(s.cfg, init, s.out, fingerprint))
