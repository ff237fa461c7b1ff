"""`lmforge quantize`: a checkpoint dir in, a quantized checkpoint dir out (atomically).

The output is a checkpoint dir that `load_pretrained` (so generate, chat, eval, serve) loads as
it is: config.json, model.safetensors (the quantized tensors under their modules' names),
quant_config.json, the tokenizer, and summary.json with `bytes` (model.safetensors on disk),
`bytes_before`, `ppl_before`/`ppl_after` on held-out text (`heldout.py`), `calib_seconds`
(collecting calibration data and running GPTQ/AWQ; 0 for the rest), `quantize_seconds`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lmforge.compress import heldout as H
from lmforge.compress.quantize import (
    BITS,
    CAST,
    INT4_METHODS,
    QUANT_CONFIG,
    check_group_size,
    check_method,
    quant_config,
    quantize_model,
)
from lmforge.errors import UserError
from lmforge.fsutil import atomic_write_json, write_summary


def check_inputs(src: Path, out: Path, method: str, group_size: int, overwrite: bool) -> None:
    """What can be refused before loading anything (one line each, nothing written)."""
    check_method(method)
    if method in INT4_METHODS and group_size not in (32, 64, 128):
        raise UserError(f"--group-size {group_size}: use 32, 64 or 128")
    if (src / QUANT_CONFIG).is_file():
        raise UserError(f"--ckpt {src} is quantized already ({QUANT_CONFIG}); quantize the original checkpoint")
    check_paths(src, out, overwrite, "quantize", "quantized")


def check_paths(src: Path, out: Path, overwrite: bool, action: str, made: str) -> None:
    """The checks every compression command makes on --ckpt and --out (`action` the verb, e.g. "prune";
    `made` what the output is, e.g. "pruned"): no adapter checkpoint, --out not inside --ckpt, --out empty."""
    if (src / "adapter_config.json").is_file():
        raise UserError(f"--ckpt {src} is a fine-tuning checkpoint with an adapter; fold it in first "
                        f"(`lmforge merge --ckpt {src} --out DIR`) and {action} DIR")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise UserError(f"--out {out} is inside --ckpt {src}; write the {made} checkpoint elsewhere")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it, or another --out")


def measure(model, text: H.Heldout | None, progress: bool) -> float | None:
    from lmforge.infer.generate import is_encoder_decoder
    from lmforge.models import has_capability

    if text is None or not has_capability(model, "generate") or is_encoder_decoder(model):
        return None
    return H.perplexity(model, text, progress=progress)


def heldout_note(model, text: H.Heldout | None) -> str:
    from lmforge.infer.generate import is_encoder_decoder
    from lmforge.models import has_capability

    if not has_capability(model, "generate") or is_encoder_decoder(model):
        return "perplexity is measured for decoder-only language models only; not for this architecture"
    if text is None:
        return "no held-out text: the checkpoint's run records no token dir; pass --eval FILE"
    return text.source


def calibrate(src: Path, method: str, calib: str | None, samples: int, block_size: int) -> list | None:
    if method not in ("gptq", "awq"):
        return None
    from lmforge.compress.calib import calibration_batches

    return calibration_batches(src, calib, samples, block_size)


def quantize_checkpoint(ckpt: str | Path, method: str, out: str | Path, *, group_size: int = 128,
                        symmetric: bool | None = None, calib: str | None = None, calib_samples: int = 128,
                        eval_file: str | Path | None = None, eval_tokens: int = H.DEFAULT_EVAL_TOKENS,
                        overwrite: bool = False, progress: bool = True, act_order: bool = False,
                        damp: float = 0.01, quantize_head: bool = False) -> dict[str, Any]:
    """Quantize the checkpoint `ckpt` (or a run dir's best) with `method` into the checkpoint dir `out`.

    quantize_head: also an 8-bit output layer (a copy when tied to the embeddings; `quantize_model(lm_head=True)`).

    symmetric None: the method's default (asymmetric for awq, symmetric otherwise); act_order and damp
    are GPTQ's (columns by decreasing Hessian diagonal; dampening as a fraction of its mean). Returns
    summary.json."""
    from lmforge.train import checkpoint as C

    t0 = time.perf_counter()
    src, out = C.resolve_checkpoint(ckpt), Path(out)
    check_inputs(src, out, method, group_size, overwrite)
    if not 0 <= damp < 1:
        raise UserError(f"--damp {damp}: give a fraction of the Hessian's mean diagonal in [0, 1), e.g. 0.01")
    symmetric = (method != "awq") if symmetric is None else symmetric
    model, tokenizer = C.load_pretrained(src)
    if method in INT4_METHODS:  # before the slow part
        check_group_size(model, group_size)
    text = H.heldout_text(src, tokenizer, eval_file, eval_tokens)
    ppl_before = measure(model, text, progress)
    t1 = time.perf_counter()
    batches = calibrate(src, method, calib, calib_samples, model.config.block_size)
    options = {"act_order": act_order, "damp": damp} if method == "gptq" else {}
    model = quantize_model(model, method, group_size=group_size, symmetric=symmetric, calib=batches,
                           lm_head=quantize_head, **options)
    t2 = time.perf_counter()
    ppl_after = measure(model, text, progress)
    config = quant_config(model, method, group_size=group_size, symmetric=symmetric)
    settings = {"ckpt": str(ckpt), "method": method, "group_size": config["group_size"], "symmetric": symmetric,
                "calib": calib, "calib_samples": calib_samples if batches is not None else None,
                "eval": None if eval_file is None else str(eval_file), "eval_tokens": eval_tokens,
                "quantize_head": quantize_head, **options}
    metrics: dict[str, Any] = {"method": method, "bits": BITS[method], "modules": len(config["modules"]),
                               "bytes_before": (src / "model.safetensors").stat().st_size,
                               "ppl_before": ppl_before, "ppl_after": ppl_after,
                               "calib_seconds": round(t2 - t1, 3) if batches is not None else 0.0,
                               "quantize_seconds": round(t2 - t1, 3), "heldout": heldout_note(model, text)}
    summary: dict[str, Any] = {}

    def write(tmp: Path) -> None:  # quant_config.json and summary.json inside the checkpoint before its rename
        atomic_write_json(tmp / QUANT_CONFIG, config)
        metrics["bytes"] = (tmp / "model.safetensors").stat().st_size
        metrics["compression"] = round(metrics["bytes_before"] / metrics["bytes"], 3)
        summary.update(write_summary(tmp, "quantize", config=settings, inputs={"checkpoint": src}, hash_inputs=False,
                                     metrics=metrics, wall_time_s=time.perf_counter() - t0))

    C.save_checkpoint(out, model.state_dict(), C.read_model_config(src), src / "tokenizer.json", None,
                      drop=C.tied_aliases(model), write_files=write)
    return summary


def describe(summary: dict[str, Any], out: str | Path) -> str:
    """The command's closing line."""
    m = summary["metrics"]
    ppl = ("" if m["ppl_before"] is None else
           f"; held-out perplexity {m['ppl_before']:.3f} -> {m['ppl_after']:.3f}")
    what = (f"cast every parameter to {m['method']}" if m["method"] in CAST else
            f"quantized {m['modules']} Linears with {m['method']}")
    return (f"{what} into {out}: {m['bytes']:,} bytes "
            f"({m['compression']}x smaller than {m['bytes_before']:,}){ppl}")
