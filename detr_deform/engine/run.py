"""What a training run's configuration leaves open, decided once at start-up:
the run directory (claimed: created and locked by rank 0, see
:mod:`detr_deform.engine.run_dir`), the data root, the number of classes, the
checkpoint to resume from. The configuration itself is never written to;
``ResolvedRun`` holds these values, ``saved_config`` is what the run files
record, and ``resume_record`` what a resume changed (``resumes.jsonl``)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detr_deform.config import Config, ConfigError, DataConfig
from detr_deform.data.coco import CocoDetection
from detr_deform.engine import faults
from detr_deform.engine.run_dir import RunLock, create_run_dir, lock_run_dir, run_files
from detr_deform.models.config import ModelConfig
from detr_deform.utils import distributed
from detr_deform.utils.files import OutputError, writing

# Changes that make a resumed run differ from the uninterrupted one (other batches, other steps per epoch).
INEXACT_KEYS = ("optim.batch_size", "optim.accumulate_steps", "world_size")
# Keys that name the run rather than configure it.
NOT_CHANGES = ("runtime.resume", "runtime.output_dir")


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
                train_set: CocoDetection) -> tuple[ResolvedRun, RunLock | None]:
    """Decides the open values and claims the run directory (rank 0: created if new and
    locked, the lock returned; no run file is written); ConfigError when they conflict
    or another live run holds the directory."""
    resume = cfg.runtime.resume
    if faults.restarted_by_torchrun() and not resume:
        resume = "auto"  # a worker restarted by torchrun --max-restarts continues the run
    num_classes = _num_classes(cfg.model, train_set)
    if resume and resume != "auto" and not Path(resume).is_file():
        raise ConfigError(f"runtime.resume: checkpoint not found: {resume}")
    run_dir, lock = _claim_run_dir(cfg, resume, dist_info.is_main)
    return ResolvedRun(run_dir, data_root, num_classes, resume, _resume_path(resume, run_dir)), lock


def _num_classes(model: ModelConfig, dataset: CocoDetection) -> int:
    from_data = dataset.num_classes
    if model.num_classes is not None and model.num_classes != from_data:
        raise ConfigError(
            f"model.num_classes={model.num_classes} but {dataset.annotation_file} declares category ids up to "
            f"{from_data - 1}, i.e. num_classes={from_data} (max id + 1); remove model.num_classes to use the "
            f"dataset's value"
        )
    if model.arch == "dino" and model.dn_labelbook_size is not None and model.dn_labelbook_size < from_data:
        # DINO's noisy labels index the label embedding (the original fails with a CUDA index assertion).
        raise ConfigError(
            f"model.dn_labelbook_size={model.dn_labelbook_size} is smaller than the num_classes={from_data} of "
            f"{dataset.annotation_file} (max category id + 1): set model.dn_labelbook_size>={from_data}, or null to "
            f"follow the dataset")
    return from_data


def _claim_run_dir(cfg: Config, resume: str | None, is_main: bool) -> tuple[Path, RunLock | None]:
    """Rank 0 chooses and locks the directory; every rank gets it, or the same error."""
    lock, failure = None, None
    if is_main:
        try:
            lock = _claim(cfg, resume)
        except (ConfigError, OutputError) as error:
            failure = error
    outcome = distributed.broadcast_object(
        (str(lock.run_dir) if lock else None, (type(failure).__name__, str(failure)) if failure else None))
    if failure is not None:
        raise failure
    if outcome[1] is not None:  # another rank: the error rank 0 reports
        kind, message = outcome[1]
        raise (OutputError if kind == "OutputError" else ConfigError)(message)
    return Path(outcome[0]), lock


def _claim(cfg: Config, resume: str | None) -> RunLock:
    """runtime.output_dir, else (resume=auto) the newest run of this experiment that has
    a checkpoint, else a new runs/<experiment>/<time>[-N]; locked. A new run refuses a
    directory that holds any run file (checked before and again under the lock)."""
    if cfg.runtime.output_dir:
        run_dir = Path(cfg.runtime.output_dir).resolve()
        what = f"runtime.output_dir={run_dir}"
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"{what} is a file, not a folder: choose a folder for the run's files (nothing was "
                              f"touched)")
        if not resume:
            _refuse_existing_run(run_dir, what)
        with writing(run_dir):
            try:
                run_dir.mkdir(parents=True)
                created = True
            except FileExistsError:
                created = False
        lock = lock_run_dir(run_dir, what, created)
    else:
        base = Path("runs").resolve() / cfg.experiment
        previous = sorted(base.glob("*/checkpoint_last.pth")) if base.is_dir() else []
        if resume == "auto" and previous:
            run_dir, created = previous[-1].parent, False
        else:
            run_dir, created = create_run_dir(base, time.strftime("%Y%m%d-%H%M%S")), True
        what = f"run directory {run_dir}"
        lock = lock_run_dir(run_dir, what, created)
    if not resume:
        try:
            _refuse_existing_run(run_dir, what)  # another run may have written here since the first check
        except ConfigError:
            lock.release(abandon=True)
            raise
    return lock


def _refuse_existing_run(run_dir: Path, what: str) -> None:
    found = run_files(run_dir)
    if found:
        raise ConfigError(f"{what} already holds a run ({', '.join(found[:5])}); pass runtime.resume=auto to continue "
                          f"it, or choose another output_dir (nothing was overwritten)")


def _resume_path(resume: str | None, run_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        candidate = run_dir / "checkpoint_last.pth"
        return candidate if candidate.is_file() else None
    return Path(resume)


def resume_record(previous: dict[str, Any], current: dict[str, Any], previous_world: int | None, world: int,
                  checkpoint: Path | None, step: int) -> dict[str, Any]:
    """The ``resumes.jsonl`` entry of a resume: when, from which checkpoint and step, and
    every configuration value that differs from the attempt before (``key: [old, new]``)."""
    old, new = _flatten(previous), _flatten(current)
    changed = {key: [old.get(key), new.get(key)] for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key) and key not in NOT_CHANGES}
    if previous_world is not None and previous_world != world:
        changed["world_size"] = [previous_world, world]
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(checkpoint) if checkpoint else None,
            "step": step, "changed": changed}


def inexact_resume_note(record: dict[str, Any]) -> str | None:
    """One line when a change breaks exact resumption (batch size, accumulation, world size)."""
    breaking = [f"{key} {old}->{new}" for key, (old, new) in record["changed"].items() if key in INEXACT_KEYS]
    if not breaking:
        return None
    return (f"note: resuming with {', '.join(breaking)}: the batches and steps per epoch differ from the interrupted "
            f"run's, so training continues but not exactly as it would have without the interruption")


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat
