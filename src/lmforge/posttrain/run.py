"""Post-training runs on the pretraining loop: `posttrain(cfg, out, base=..., data=...)`.

`lmforge finetune` (objective `sft`) and `lmforge align` (reward, dpo, orpo) both run here:

1. the base (`resolve_base`): any checkpoint dir (lmforge's own, a `convert from-hf` output) or
   a run dir (its best checkpoint). A base that carries a LoRA adapter (a fine-tuned run) is
   merged first into `OUT/base` (`merged_base`): the new run starts from what that model computes;
2. the config (`base_config`): the model section is the base's `config.json` (a recipe needs no
   `model:`; only `model.dropout` may be set, any other model key that differs is refused), the
   data file is `data.file` (`--data FILE`), the tokenizer is the base's (no tokens dir);
3. the adapter (`adapter_transforms`, `cfg.adapter`): applied as a model transform
   (`lmforge.adapters.adapter_transform`), the objective's `new_heads` kept trainable;
4. `lmforge.train.setup.setup_training` with `init_from=base` and the loop's `Trainer`. Each
   checkpoint of an adapter run carries `adapter_config.json` (`checkpoint_files`), so
   `load_pretrained` (generate, chat, eval) rebuilds the fine-tuned model; at the end the
   adapter alone goes to `OUT/adapter/` (loadable onto the base: `lmforge.adapters.load_adapter`);
5. the report: trainable and total parameters and `lmforge plan`'s predicted peak memory are
   printed at the start, the measured peak next to the prediction at the end, all in
   `summary.json` (stage `finetune` or `align`).

Bad input (a base that is not a checkpoint, a bad data line, target patterns that match
nothing, an adapter for another base) is one UserError before anything is written: a run dir
this call created is removed again.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import Config
from lmforge.errors import UserError
from lmforge.fsutil import atomic_dir, atomic_write_json, atomic_write_text, write_summary
from lmforge.models.config import ModelConfig
from lmforge.train import checkpoint as ckpt
from lmforge.train import distributed as dist
from lmforge.train.init_from import INIT_FREE_KEYS
from lmforge.train.transforms import Transform

# stage names (`fsutil.STAGES`) of the objectives that run here
STAGE_OF = {"sft": "finetune", "classify": "finetune"}
BASE_DIR = "base"  # OUT/base: a base with a LoRA adapter, merged
ADAPTER_DIR = "adapter"  # OUT/adapter: the adapter alone, at the end of an adapter run
MERGED_FROM = "merged_from.json"  # in OUT/base: which checkpoint it was merged from


# ---- the base ----------------------------------------------------------------------------------


def resolve_base(path: str | Path) -> Path:
    """The checkpoint dir `--base` names (a run dir -> its best checkpoint), checked to be one."""
    if not path:
        raise UserError("--base is required: a checkpoint dir, a run dir or a `convert from-hf` output")
    from lmforge.compress.quantize import check_not_quantized

    try:
        base = ckpt.resolve_checkpoint(path)
    except UserError as e:
        raise UserError(f"--base {path}: {e}") from None
    check_not_quantized(base, "--base (fine-tuning; QLoRA quantizes the base itself)")
    for name in ("config.json", "tokenizer.json"):
        if not (base / name).is_file():
            raise UserError(f"--base {path}: {base / name} is missing; a base is a checkpoint dir with "
                            "model.safetensors, config.json and tokenizer.json")
    return base


def base_adapter_method(base: Path) -> str | None:
    """The adapter method a base checkpoint carries (None: a plain checkpoint)."""
    from lmforge.adapters import ADAPTER_CONFIG, read_adapter_config

    if not (base / ADAPTER_CONFIG).is_file():
        return None
    return read_adapter_config(base)[1].method


def merged_base(base: Path, out: Path, info: dist.DistInfo) -> Path:
    """A base that carries a LoRA/QLoRA adapter, merged into `OUT/base` (once; a resumed run
    reuses it); a plain base (or a full/freeze fine-tune) as it is. Prefix and prompt adapters
    cannot be merged: refused."""
    method = base_adapter_method(base)
    if method in (None, "full", "freeze"):
        return base
    if method in ("prefix", "prompt"):
        raise UserError(f"--base {base} carries a {method} adapter, which cannot be merged into the weights; "
                        "start from the base it was trained on, or fine-tune with adapter.method=lora")
    target = out / BASE_DIR
    stamp = source_stamp(base)
    marker = target / MERGED_FROM
    if info.is_main and not (marker.is_file() and marker.read_text() == stamp):  # else: this base, merged before
        print(f"the base {base} carries a {method} adapter: merged into {target}", flush=True)
        merge_checkpoint(base, target, write_files=lambda tmp: atomic_write_text(tmp / MERGED_FROM, stamp))
    dist.barrier(info)
    return target


def source_stamp(ckpt_dir: Path) -> str:
    """Which checkpoint (path, and size and time of its tensor files) a merged copy was made from."""
    files = [ckpt_dir / n for n in ("model.safetensors", ckpt.TRANSFORM_STATE) if (ckpt_dir / n).is_file()]
    return json.dumps({"path": str(ckpt_dir.resolve()),
                       "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]})


def merged_model(src: Path) -> nn.Module:
    """A fine-tuned checkpoint's model with its adapter folded into the weights (plain modules)."""
    from lmforge.adapters import merge_adapters

    model, _ = ckpt.load_pretrained(src)
    return merge_adapters(model)


def merge_checkpoint(src: Path, dst: Path, write_files: Callable[[Path], None] | None = None) -> None:
    """A fine-tuned checkpoint with its adapter folded in, written as a plain checkpoint (atomically)."""
    model = merged_model(src)
    ckpt.save_checkpoint(dst, model.state_dict(), ckpt.read_model_config(src), src / "tokenizer.json", None,
                         drop=ckpt.tied_aliases(model), write_files=write_files)


def load_base_for_reference(base: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A frozen copy of the base (eval mode, no gradients; a LoRA fine-tune merged): the live
    reference model of DPO or PPO, or the model that precomputes reference log-probs."""
    from lmforge.adapters import merge_adapters

    model, _ = ckpt.load_pretrained(resolve_base(base), device)
    if base_adapter_method(resolve_base(base)) in ("lora", "qlora"):
        model = merge_adapters(model)
    return model.requires_grad_(False).eval()


# ---- the config --------------------------------------------------------------------------------


def base_config(cfg: Config, base: Path, data: str | Path | None = None) -> Config:
    """A copy of `cfg` whose model section is the base's config.json and whose data.file is `data`.

    The recipe's model section must be left at its defaults, but for `model.dropout` (training
    only); a key set to another value than the base's is refused, naming it."""
    cfg = copy.deepcopy(cfg)
    saved = ckpt.read_model_config(base)
    try:
        model = ModelConfig.from_dict(saved)
    except (TypeError, ValueError, UserError) as e:
        raise UserError(f"--base {base}: config.json is not a model config ({e})") from None
    defaults, ours, theirs = ModelConfig().to_dict(), cfg.model.to_dict(), model.to_dict()
    for key, value in ours.items():
        if value != defaults.get(key) and value != theirs.get(key) and key not in INIT_FREE_KEYS:
            raise UserError(f"model.{key}={value!r}: the model comes from the base ({base}: {theirs.get(key)!r}); "
                            f"drop model.{key} from the recipe and --set")
    if ours["dropout"] != defaults["dropout"]:
        model.dropout = ours["dropout"]
    cfg.model = model
    if data:
        cfg.data.file = str(data)
    cfg.data.tokens = ""  # the base's tokenizer; the data is data.file
    return cfg


# ---- adapters ----------------------------------------------------------------------------------


def adapter_transforms(cfg: Config) -> list[Transform]:
    """The run's model transforms: `cfg.adapter`'s, the objective's new heads kept trainable (those
    this model has: `classify` names BERT's and GPT's heads)."""
    from lmforge.adapters import adapter_transform
    from lmforge.train.objectives import OBJECTIVES

    if cfg.adapter.method == "full":
        return []
    heads = OBJECTIVES[cfg.objective].new_heads

    def transform(model: nn.Module) -> nn.Module:
        names = dict(model.named_parameters())
        return adapter_transform(cfg.adapter, [h for h in heads if h in names])(model)

    transform.__name__ = f"adapter_{cfg.adapter.method}"
    return [transform]


