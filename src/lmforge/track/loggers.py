"""Experiment tracking: a training run's metrics sent to TensorBoard, MLflow and Weights & Biases.

    train:
      loggers: [tensorboard, mlflow]      # any of tensorboard, mlflow, wandb
      tracking_uri: ""                    # MLflow: empty = sqlite:///<run dir's parent>/mlflow.db
      experiment: lmforge                 # MLflow experiment / W&B project

Every backend is the library itself (`torch.utils.tensorboard.SummaryWriter`, `mlflow`, `wandb`),
never a re-implementation; each gets exactly the numbers written to `metrics.jsonl`, at the same
steps. Local files by default, no server: TensorBoard event files in `<run>/tensorboard/`, MLflow in
a SQLite store beside the run dir (`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`), W&B in
its own offline/online mode as the user configured it (`WANDB_MODE`, `wandb login`).

A resumed run continues the same tracking run: TensorBoard purges the steps after the checkpoint
(as `metrics.jsonl` is trimmed), MLflow and W&B re-attach to the run id kept in `<run>/tracking.json`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.fsutil import atomic_write_json

BACKENDS = {  # logger name -> (module it needs, pip package)
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}
STATE_FILE = "tracking.json"


def check_loggers(names: list[str], where: str = "") -> None:
    """Unknown or not-installed backends: one line naming the key and the package to install."""
    for name in names:
        if name not in BACKENDS:
            raise UserError(f"{where}config key train.loggers: unknown logger {name!r}; "
                            f"choose from {', '.join(BACKENDS)}")
        module, package = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{where}config key train.loggers: {name} is not installed; "
                            f"pip install {package} (or pip install 'lmforge[track]')")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The plottable numbers of one metrics.jsonl record (step and non-numbers left out)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3} (lists as their JSON text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return out


class TensorBoardLogger:
    def __init__(self, out: Path, config: dict[str, Any], start_step: int, state: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # steps after the checkpoint (logged before an interruption) are dropped, as metrics.jsonl is trimmed
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, metrics: dict[str, Any], files: list[Path]) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowLogger:
    def __init__(self, out: Path, config: dict[str, Any], start_step: int, state: dict[str, Any], *,
                 uri: str, experiment: str) -> None:
        import mlflow

        self.mlflow = mlflow
        default_store = out.resolve().parent
        env = os.environ.get("MLFLOW_TRACKING_URI")
        ours = not (uri or env)
        uri = uri or env or f"sqlite:///{default_store / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        if env is None:  # set_tracking_uri exports it: the next run of this process must not inherit it
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        if ours and mlflow.get_experiment_by_name(experiment) is None:
            # artifacts beside the store, not in an ./mlruns of whatever directory the run started from
            mlflow.create_experiment(experiment, artifact_location=(default_store / "mlartifacts").as_uri())
        mlflow.set_experiment(experiment)
        saved = state.get("mlflow", {})
        resume_id = saved.get("run_id") if start_step and saved.get("tracking_uri") == uri else None
        self.run = mlflow.start_run(run_id=resume_id, run_name=None if resume_id else out.name)
        if not resume_id:
            mlflow.log_params({k: str(v)[:500] for k, v in flat_config(config).items()})
            mlflow.set_tag("lmforge.run_dir", str(out.resolve()))
        state["mlflow"] = {"run_id": self.run.info.run_id, "tracking_uri": uri, "experiment": experiment}

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def finish(self, metrics: dict[str, Any], files: list[Path]) -> None:
        self.mlflow.log_metrics({f"final/{k}": v for k, v in scalars(metrics).items()})
        for path in files:
            if path.is_file():
                self.mlflow.log_artifact(str(path))

    def close(self) -> None:
        self.mlflow.end_run()


class WandbLogger:
    def __init__(self, out: Path, config: dict[str, Any], start_step: int, state: dict[str, Any], *,
                 experiment: str) -> None:
        import wandb

        self.wandb = wandb
        saved = state.get("wandb", {}).get("id") if start_step else None
        self.run = wandb.init(project=experiment, name=out.name, dir=str(out), config=config,
                              id=saved, resume="allow" if saved else None)
        state["wandb"] = {"id": self.run.id, "project": experiment}

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, metrics: dict[str, Any], files: list[Path]) -> None:
        self.run.summary.update(scalars(metrics))

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The run's backends as one: `log(record)` per metrics.jsonl record, `finish(summary)` at the end."""

    def __init__(self, out: Path, names: list[str], config: dict[str, Any], *, start_step: int = 0,
                 uri: str = "", experiment: str = "lmforge") -> None:
        check_loggers(names)
        self.out, self.backends = Path(out), []
        state_path = self.out / STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        for name in names:
            if name == "tensorboard":
                self.backends.append(TensorBoardLogger(self.out, config, start_step, state))
            elif name == "mlflow":
                self.backends.append(MLflowLogger(self.out, config, start_step, state, uri=uri,
                                                  experiment=experiment))
            else:
                self.backends.append(WandbLogger(self.out, config, start_step, state, experiment=experiment))
        if names:
            atomic_write_json(state_path, state)

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        for backend in self.backends:
            backend.log(int(record.get("step", 0)), values)

    def finish(self, summary: dict[str, Any] | None) -> None:
        files = [self.out / name for name in ("report.md", "loss.png", "summary.json")]
        for backend in self.backends:
            backend.finish((summary or {}).get("metrics", {}), files)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []
