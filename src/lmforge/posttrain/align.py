"""`lmforge align CONFIG --base DIR --data FILE --out DIR [--reward DIR]`: preference training.

The recipe's objective picks the method (presets configs/reward.yaml, dpo.yaml, orpo.yaml,
ppo.yaml):

- `reward`, `dpo`, `orpo` run on the pretraining loop through `lmforge.posttrain.run.posttrain`
  (the base's model and tokenizer, `cfg.adapter` applied as a model transform, checkpoints,
  Ctrl-C, `--resume`), on preference pairs (`data.file`);
- `ppo` runs `lmforge.posttrain.ppo.train_ppo` against the reward model `--reward DIR`, on the
  prompts of `data.file`.

DPO's reference is the base itself: with an adapter that leaves the base weights alone (lora,
qlora, prefix, prompt) the policy with its adapters disabled; with full or freeze fine-tuning a
frozen copy loaded here (`load_base_for_reference`), whose log-probs are precomputed and which is
then freed (`dpo.reference: precompute`), or which runs beside the policy (`live`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lmforge.errors import UserError

PAIR_OBJECTIVES = ("reward", "dpo", "orpo")
OBJECTIVES = (*PAIR_OBJECTIVES, "ppo")


def check_causal_base(base: str | Path, objective: str) -> None:
    """A base that is not a causal LM (a BERT, an encoder-decoder) is one line naming it."""
    from lmforge.posttrain.run import resolve_base
    from lmforge.train import checkpoint as ckpt

    arch = ckpt.read_model_config(resolve_base(base)).get("arch", "gpt")
    if arch != "gpt":
        raise UserError(f"--base {base}: a model.arch={arch} checkpoint is not a causal LM; objective {objective} "
                        "trains one (lmforge's own GPT, or a converted GPT-2, Llama, Mistral, Mixtral)")


def reference_models(cfg: Any, base: str | Path) -> dict | None:
    """DPO's frozen reference copy when the run changes the base weights (full, freeze); else None
    (the policy with its adapters disabled is the base)."""
    from lmforge.train.objectives.dpo import KEEPS_BASE

    if cfg.objective != "dpo" or cfg.adapter.method in KEEPS_BASE:
        return None
    from lmforge.posttrain.run import load_base_for_reference
    from lmforge.train.device import resolve_device

    device = resolve_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    return {"reference": load_base_for_reference(base, device)}


def align(cfg: Any, out: str | Path, *, base: str | Path, data: str | Path | None = None,
          reward: str | Path | None = None, resume: bool = False, overwrite: bool = False, force: bool = False,
          on_step: Any = None) -> dict[str, Any]:
    """Run the recipe's preference objective on `base` (see the module doc); returns summary.json."""
    if cfg.objective not in OBJECTIVES:
        raise UserError(f"align runs objective {', '.join(OBJECTIVES)}, but the recipe says objective: "
                        f"{cfg.objective}; use configs/dpo.yaml (or reward, orpo, ppo)"
                        + ("; fine-tuning on chat data is `lmforge finetune`" if cfg.objective == "sft" else ""))
    if cfg.objective == "ppo":
        if not reward:
            raise UserError("objective ppo needs --reward DIR: a reward model (`lmforge align configs/reward.yaml`)")
        from lmforge.posttrain.ppo import train_ppo

        return train_ppo(cfg, out, base=base, reward=reward, data=data or cfg.data.file, resume=resume,
                         overwrite=overwrite, force=force, on_step=on_step)
    if reward:
        raise UserError(f"--reward is for objective ppo; objective {cfg.objective} trains on the pairs alone")
    from lmforge.posttrain.run import posttrain

    check_causal_base(base, cfg.objective)
    return posttrain(cfg, out, base=base, data=data, resume=resume, overwrite=overwrite, force=force,
                     models=reference_models(cfg, base), on_step=on_step, stage="align")


# ---- the command ---------------------------------------------------------------------------------


def cmd_align(args: argparse.Namespace) -> None:
    from lmforge.config import load_config

    cfg = load_config(args.config, args.set)
    summary = align(cfg, args.out, base=args.base, data=args.data, reward=args.reward, resume=args.resume,
                    overwrite=args.overwrite, force=args.force)
    if summary and cfg.objective != "ppo" and os.environ.get("RANK", "0") == "0":  # ppo prints its own line
        from lmforge.train.report import read_metrics

        m, last = summary.get("metrics", {}), (read_metrics(Path(args.out) / "metrics.jsonl") or [{}])[-1]
        val = m.get("best_val_loss")
        shown = ", ".join(f"{k} {last[k]:.3g}" for k in ("pref_acc", "margin") if isinstance(last.get(k), (int, float)))
        print(f"done: {cfg.objective}, {m.get('steps')} steps, best val loss "
              f"{val if val is None else round(val, 4)}{f', last step {shown}' if shown else ''}; "
              f"model: {Path(args.out)}")


def add_align_command(sub: Any) -> None:
    from lmforge.cli import add_run_flags  # cli imports this module only when it builds its parser

    p = sub.add_parser("align", help="preference training of a checkpoint: reward model, DPO, ORPO, PPO "
                                     "(docs/POSTTRAIN.md)")
    p.add_argument("config", help="YAML recipe or a preset name: reward, dpo, orpo, ppo")
    p.add_argument("--base", required=True, metavar="DIR",
                   help="the model to align (a checkpoint dir, a run dir: its best checkpoint, or a `convert "
                        "from-hf` output; usually an SFT run); its config.json and tokenizer are used")
    p.add_argument("--data", default=None, metavar="FILE",
                   help='JSONL preference pairs {"prompt" or "messages", "chosen", "rejected"} (ppo: their '
                        "prompts); as data.file (data.val_file: held-out pairs, else 5%% of FILE by content hash)")
    p.add_argument("--out", required=True, help="run dir: checkpoints, metrics, report, summary.json")
    p.add_argument("--reward", default=None, metavar="DIR", help="ppo: the reward model (a `reward` run dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set dpo.beta=0.2 (repeatable)")
    add_run_flags(p)
    p.set_defaults(func=cmd_align)
