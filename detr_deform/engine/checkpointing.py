"""Training checkpoints: everything a run needs to continue exactly (model,
optimizer, scheduler, scaler, EMA, progress, random-number state of every rank),
written with ``save_checkpoint`` and read back by ``resume_training``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from detr_deform.engine.optim import LRSchedule
from detr_deform.engine.state import TrainState, rng_state, set_rng_state
from detr_deform.io.checkpoint import CheckpointError, read_checkpoint
from detr_deform.loading.model import nonfinite_tensors, save_checkpoint
from detr_deform.utils import distributed


@dataclass
class TrainingParts:
    """The objects a training run updates. ``train_model`` is ``model`` or its
    DistributedDataParallel wrapper (compiled with runtime.compile); ``eval_model``
    is ``model`` or the EMA weights (compiled likewise); checkpoints hold ``model``."""
    model: nn.Module
    train_model: nn.Module
    eval_model: nn.Module
    criterion: nn.Module
    postprocessor: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRSchedule
    scaler: torch.amp.GradScaler | None
    ema: AveragedModel | None


def gather_rng_states(world_size: int) -> dict[str, Any]:
    """Every rank's random-number state, keyed by rank (a collective when distributed)."""
    state = rng_state()
    if world_size == 1:
        return {"0": state}
    return {str(rank): s for rank, s in enumerate(distributed.all_gather_object(state))}


def save_training_checkpoint(path: Path, parts: TrainingParts, state: TrainState, config: dict[str, Any],
                             category_names: dict[int, str], rng: dict[str, Any] | None = None) -> Path:
    """Our checkpoint format with the training state beside the weights; ``config``
    is the run's resolved configuration (``ResolvedRun.saved_config``)."""
    return save_checkpoint(
        path, parts.model, config, optimizer=parts.optimizer.state_dict(),
        lr_scheduler=parts.scheduler.state_dict(),
        scaler=parts.scaler.state_dict() if parts.scaler is not None else None,
        ema=parts.ema.state_dict() if parts.ema is not None else None,
        category_names={str(k): v for k, v in category_names.items()}, rng=rng or {},
        world_size=distributed.world_size(), **state.state_dict())


@dataclass
class Resumed:
    """What a resume restored: the progress, and the configuration and number of
    processes of the attempt that wrote the checkpoint (None in older files)."""
    state: TrainState
    config: dict[str, Any]
    world_size: int | None


def resume_training(path: Path, parts: TrainingParts, rank: int, allow_nonfinite: bool = False,
                    auto: bool = False) -> Resumed:
    """Restores ``parts`` and this rank's random-number state from a training
    checkpoint. Nothing is changed when the file does not fit the model
    (CheckpointError naming the tensor) or holds NaN/inf weights (unless
    ``allow_nonfinite``). ``auto`` (runtime.resume=auto): an unreadable file's error
    names the run's other checkpoints that verify, and how to continue from one."""
    try:
        content = read_checkpoint(path)
    except CheckpointError as error:
        if not auto:
            raise
        raise CheckpointError(f"runtime.resume=auto: the newest checkpoint cannot be used: {error}. "
                              f"{_alternatives(path)}") from error
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict) or "step" not in content:
        raise CheckpointError(f"runtime.resume={path}: not a training checkpoint of ours (no model/optimizer/step); "
                              f"to start from its weights use runtime.init_from={path}")
    _check_fits(content["model"], parts.model, path)
    _check_training_state_fits(content, parts, path)
    bad = [] if allow_nonfinite else nonfinite_tensors(content["model"])
    if bad:
        raise CheckpointError(f"runtime.resume={path}: {len(bad)} weight tensor(s) hold NaN/inf (e.g. {bad[:3]}): "
                              f"training would continue from broken weights. Resume from an earlier checkpoint, or "
                              f"set runtime.allow_nonfinite_weights=true to continue anyway")
    parts.model.load_state_dict(content["model"])
    parts.optimizer.load_state_dict(content["optimizer"])
    parts.scheduler.load_state_dict(content["lr_scheduler"])
    if parts.scaler is not None and content.get("scaler"):
        parts.scaler.load_state_dict(content["scaler"])
    if parts.ema is not None and content.get("ema"):
        parts.ema.load_state_dict(content["ema"])
    state = TrainState()
    state.load_state_dict(content)
    rng = content.get("rng", {}).get(str(rank))
    if rng is not None:
        set_rng_state(rng)
    config = content.get("config")
    world_size = content.get("world_size")
    return Resumed(state, config if isinstance(config, dict) else {},
                   world_size if isinstance(world_size, int) else None)


