"""`lmforge prune`: a checkpoint dir in, a pruned checkpoint dir out (atomically).

Methods (`--sparsity F` = the fraction removed):
- `heads`: attention heads ranked by gradient-based importance (Michel et al. 2019,
  `lmforge.compress.importance`) on calibration windows, normalized per layer, removed globally
  lowest first (every layer keeps one; with grouped-query attention whole kv groups, ranked by
  their heads' summed importance) and sliced out of the weights (`lmforge.compress.structural`);
  F is the fraction of all query heads;
- `neurons`: MLP hidden units ranked by the same first-order importance (|Σ_t h ∂L/∂h| per calibration batch),
  normalized per layer, removed globally; F of all hidden units (not for MoE MLPs);
- `magnitude`: F of each block Linear's weights, smallest |w| first, set to zero (`masks`);
- `2:4`: 2 of every 4 consecutive input weights set to zero (no --sparsity: 50%).
Structural pruning (heads, neurons) is arch gpt (GPT-2- and Llama-style, dense or MoE attention);
masks work for every architecture. The output loads everywhere as it is: its config.json records
per-layer widths (`ModelConfig.layer_heads`, `layer_mlp_hidden`). `--recover-steps N` fine-tunes it on
the same training loop (`lmforge.compress.recover`). summary.json: `bytes`, `params`, `params_before`,
`sparsity` (achieved), `ppl_before`, `ppl_after`, `ppl_recovered` (with --recover-steps), and more.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.compress import heldout as H
from lmforge.compress.methods import PRUNE_METHODS
from lmforge.errors import UserError

METHODS = PRUNE_METHODS
STRUCTURAL = ("heads", "neurons")
WHAT = {"heads": "heads", "neurons": "MLP hidden units"}


def check_request(method: str, sparsity: float | None, calib_samples: int, recover_steps: int) -> None:
    """What can be refused before loading anything (one line each)."""
    if method not in METHODS:
        raise UserError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if method == "2:4":
        if sparsity is not None:
            raise UserError("--sparsity with --method 2:4: 2:4 removes 2 of every 4 weights (50%) by definition; "
                            "drop --sparsity")
    elif sparsity is None:
        raise UserError(f"--method {method} needs --sparsity F: the fraction to remove, in [0, 1)")
    elif not 0 <= sparsity < 1:
        raise UserError(f"--sparsity {sparsity}: give the fraction to remove, in [0, 1)")
    if calib_samples < 1:
        raise UserError(f"--calib-samples {calib_samples}: give a positive number of calibration windows")
    if recover_steps < 0:
        raise UserError(f"--recover-steps {recover_steps}: give 0 (no recovery) or a positive number of steps")


def check_model(model: nn.Module, method: str) -> None:
    """Structural methods need a GPT (and neurons a dense MLP)."""
    c = model.config
    if method in STRUCTURAL and c.arch != "gpt":
        raise UserError(f"--method {method}: structural pruning is implemented for arch gpt (GPT-2 and Llama "
                        f"layouts), not {c.arch}; use --method magnitude or 2:4")
    if method == "neurons" and c.moe.num_experts:
        raise UserError(f"--method neurons: model.moe.num_experts={c.moe.num_experts}; pruning expert MLPs is not "
                        "supported; use --method heads, magnitude or 2:4")


def removal(model: nn.Module, method: str, sparsity: float) -> tuple[int, int, int]:
    """(groups to remove, units per group, units in all layers) for heads/neurons; a UserError when that
    would leave a layer with none (checked before any calibration)."""
    from lmforge.compress.structural import check_removable

    if method == "heads":
        units = [b.attn.n_head for b in model.blocks]
        group = model.blocks[0].attn.n_head // model.blocks[0].attn.n_kv_head
    else:
        units, group = [b.mlp.down.in_features for b in model.blocks], 1
    n_groups = round(sparsity * sum(units) / group)
    check_removable(units, n_groups, group, WHAT[method])
    return n_groups, group, sum(units)


def prune_structural(model: nn.Module, method: str, sparsity: float, calib: list[torch.Tensor],
                     progress: bool = True) -> dict[str, Any]:
    """Rank and remove heads or neurons in place; returns what was removed ({layer: [unit, ...]})."""
    from lmforge.compress.importance import importance, normalized
    from lmforge.compress.structural import prune_heads, prune_neurons, select_lowest

    n_groups, group, total = removal(model, method, sparsity)
    scores = normalized(importance(model, calib, method, progress=progress))
    remove = select_lowest(scores, n_groups, group, WHAT[method])
    (prune_heads if method == "heads" else prune_neurons)(model, remove)
    removed = sum(len(v) for v in remove.values())
    return {"removed": {str(k): v for k, v in sorted(remove.items())}, "sparsity": removed / total,
            "units_before": total, "units_after": total - removed,
            "importance": [[round(float(x), 6) for x in s] for s in scores]}


def prune_model(model: nn.Module, method: str, sparsity: float | None, calib: list[torch.Tensor] | None,
                progress: bool = True) -> dict[str, Any]:
    """Prune `model` in place with `method`; returns the details for summary.json (`sparsity` achieved)."""
    from lmforge.compress.masks import mask_model, zero_fraction

    if method in STRUCTURAL:
        return prune_structural(model, method, sparsity, calib, progress)
    mask_model(model, method, sparsity)
    return {"sparsity": round(zero_fraction(model), 6)}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def staged(model: nn.Module, tokenizer_file: Path, folder: Path) -> Path:
    """The pruned model as a checkpoint dir `folder` (the recovery run's --init-from)."""
    from lmforge.train import checkpoint as C

    return C.save_checkpoint(folder, model.state_dict(), model.config.to_dict(), tokenizer_file, None,
                             drop=C.tied_aliases(model))


def recover_model(model: nn.Module, src: Path, work: Path, steps: int, calib: str | None, lr: float | None,
                  masked: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The pruned model after `steps` recovery steps (masks re-applied and checked), and the run's metrics."""
    from lmforge.compress.calib import trained_token_dir
    from lmforge.compress.masks import maskable_linears
    from lmforge.compress.recover import recover
    from lmforge.train import checkpoint as C

    tokens = Path(calib) if calib is not None and (Path(calib) / "meta.json").is_file() else trained_token_dir(src)
    keep = {name: linear.weight != 0 for name, linear in maskable_linears(model)} if masked else {}
    final, summary = recover(staged(model, src / "tokenizer.json", work / "pruned"), work / "run", src, tokens,
                             steps, lr=lr, masked=masked)
    recovered, _ = C.load_pretrained(final)
    for name, linear in maskable_linears(recovered):
        if name in keep and bool((linear.weight[~keep[name]] != 0).any()):
            raise RuntimeError(f"{name}: masked weights became nonzero during recovery")
    m = summary["metrics"]
    return recovered, {"recover_steps": m["steps"], "recover_val_loss": m["final_val_loss"],
                       "recover_train_loss": m["final_train_loss"], "recover_tokens": m["tokens_seen"],
                       "recover_lr": summary["config"]["train"]["lr"], "recover_tokens_dir": str(tokens)}


def prune_checkpoint(ckpt: str | Path, method: str, out: str | Path, *, sparsity: float | None = None,
                     calib: str | None = None, calib_samples: int = 128, recover_steps: int = 0,
                     recover_lr: float | None = None, eval_file: str | Path | None = None,
                     eval_tokens: int = H.DEFAULT_EVAL_TOKENS, overwrite: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """Prune the checkpoint `ckpt` (or a run dir's best) with `method` into the checkpoint dir `out`;
    returns summary.json (see the module docstring)."""
    from lmforge.compress.quantize import check_not_quantized
    from lmforge.compress.run import check_paths, heldout_note, measure
    from lmforge.train import checkpoint as C

    t0 = time.perf_counter()
    check_request(method, sparsity, calib_samples, recover_steps)
    src, out = C.resolve_checkpoint(ckpt), Path(out)
    check_not_quantized(src, "prune")
    check_paths(src, out, overwrite, "prune", "pruned")
    model, tokenizer = C.load_pretrained(src)
    check_model(model, method)
    if method in STRUCTURAL:
        removal(model, method, sparsity)
    text = H.heldout_text(src, tokenizer, eval_file, eval_tokens)
    metrics: dict[str, Any] = {"method": method, "params_before": num_params(model),
                               "bytes_before": (src / "model.safetensors").stat().st_size,
                               "ppl_before": measure(model, text, progress)}
    t1 = time.perf_counter()
    batches = None
    if method in STRUCTURAL:
        from lmforge.compress.calib import calibration_batches

        batches = calibration_batches(src, calib, calib_samples, model.config.block_size)
    details = prune_model(model, method, sparsity, batches, progress)
    metrics.update(sparsity=round(details.pop("sparsity"), 6), params=num_params(model),
                   prune_seconds=round(time.perf_counter() - t1, 3), ppl_after=measure(model, text, progress))
    if recover_steps:
        model, recovery = _recover(model, src, out, recover_steps, calib, recover_lr, method)
        metrics.update(recovery, ppl_recovered=measure(model, text, progress))
    metrics["heldout"] = heldout_note(model, text)
    settings = {"ckpt": str(ckpt), "method": method, "sparsity": sparsity, "calib": calib,
                "calib_samples": calib_samples if batches is not None else None, "recover_steps": recover_steps,
                "recover_lr": recover_lr, "eval": None if eval_file is None else str(eval_file),
                "eval_tokens": eval_tokens}
    return _write(model, src, out, metrics, settings, details, t0)


def _recover(model, src: Path, out: Path, steps: int, calib: str | None, lr: float | None, method: str):
    t = time.perf_counter()
    work = out.parent / f".{out.name}.recover{os.getpid()}"
    try:
        model, recovery = recover_model(model, src, work, steps, calib, lr, masked=method not in STRUCTURAL)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return model, {**recovery, "recover_seconds": round(time.perf_counter() - t, 3)}


def _write(model: nn.Module, src: Path, out: Path, metrics: dict[str, Any], settings: dict[str, Any],
           details: dict[str, Any], t0: float) -> dict[str, Any]:
    """The pruned checkpoint with its summary.json, atomically."""
    from lmforge.fsutil import write_summary
    from lmforge.train import checkpoint as C

    c = model.config
    metrics.update(layer_heads=c.layer_heads, layer_mlp_hidden=c.layer_mlp_hidden, **details)
    summary: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        metrics["bytes"] = (tmp / "model.safetensors").stat().st_size
        summary.update(write_summary(tmp, "prune", config=settings, inputs={"checkpoint": src}, hash_inputs=False,
                                     metrics=metrics, wall_time_s=time.perf_counter() - t0))

    C.save_checkpoint(out, model.state_dict(), {**C.read_model_config(src), **c.to_dict()}, src / "tokenizer.json",
                      None, drop=C.tied_aliases(model), write_files=write)
    return summary


def describe(summary: dict[str, Any], out: str | Path) -> str:
    """The command's closing line."""
    m = summary["metrics"]
    ppl = "" if m["ppl_before"] is None else f"; held-out perplexity {m['ppl_before']:.3f} -> {m['ppl_after']:.3f}"
    if m.get("ppl_recovered") is not None:
        ppl += f" -> {m['ppl_recovered']:.3f} after {m['recover_steps']} recovery steps"
    what = {"heads": "attention heads", "neurons": "MLP hidden units"}.get(m["method"], "block Linear weights zeroed")
    return (f"pruned {m['sparsity']:.1%} of the {what} ({m['method']}) into {out}: {m['params']:,} parameters "
            f"(from {m['params_before']:,}), {m['bytes']:,} bytes{ppl}")
