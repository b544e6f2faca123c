"""Experiment trackers behind ``runtime.loggers``: TensorBoard (default), MLflow
and Weights & Biases. Each receives the resolved configuration once, the
per-step training scalars (``train/...``), the per-evaluation COCO metrics
(``val/...``) and the checkpoint paths; only rank 0 has trackers.

The optional ones are imported only when selected (the configuration check
names the extra to install before anything starts, see ``config.OPTIONAL_EXTRAS``). A
resumed run continues the same MLflow / W&B run: their ids are kept in
``<run dir>/trackers.json``.
"""
from __future__ import annotations

import json
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.tensorboard import SummaryWriter

from detr_deform.utils.files import write_text

RUN_IDS = "trackers.json"


class Tracker(Protocol):
    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None: ...
    def image(self, tag: str, image: torch.Tensor, step: int) -> None: ...
    def checkpoint(self, name: str, path: Path) -> None: ...
    def close(self) -> None: ...


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model": {"hidden_dim": 256}} -> {"model.hidden_dim": "256"} (tracker parameters)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict, type(None))) else str(value)
    return flat


class TensorBoardTracker:
    def __init__(self, run_dir: Path) -> None:
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step)

    def checkpoint(self, name: str, path: Path) -> None:
        pass  # the run directory itself holds them

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class MLflowTracker:
    """One MLflow run per training run (continued on resume); default store: a
    SQLite database in the run directory (``runtime.mlflow_tracking_uri`` to change)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], experiment: str, uri: str | None,
                 run_id: str | None) -> None:
        import mlflow  # optional extra: imported only when runtime.loggers selects it

        self.client = mlflow.tracking.MlflowClient(uri or f"sqlite:///{run_dir / 'mlflow.db'}")
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        if run_id is None:
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            params = [mlflow.entities.Param(k, v[:6000]) for k, v in flatten(config).items()]
            for start in range(0, len(params), 100):  # the tracking API takes at most 100 per batch
                self.client.log_batch(run_id, params=params[start:start + 100])
        self.run_id = run_id
        self._metric = mlflow.entities.Metric

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        now = int(1000 * time.time())
        metrics = [self._metric(f"{prefix}/{k}", float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        pass  # pictures go to TensorBoard only

    def checkpoint(self, name: str, path: Path) -> None:
        self.client.set_tag(self.run_id, name, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """A Weights & Biases run; offline (``wandb sync`` later) unless an API key is
    configured (``runtime.wandb_mode=auto``) or WANDB_MODE says otherwise."""

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, mode: str, run_id: str | None) -> None:
        import wandb  # optional extra: imported only when runtime.loggers selects it

        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_key_configured() else "offline")
        self.run = wandb.init(project=project, dir=str(run_dir), name=run_dir.name, config=config, mode=mode,
                              id=run_id, resume="allow" if run_id else None)
        self.run_id = self.run.id

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        self.run.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        pass  # pictures go to TensorBoard only

    def checkpoint(self, name: str, path: Path) -> None:
        self.run.summary[name] = str(path)

    def close(self) -> None:
        self.run.finish()


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def build_trackers(runtime, run_dir: Path, config: dict[str, Any], experiment: str) -> list[Tracker]:
    """The trackers of ``runtime.loggers``, continuing earlier MLflow / W&B runs of this run directory."""
    ids_file = run_dir / RUN_IDS
    ids = _read_run_ids(ids_file)
    trackers: list[Tracker] = []
    for name in runtime.loggers:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir))
        elif name == "mlflow":
            trackers.append(MLflowTracker(run_dir, config, runtime.mlflow_experiment or experiment,
                                          runtime.mlflow_tracking_uri, ids.get("mlflow")))
            ids["mlflow"] = trackers[-1].run_id
        elif name == "wandb":
            trackers.append(WandbTracker(run_dir, config, runtime.wandb_project, runtime.wandb_mode,
                                         ids.get("wandb")))
            ids["wandb"] = trackers[-1].run_id
    if ids:
        write_text(ids_file, json.dumps(ids, indent=1))
    return trackers


def _read_run_ids(path: Path) -> dict[str, str]:
    """The MLflow / W&B run ids of earlier attempts; a damaged file starts new tracker runs (with a warning)."""
    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        ids = error
    if not isinstance(ids, dict) or not all(isinstance(v, str) for v in ids.values()):
        print(f"warning: {path} is unreadable or damaged ({str(ids)[:80]}); MLflow / W&B start new runs instead of "
              f"continuing the earlier ones", file=sys.stderr)
        return {}
    return ids