def _alternatives(newest: Path) -> str:
    """The run's other checkpoints that verify (read in full: every checksum), with the
    progress each holds and the exact option to continue from it; never chosen silently."""
    run_dir = newest.parent
    usable = []
    for path in sorted(run_dir.glob("*.pth")):
        if path.name == newest.name:
            continue
        try:
            content = read_checkpoint(path)
        except CheckpointError:
            continue
        if isinstance(content, dict) and isinstance(content.get("model"), dict) and "step" in content:
            usable.append((int(content["step"]), path, content.get("epoch")))
    if not usable:
        return (f"No other checkpoint in {run_dir} verifies: restore a copy of {newest.name}, or start a new run "
                f"with another runtime.output_dir; nothing was deleted")
    listed = ", ".join(f"{path.name} (epoch {epoch}, step {step})" for step, path, epoch in usable)
    latest = max(usable, key=lambda item: item[0])[1]
    return (f"Checkpoints in {run_dir} that verify: {listed}. To continue from one (the progress after it is lost), "
            f"pass runtime.output_dir={run_dir} runtime.resume={latest}; nothing was deleted")


def _check_fits(saved: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    wrong = [k for k in own if k in saved and saved[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = (f"{wrong[0]} is {tuple(saved[wrong[0]].shape)} in the file but {tuple(own[wrong[0]].shape)} in "
                  f"the model" if wrong else f"{len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected "
                  f"{unexpected[:3]}")
        raise CheckpointError(
            f"runtime.resume={path}: the checkpoint does not fit the configured model ({len(wrong)} tensor(s) of "
            f"another shape, {len(missing)} missing, {len(unexpected)} unexpected; e.g. {detail}). Resume with the "
            f"run's own configuration (its config.yaml), or start a new run with runtime.init_from={path} to "
            f"fine-tune from its weights")


def _check_training_state_fits(content: dict[str, Any], parts: TrainingParts, path: Path) -> None:
    """The optimizer and schedule states must be those of the configured run: another
    set of trained parameters (model.train_backbone, frozen layers) or another kind of
    schedule cannot continue exactly, and torch would fail half-way through loading."""
    hint = (f"Resume with the run's own configuration (its config.yaml), or start a new run with "
            f"runtime.init_from={path} to keep only the weights")
    saved = content.get("optimizer")
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise CheckpointError(f"runtime.resume={path}: the file holds no usable optimizer state. {hint}")
    ours = [len(g["params"]) for g in parts.optimizer.param_groups]
    theirs = [len(g["params"]) for g in groups]
    if ours != theirs:
        raise CheckpointError(
            f"runtime.resume={path}: the optimizer state trains {theirs} parameters per group "
            f"({', '.join(str(g.get('name')) for g in parts.optimizer.param_groups)}) but the configured model "
            f"trains {ours} (model.train_backbone, the frozen layers or optim.param_dict_type differ from the "
            f"run's). {hint}")
    saved_per_step = isinstance(content.get("lr_scheduler"), dict) and "lr_lambdas" in content["lr_scheduler"]
    if saved_per_step != parts.scheduler.per_step:
        kinds = {True: "a per-step schedule (multistep, cosine or warm-up)", False: "the per-epoch StepLR"}
        raise CheckpointError(
            f"runtime.resume={path}: the run used {kinds[saved_per_step]} but optim.scheduler/optim.warmup_steps "
            f"now ask for {kinds[parts.scheduler.per_step]}; the learning-rate curve cannot continue. {hint}")


def save_on_failure(path: Path, parts: TrainingParts, state: TrainState, config: dict[str, Any],
                    category_names: dict[int, str], is_main: bool) -> None:
    """Best effort after an exception in evaluation: the epoch's training is kept
    (rank 0's random-number state only: no collective, other ranks may be gone)."""
    if is_main:
        save_training_checkpoint(path, parts, state, config, category_names,
                                 rng={"0": rng_state()})
