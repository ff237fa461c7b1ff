"""The end-of-run report: `summary.json`, `report.md` and `loss.png` in every training run dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.config import to_dict
from lmforge.fsutil import atomic_write_text, write_summary

if TYPE_CHECKING:
    from lmforge.train.setup import TrainSetup


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict[str, Any]], out_png: Path, title: str = "") -> None:
    """Train and val loss (left axis) and learning rate (right axis) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(steps, [r["loss"] for r in records], lw=0.8, alpha=0.6, label="train loss (batch)")
    evals = [r for r in records if "val_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label="val loss")
        if any("train_eval_loss" in r for r in evals):
            ax.plot([r["step"] for r in evals], [r.get("train_eval_loss") for r in evals], "s--", ms=3,
                    label="train loss (eval batches)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color="gray", lw=0.8, ls=":", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lr_lines = lr_ax.get_legend_handles_labels()
    ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="upper right", fontsize=8)
    ax.set_title(title or "training curves")
    save_figure(fig, out_png)


def save_figure(fig, out_png: Path) -> None:
    """Save a matplotlib figure atomically (a temp name, then renamed) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)


def _sample(run, prompt: str = "\n", max_new_tokens: int = 200) -> str | None:
    """A short sample from the trained model (single process only: FSDP shards the weights);
    None for a model that does not generate text (an encoder such as BERT)."""
    from lmforge.infer.generate import can_generate, generate_text

    if run.info.enabled or not can_generate(run.raw_model):
        return None
    from lmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(run.tokenizer_file)
    return generate_text(run.raw_model, tokenizer, prompt, max_new_tokens=max_new_tokens,
                         temperature=0.8, top_k=200, seed=run.cfg.train.seed)


def _moe_lines(run, records: list[dict[str, Any]]) -> list[str]:
    """Expert utilization of a Mixture-of-Experts run, from the last logged step."""
    last = next((r for r in reversed(records) if "moe_util" in r), None)
    if last is None:
        return []
    from lmforge.models.moe import utilization_summary

    moe = run.model_cfg.moe
    util = ", ".join(f"{100 * u:.1f}" for u in last["moe_util"])
    return [f"- experts: {moe.num_experts}, top-{moe.top_k}; utilization at step {last['step']}: "
            f"{utilization_summary(last['moe_util'], last['moe_dropped'])}; per expert (%): {util}; "
            f"load-balancing loss {last['moe_aux_loss']:.3f} (even: {moe.top_k}), z-loss {last['moe_z_loss']:.3f}"]


def run_metrics(run, records: list[dict[str, Any]], stop_reason: str) -> dict[str, Any]:
    """summary.json's metrics: steps, losses, speed (from the logged steps), model and setup."""
    evals = [r for r in records if "val_loss" in r]
    timed = records[1:] or records  # the first step includes warm-up/compilation
    # rates from totals (tokens / time), not means of per-step rates, which slow steps barely move
    ms = sum(r["ms_per_step"] for r in timed) / len(timed) if timed else None
    tokens_per_s = run.tokens_per_step / (ms / 1000) if ms else None
    return {
        "steps": run.state["step"],
        "stop_reason": stop_reason,
        "tokens_seen": run.state["tokens_seen"],
        "final_train_loss": records[-1]["loss"] if records else None,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "best_val_loss": run.state["best_val_loss"] if evals else None,
        "best_step": run.state["best_step"],
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        "ms_per_step": round(ms, 2) if ms else None,
        "mfu": (round(run.flops_per_token * tokens_per_s / run.peak, 4)
                if tokens_per_s and run.peak else None),
        "params": run.raw_model.num_params(),
        "params_non_embedding": run.raw_model.num_params(exclude_embeddings=True),
        "precision": run.precision,
        "device": str(run.device),
        "world_size": run.info.world_size,
        "parallel": run.info.parallel,
    }


def _report_lines(run, metrics: dict[str, Any], records: list[dict[str, Any]], sample: str | None,
                  stop_reason: str, wall_time_s: float) -> list[str]:
    out, mc = run.out, run.model_cfg
    evals = [r for r in records if "val_loss" in r]
    fmt = lambda v, spec=".4f": "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"# Pretraining report: `{out}`",
        "",
        f"- model: {metrics['params']:,} parameters ({metrics['params_non_embedding']:,} non-embedding), "
        f"{mc.n_layer} layers x {mc.n_embd} wide, context {mc.block_size}, "
        f"{mc.pos_encoding} positions, {mc.norm}, {mc.mlp}",
        f"- data: `{run.tokens_dir}` ({run.train_batches.num_tokens:,} train tokens, "
        f"{run.val_batches.num_tokens:,} val tokens)",
        *([f"- started from the weights of `{run.init_from}`"] if run.init_from else []),
        f"- run: {metrics['steps']} steps ({stop_reason}), {metrics['tokens_seen']:,} tokens seen, "
        f"{run.precision} on {run.device}"
        + (f" x{run.info.world_size} ({run.info.parallel})" if run.info.enabled else ""),
        f"- speed: {fmt(metrics['tokens_per_s'], ',.0f')} tokens/s, {fmt(metrics['ms_per_step'], '.1f')} ms/step, "
        f"MFU {fmt(metrics['mfu'] and metrics['mfu'] * 100, '.1f')}%, wall time {wall_time_s:.1f} s",
        f"- loss: final train {fmt(metrics['final_train_loss'])}, final val {fmt(metrics['final_val_loss'])}, "
        f"best val {fmt(metrics['best_val_loss'])} at step {metrics['best_step']}",
        *_moe_lines(run, records),
        "",
        "![loss curves](loss.png)",
        "",
        "## Evaluations",
        "",
        "| step | train loss (eval) | val loss | lr |",
        "|---:|---:|---:|---:|",
        *[f"| {r['step']} | {fmt(r.get('train_eval_loss'))} | {fmt(r['val_loss'])} | {r['lr']:.2e} |" for r in evals],
        "",
    ]
    if sample is not None:
        lines += ["## Sample (temperature 0.8, top-k 200)", "", "```text", sample.strip("\n"), "```", ""]
    lines += ["## Checkpoints", "", f"- best: `{out}/checkpoints/best` (step {metrics['best_step']})",
              f"- latest: `{out}/checkpoints/step_{metrics['steps']:06d}`", ""]
    return lines


def write_run_report(run: TrainSetup, *, stop_reason: str, wall_time_s: float) -> dict[str, Any]:
    """summary.json, report.md and loss.png of a run dir from its `TrainSetup` (any loop's: its
    state, metrics.jsonl, tokens_per_step, flops_per_token and peak give the numbers); returns
    the summary."""
    out: Path = run.out
    records = read_metrics(run.metrics_path)
    metrics = run_metrics(run, records, stop_reason)
    if records:
        plot_loss(records, out / "loss.png", title=f"{out}: {metrics['params'] / 1e6:.2f}M params")
    sample = _sample(run)
    summary = write_summary(out, "pretrain", config=to_dict(run.cfg),
                            inputs={"tokens": run.tokens_dir,
                                    **({"init_from": run.init_from} if run.init_from else {})},
                            metrics=metrics,
                            wall_time_s=wall_time_s, extra={"model_config": run.model_cfg.to_dict(),
                                                            "sample": sample})
    atomic_write_text(out / "report.md", "\n".join(_report_lines(run, metrics, records, sample, stop_reason,
                                                                 wall_time_s)))
    return summary
