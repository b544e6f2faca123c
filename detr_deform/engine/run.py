"""What a training run's configuration leaves open, decided once at start-up:
the run directory, the data root, the number of classes, the checkpoint to
resume from. The configuration itself is never written to; ``ResolvedRun``
holds these values, and ``saved_config`` is what the run files record."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detr_deform.config import Config, ConfigError, DataConfig
from detr_deform.data.coco import CocoDetection
from detr_deform.engine import distributed, faults
from detr_deform.models.config import ModelConfig


@dataclass(frozen=True)
class ResolvedRun:
    run_dir: Path
    data_root: str | None
    num_classes: int
    resume: str | None             # runtime.resume, or "auto" for a worker restarted by torchrun
    resume_path: Path | None       # the checkpoint to resume from (None: a new run)

    def model_config(self, cfg: Config) -> ModelConfig:
        return dataclasses.replace(cfg.model, num_classes=self.num_classes)

    def saved_config(self, cfg: Config) -> dict[str, Any]:
        """The configuration as run, resolved values filled in (config.yaml, checkpoints)."""
        config = asdict(cfg)
        config["model"]["num_classes"] = self.num_classes
        config["data"]["root"] = self.data_root
        config["runtime"]["resume"] = self.resume
        return config

    def config_yaml(self, cfg: Config) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.saved_config(cfg)))


def resolve_data_root(data: DataConfig, is_main: bool) -> str | None:
    """data.root; for the demo dataset, generated once (other ranks wait for rank 0)."""
    if data.dataset != "demo":
        return data.root
    if is_main:
        data.resolved_root()
    distributed.barrier()
    return data.resolved_root()


def resolve_run(cfg: Config, dist_info: distributed.DistInfo, data_root: str | None,
                train_set: CocoDetection) -> ResolvedRun:
    """Decides the open values (no file is written); ConfigError when they conflict."""
    resume = cfg.runtime.resume
    if faults.restarted_by_torchrun() and not resume:
        resume = "auto"  # a worker restarted by torchrun --max-restarts continues the run
    num_classes = _num_classes(cfg.model, train_set)
    run_dir = _choose_run_dir(cfg, resume, dist_info.is_main)
    return ResolvedRun(run_dir, data_root, num_classes, resume, _resume_path(resume, run_dir))


def _num_classes(model: ModelConfig, dataset: CocoDetection) -> int:
    from_data = dataset.num_classes
    if model.num_classes is not None and model.num_classes != from_data:
        raise ConfigError(
            f"model.num_classes={model.num_classes} but {dataset.annotation_file} declares category ids up to "
            f"{from_data - 1}, i.e. num_classes={from_data} (max id + 1); remove model.num_classes to use the "
            f"dataset's value"
        )
    return from_data


def _choose_run_dir(cfg: Config, resume: str | None, is_main: bool) -> Path:
    """runtime.output_dir, else (resume=auto) the newest run of this experiment
    that has a checkpoint, else runs/<experiment>/<time>; decided on rank 0."""
    run_dir = None
    if is_main:
        if cfg.runtime.output_dir:
            run_dir = Path(cfg.runtime.output_dir)
            if not resume and (run_dir / "checkpoint_last.pth").is_file():
                raise ConfigError(
                    f"runtime.output_dir={run_dir} already holds a run (checkpoint_last.pth); pass "
                    f"runtime.resume=auto to continue it, or choose another output_dir (nothing was overwritten)")
        else:
            base = Path("runs") / cfg.experiment
            previous = sorted(base.glob("*/checkpoint_last.pth")) if base.is_dir() else []
            if resume == "auto" and previous:
                run_dir = previous[-1].parent
            else:
                run_dir = base / time.strftime("%Y%m%d-%H%M%S")
        run_dir = str(run_dir.resolve())
    return Path(distributed.broadcast_object(run_dir))


def _resume_path(resume: str | None, run_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        candidate = run_dir / "checkpoint_last.pth"
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"runtime.resume: checkpoint not found: {path}")
    return path