def adapter_fingerprint(base: Path, model: nn.Module) -> str:
    """The fingerprint of the base checkpoint's frozen tensors, as `load_adapter` takes it from
    the plain base model (its state dict: the file's tensors plus tied aliases such as a tied
    lm_head), so an adapter of a QLoRA run (whose base weights went through NF4) fits the base."""
    from lmforge.adapters import base_fingerprint
    from lmforge.adapters.io import trainable_base_names
    from lmforge.models import build_model

    state = ckpt.read_weights(base)
    with torch.device("meta"):  # names only: which parameters are one tensor under two names
        plain = build_model(ModelConfig.from_dict(ckpt.read_model_config(base)))
    names_of: dict[int, list[str]] = {}
    for name, p in plain.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    for names in names_of.values():
        source = next((n for n in names if n in state), None)
        state.update({n: state[source] for n in names if source is not None and n not in state})
    return base_fingerprint(state, exclude=trainable_base_names(model))


def checkpoint_files(cfg: Config, base: Path, model: nn.Module,
                     fingerprint: str | None) -> Callable[[Path], None] | None:
    """What each checkpoint of an adapter run carries besides the weights: `adapter_config.json`
    (computed once, from the plain model after its transforms); None for full fine-tuning."""
    from lmforge.adapters import ADAPTER_CONFIG, adapter_config

    if cfg.adapter.method == "full":
        return None
    config = adapter_config(model, cfg.adapter, base, fingerprint=fingerprint)

    def write(ckpt_dir: Path) -> None:
        atomic_write_json(ckpt_dir / ADAPTER_CONFIG, config)

    return write


def check_resumed_base(resume_from: Path | None, fingerprint: str | None, base: Path) -> None:
    """A resumed adapter run must be given the base it started from (its checkpoints' fingerprint)."""
    from lmforge.adapters import ADAPTER_CONFIG

    file = None if resume_from is None else resume_from / ADAPTER_CONFIG
    if fingerprint is None or file is None or not file.is_file():
        return
    saved = json.loads(file.read_text())
    if saved.get("base_fingerprint") not in (None, fingerprint):
        raise UserError(f"--resume: {resume_from} was trained on the base {saved.get('base')}, not on --base {base} "
                        "(their weights differ); resume with the base the run started from")


def save_run_adapter(cfg: Config, base: Path, out: Path, fingerprint: str | None) -> Path | None:
    """`OUT/adapter/`: the adapter of the run's best checkpoint alone (adapter.safetensors +
    adapter_config.json), loadable onto the base; None for full and freeze runs."""
    from safetensors.torch import save_file

    from lmforge.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, adapter_state

    if cfg.adapter.method in ("full", "freeze"):
        return None
    model, _ = ckpt.load_pretrained(out)
    state = {k: v.contiguous().cpu() for k, v in adapter_state(model).items()}
    config = adapter_config(model, cfg.adapter, base, fingerprint=fingerprint)
    with atomic_dir(out / ADAPTER_DIR) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS))
        atomic_write_json(tmp / ADAPTER_CONFIG, config)
    return out / ADAPTER_DIR


# ---- the run -----------------------------------------------------------------------------------


def posttrain(cfg: Config, out: str | Path, *, base: str | Path, data: str | Path | None = None,
              resume: bool = False, overwrite: bool = False, force: bool = False,
              models: dict[str, nn.Module] | None = None, on_step: Callable[[int], None] | None = None,
              stage: str | None = None) -> dict[str, Any]:
    """Fine-tune (or align) the base checkpoint with `cfg` (its objective, adapter and train
    sections) on `data` (default cfg.data.file), writing the run to `out`; returns summary.json.

    models: extra models the objective reads (DPO's reference); stage: the summary's stage
    (default: `finetune` for sft, `align` otherwise)."""
    from lmforge.train.loop import Trainer
    from lmforge.train.setup import setup_training

    out = Path(out)
    stage = stage or STAGE_OF.get(cfg.objective, "align")
    base = resolve_base(base)
    cfg = base_config(cfg, base, data)
    info = dist.init_distributed(cfg.train.parallel, cfg.train.device)
    existing = set(out.iterdir()) if out.is_dir() else None
    trainer = None
    try:
        try:
            init = merged_base(base, out, info)
            setup = setup_training(cfg, out, info, resume=resume, overwrite=overwrite, init_from=init,
                                   transforms=adapter_transforms(cfg), force=force, models=models)
            report = RunReport(setup, base, stage)
            report.start()
            adapted = cfg.adapter.method != "full" and info.is_main  # the main process writes the files
            fingerprint = adapter_fingerprint(init, setup.raw_model) if adapted else None
            check_resumed_base(setup.resume_from, fingerprint, base)
            write_files = checkpoint_files(cfg, init, setup.raw_model, fingerprint) if info.is_main else None
        except BaseException:
            if info.is_main:
                remove_new(out, existing)  # nothing half-written
            raise
        trainer = Trainer(setup, desc=stage, write_files=write_files,
                          on_report=lambda summary: report.finish(summary,
                                                                  save_run_adapter(cfg, init, out, fingerprint)))
        return trainer.run(on_step)
    finally:
        if trainer is not None:
            trainer.close()
        dist.shutdown()


def remove_new(out: Path, existing: set[Path] | None) -> None:
    """Remove what a failed start wrote: the whole dir if it did not exist, else the new entries."""
    if existing is None:
        shutil.rmtree(out, ignore_errors=True)
        return
    for path in set(out.iterdir()) - existing if out.is_dir() else ():
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def write_merged(ckpt_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """`lmforge merge`: a fine-tuned checkpoint (a run dir -> its best) with its LoRA folded into
    the weights, as a plain checkpoint dir with summary.json."""
    import time

    t0 = time.perf_counter()
    src = resolve_base(ckpt_dir)
    method = base_adapter_method(src)
    if method is None:
        raise UserError(f"--ckpt {ckpt_dir}: {src} has no adapter_config.json (not an adapter run); it is a plain "
                        "checkpoint already")
    out = Path(out)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise UserError(f"--out {out} is inside --ckpt {src}; write the merged checkpoint elsewhere")
    summary: dict[str, Any] = {}

    def write(tmp: Path) -> None:  # summary.json inside the checkpoint before it is renamed into place
        summary.update(write_summary(tmp, "merge", inputs={"ckpt": src}, hash_inputs=False,
                                     metrics={"method": method, "params": params},
                                     wall_time_s=time.perf_counter() - t0))

    model = merged_model(src)
    params = sum(p.numel() for p in model.parameters())
    ckpt.save_checkpoint(out, model.state_dict(), ckpt.read_model_config(src), src / "tokenizer.json", None,
                         drop=ckpt.tied_aliases(model), write_files=write)
    return summary


# ---- what the run reports ----------------------------------------------------------------------


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def predicted_peak(setup: Any) -> dict[str, Any]:
    """`lmforge plan`'s peak memory of one training step of this run, and what it models."""
    from lmforge.train.fit import describe_setup, planned_lora, predict_step

    try:
        peak, _ = predict_step(setup.cfg, setup.model_cfg, setup.device, setup.precision, setup.info)
        what = describe_setup(setup.cfg, setup.precision, planned_lora(setup.cfg, setup.model_cfg))
    except Exception as e:  # noqa: BLE001 - the prediction is advice: a model it cannot size still trains
        return {"bytes": None, "setup": f"not predicted ({type(e).__name__}: {e})"}
    return {"bytes": int(peak), "setup": what}


def measured_peak(setup: Any) -> dict[str, Any]:
    """The peak memory of a training step of this run, measured: on CUDA the allocator's peak
    over the run; on CPU `lmforge.peakmem.measure_training_peak` (a step of the same model,
    adapter, objective batch and precision, on random ids)."""
    if setup.device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(setup.device)),
                "how": "torch.cuda.max_memory_allocated over the run"}
    from lmforge.peakmem import can_measure, measure_training_peak
    from lmforge.train.transforms import apply_transforms

    if not can_measure():
        return {"bytes": None, "how": "not measured (needs Linux with glibc)"}
    transforms = adapter_transforms(setup.cfg)

    def adapt(model: nn.Module) -> tuple[list[nn.Parameter], int]:
        before = sum(b.numel() * b.element_size() for b in model.buffers())
        apply_transforms(model, transforms)  # in place
        after = sum(b.numel() * b.element_size() for b in model.buffers())
        return [p for p in model.parameters() if p.requires_grad], max(0, after - before)

    precision = setup.precision if setup.precision in ("fp32", "bf16") else "fp32"
    try:
        peak = measure_training_peak(setup.model_cfg, setup.cfg.train.batch_size, precision,
                                     threads=torch.get_num_threads(), adapt=adapt, cfg=setup.cfg)
    except Exception as e:  # noqa: BLE001 - a measurement that cannot run is reported, not fatal
        return {"bytes": None, "how": f"not measured ({type(e).__name__}: {e})"}
    alone = ", one process unsharded" if setup.info.enabled else ""
    return {"bytes": int(peak["peak"]), "how": f"lmforge.peakmem.measure_training_peak (one step, CPU malloc{alone})"}


def data_report(source: Any) -> dict[str, Any] | None:
    summary = getattr(source, "summary", None)
    return summary() if callable(summary) else None


class RunReport:
    """What a post-training run prints and adds to its run report: trainable and total
    parameters, predicted and measured peak memory, the data (examples, rows, truncated)."""

    def __init__(self, setup: Any, base: Path, stage: str) -> None:
        from lmforge.adapters import trainable_counts

        self.setup, self.base, self.stage = setup, base, stage
        self.trainable, self.total = trainable_counts(setup.raw_model)
        self.predicted = predicted_peak(setup)

    def start(self) -> None:
        """The lines printed before the first step (main process)."""
        s = self.setup
        if not s.info.is_main:
            return
        method = s.cfg.adapter.method
        print(f"{self.stage}: {s.cfg.objective}, adapter {method}, base {self.base}; trainable "
              f"{self.trainable:,} of {self.total:,} parameters ({100 * self.trainable / self.total:.2f}%); "
              f"lmforge plan predicts a peak of {human_bytes(self.predicted['bytes'])} per process "
              f"({self.predicted['setup']})", flush=True)
        for source in (s.train_batches, s.val_batches):
            describe = getattr(source, "describe", None)
            if callable(describe):
                print(describe(), flush=True)

    def finish(self, summary: dict[str, Any], adapter_dir: Path | None) -> dict[str, Any]:
        """summary.json (this stage's, with the post-training numbers) and report.md's section."""
        s = self.setup
        measured = measured_peak(s)
        print(f"memory: peak {human_bytes(measured['bytes'])} measured ({measured['how']}); lmforge plan "
              f"predicted {human_bytes(self.predicted['bytes'])} ({self.predicted['setup']})", flush=True)
        post = {"method": s.cfg.adapter.method, "trainable_params": self.trainable, "total_params": self.total,
                "trainable_fraction": round(self.trainable / self.total, 6),
                "peak_memory_predicted_bytes": self.predicted["bytes"],
                "peak_memory_measured_bytes": measured["bytes"],
                "data": {"train": data_report(s.train_batches), "val": data_report(s.val_batches)}}
        before = summary.get("inputs", {})  # write_run_report's: the data (as "tokens") and init_from
        inputs = {"data": before.get("tokens"), "base": {"path": str(self.base)}}
        if "init_from" in before and before["init_from"].get("path") != str(self.base):
            inputs["init_from"] = before["init_from"]  # the base, merged (OUT/base)
        extra = {k: summary[k] for k in ("model_config", "sample") if k in summary}
        new = write_summary(s.out, self.stage, config=summary.get("config"), metrics={**summary["metrics"], **post},
                            wall_time_s=summary.get("wall_time_s"),
                            extra={"inputs": inputs, **extra, "memory": {"predicted": self.predicted,
                                                                         "measured": measured},
                                   "adapter_dir": None if adapter_dir is None else str(adapter_dir)})
        self.write_markdown(post, measured, adapter_dir)
        return new

    def write_markdown(self, post: dict[str, Any], measured: dict[str, Any], adapter_dir: Path | None) -> None:
        file = self.setup.out / "report.md"
        text = file.read_text() if file.exists() else ""
        title = {"finetune": "Fine-tuning", "align": "Alignment"}.get(self.stage, self.stage)
        text = text.replace("# Pretraining report:", f"# {title} report:", 1)
        data = post["data"]["train"] or {}
        lines = ["", f"## {title}", "",
                 f"- base: `{self.base}`; objective {self.setup.cfg.objective}, adapter {post['method']}"
                 + (f" (saved alone in `{adapter_dir}`)" if adapter_dir else ""),
                 f"- parameters: {self.trainable:,} trainable of {self.total:,} "
                 f"({100 * post['trainable_fraction']:.2f}%)",
                 f"- peak memory: {human_bytes(measured['bytes'])} measured ({measured['how']}), "
                 f"{human_bytes(self.predicted['bytes'])} predicted by lmforge plan ({self.predicted['setup']})"]
        if data:
            lines.append(f"- train data: {data.get('examples', 'n/a')} examples in {data.get('rows', 'n/a')} rows, "
                         f"{data.get('truncated', 0)} truncated, {data.get('dropped', 0)} without a reply to train on")
        atomic_write_text(file, text.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
