"""The training run behind ``tools/train.py``: one process, torchrun or SLURM.

``train`` reads top to bottom: resolve the run, build, resume, then per epoch
train (``loop.train_one_epoch``) → evaluate and keep the best → save.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from detr_deform.config import Config
from detr_deform.data.coco import CocoDetection
from detr_deform.data.formats import FORMAT_NAMES
from detr_deform.engine import faults
from detr_deform.engine.checkpointing import (
    Resumed,
    TrainingParts,
    gather_rng_states,
    resume_training,
    save_on_failure,
    save_training_checkpoint,
)
from detr_deform.engine.loaders import Loaders, build_datasets, build_loaders
from detr_deform.engine.loop import (
    EpochResult,
    LoopContext,
    NonFinitePolicy,
    optimizer_steps_per_epoch,
    train_one_epoch,
)
from detr_deform.engine.optim import LRSchedule, build_optimizer, lr_scale_for
from detr_deform.engine.run import ResolvedRun, inexact_resume_note, resolve_data_root, resolve_run, resume_record
from detr_deform.engine.run_dir import RunLock
from detr_deform.engine.run_logger import RunLogger, log_prediction_images
from detr_deform.engine.state import TrainState, seed_everything
from detr_deform.engine.steps import evaluate
from detr_deform.evaluation.score_threshold import DEFAULT_SCORE_THRESHOLD, best_f1_threshold
from detr_deform.io.hub import needs_fetch
from detr_deform.loading.model import init_from
from detr_deform.models.build import build_criterion, build_model, build_postprocessor
from detr_deform.models.config import ModelConfig
from detr_deform.models.proposals import refuse_too_few_tokens
from detr_deform.ops.status import operator_build_pending
from detr_deform.utils import distributed
from detr_deform.utils.files import OutputError, append_line, update_latest_link, write_text


def train(cfg: Config) -> dict[str, float]:
    """Runs a full training; returns the final validation metrics (rank 0; {} elsewhere).
    Raises TrainingInterrupted after a stop signal (a checkpoint has been written),
    NonFiniteLossError on a non-finite loss (runtime.on_nonfinite)."""
    dist_info = distributed.init_distributed(cfg.runtime.device, cfg.runtime.dist_timeout_s)
    try:
        with faults.GracefulStop() as stopper:
            return _train(cfg, dist_info, stopper)
    finally:
        distributed.cleanup()


def _train(cfg: Config, dist_info: distributed.DistInfo, stopper: faults.GracefulStop) -> dict[str, float]:
    seed_everything(cfg.runtime.seed + dist_info.rank)
    if cfg.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    data_root = resolve_data_root(cfg.data, dist_info.is_main)
    train_set, val_set = build_datasets(cfg.data, data_root, cfg.runtime.seed)
    run, lock = resolve_run(cfg, dist_info, data_root, train_set)
    try:
        return _train_in(run, lock, cfg, dist_info, stopper, train_set, val_set)
    finally:
        if lock is not None:  # the kernel would release it at exit; a run that wrote nothing leaves nothing
            lock.release(abandon=True)


def _train_in(run: ResolvedRun, lock: RunLock | None, cfg: Config, dist_info: distributed.DistInfo,
              stopper: faults.GracefulStop, train_set: CocoDetection, val_set: CocoDetection) -> dict[str, float]:
    """The run in its claimed directory (``lock``: held by rank 0, None elsewhere)."""
    logger = RunLogger(run.run_dir, dist_info.is_main)
    logger.console(f"run directory: {run.run_dir} | world size {dist_info.world_size} | device {dist_info.device}")
    for line in describe_data(cfg, train_set, val_set):
        logger.console(line)

    loaders = build_loaders(cfg, train_set, val_set, dist_info.rank, dist_info.world_size,
                            pin_memory=dist_info.device.type == "cuda")
    steps_per_epoch = optimizer_steps_per_epoch(len(loaders.train), cfg)
    parts = build_training(cfg, run.model_config(cfg), dist_info, steps_per_epoch, logger)
    _refuse_too_few_proposals(parts.model, cfg, train_set, val_set)
    state, resumed = TrainState(), None
    if run.resume_path is not None:
        resumed = resume_training(run.resume_path, parts, dist_info.rank, cfg.runtime.allow_nonfinite_weights,
                                  auto=run.resume == "auto")
        state = resumed.state
        where = f"epoch {state.next_epoch}" + (f", batch {state.batches_done}" if state.batches_done else "")
        logger.console(f"resumed from {run.resume_path} at {where} (step {state.step})")
    _start_run_files(run, cfg, logger, lock, resumed, dist_info.world_size)
    nonfinite = NonFinitePolicy(cfg.runtime.on_nonfinite, cfg.runtime.max_nonfinite_skips, run.run_dir,
                                dist_info.is_main)
    ctx = LoopContext(cfg, dist_info.device, dist_info.rank, logger, stopper, nonfinite)
    pending = operator_build_pending() if cfg.model.attn_impl != "pytorch" else None
    if pending is not None:
        logger.console(f"compiling the MSDeformAttn operator on first use (about a minute; cached in {pending.parent})")

    for epoch in range(state.next_epoch, cfg.optim.epochs):
        result = train_one_epoch(parts, loaders, state, epoch, ctx)
        if result.stopped:
            _save_last(run, cfg, parts, state, val_set, dist_info, logger)
            distributed.barrier()
            raise faults.TrainingInterrupted(
                f"stopped by {stopper.signal_name} at epoch {epoch}, step {state.step}; checkpoint written to "
                f"{run.run_dir / 'checkpoint_last.pth'}. Continue with: python tools/train.py <same arguments> "
                f"runtime.output_dir={run.run_dir} runtime.resume=auto", stopper.exit_code)
        parts.scheduler.after_epoch()
        _log_epoch(logger, state, epoch, result, dist_info.device)
        if (epoch + 1) % cfg.runtime.eval_every == 0 or epoch == cfg.optim.epochs - 1:
            try:
                evaluate_and_keep_best(parts, loaders, val_set, state, epoch, run, cfg, ctx)
            except Exception:
                # An evaluation failure must not cost the epoch's training.
                save_on_failure(run.run_dir / "checkpoint_last.pth", parts, state, run.saved_config(cfg),
                                val_set.category_names, dist_info.is_main)
                raise
        _save_last(run, cfg, parts, state, val_set, dist_info, logger)
        distributed.barrier()
    return _finish(run, state, logger, dist_info.is_main)


def build_training(cfg: Config, model_cfg: ModelConfig, dist_info: distributed.DistInfo, steps_per_epoch: int,
                   logger: RunLogger) -> TrainingParts:
    """Model (+ runtime.init_from weights, SyncBatchNorm, DDP), criterion,
    post-processor, optimizer, learning-rate schedule, fp16 scaler and EMA of a run."""
    device = dist_info.device
    # Weights by name: each node's first rank fills the cache, the others then read it.
    # Rank 0 decides for all (a path that exists on one node only must not split the ranks' barriers).
    fetch = distributed.broadcast_object(needs_fetch(model_cfg.pretrained_backbone, cfg.runtime.init_from))
    first = distributed.rank_zero_first if fetch else (lambda fn: fn())
    model = first(lambda: build_model(model_cfg)).to(device)
    if cfg.runtime.init_from:
        report = first(lambda: init_from(model, cfg.runtime.init_from,
                                         allow_nonfinite=cfg.runtime.allow_nonfinite_weights))
        logger.console(f"init_from {cfg.runtime.init_from}: {len(report['loaded'])} tensors loaded, "
                       f"{len(report['shape_mismatch'])} shape mismatches, {len(report['missing'])} missing, "
                       f"{len(report['unexpected'])} of the file's left unused")
    if dist_info.distributed and model_cfg.backbone_norm == "sync_bn":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    lr_scale = lr_scale_for(cfg.optim, dist_info.world_size)
    if lr_scale != 1.0:
        logger.console(f"optim.auto_scale_lr: learning rates x {lr_scale:g} (effective batch "
                       f"{cfg.optim.batch_size * cfg.optim.accumulate_steps * dist_info.world_size} / 32)")
    optimizer = build_optimizer(model, cfg.optim, lr_scale)
    ema = None
    if cfg.runtime.ema:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.runtime.ema_decay), use_buffers=True)
    train_model, eval_model = model, (ema.module if ema is not None else model)
    if dist_info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.runtime.compile:  # the operator is registered with torch.library, so Dynamo traces through it
        backend = cfg.runtime.compile_backend
        train_model = torch.compile(train_model, backend=backend)
        eval_model = torch.compile(eval_model, backend=backend)
    return TrainingParts(
        model=model, train_model=train_model, eval_model=eval_model, criterion=build_criterion(model_cfg),
        postprocessor=build_postprocessor(model_cfg), optimizer=optimizer,
        scheduler=LRSchedule(optimizer, cfg.optim, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type) if cfg.runtime.amp == "fp16" else None, ema=ema)


def evaluate_and_keep_best(parts: TrainingParts, loaders: Loaders, val_set: CocoDetection, state: TrainState,
                           epoch: int, run: ResolvedRun, cfg: Config, ctx: LoopContext) -> None:
    """COCO evaluation (of the EMA weights when EMA is on); a new best AP writes checkpoint_best.pth."""
    eval_model = parts.eval_model
    metrics, detections, state.metrics_table = evaluate(eval_model, parts.postprocessor, loaders.val, val_set.coco,
                                                        ctx.device, cfg.runtime.amp, coco_eval=cfg.runtime.coco_eval)
    state.metrics = metrics
    ctx.logger.record("val", state.step, {"epoch": epoch, **metrics}, tb_prefix="val")
    ctx.logger.console(f"epoch {epoch}: AP {metrics['AP']:.3f} AP50 {metrics['AP50']:.3f} "
                       f"AP75 {metrics['AP75']:.3f}")
    threshold = calibrate_threshold(val_set, detections, state, ctx)
    log_prediction_images(ctx.logger, eval_model, parts.postprocessor, val_set, cfg.runtime.vis_images, ctx.device,
                          state.step, val_set.category_names, threshold=threshold)
    if ctx.rank == 0 and metrics["AP"] > state.best_ap:
        state.best_ap = metrics["AP"]
        path = save_training_checkpoint(run.run_dir / "checkpoint_best.pth", parts, state, run.saved_config(cfg),
                                        val_set.category_names)
        ctx.logger.checkpoint("checkpoint_best", path)


def describe_data(cfg: Config, train_set: CocoDetection, val_set: CocoDetection) -> list[str]:
    """The data's layout and sizes, and a warning for images with more objects than queries
    (they are trained on, with the surplus objects unmatched, never truncated)."""
    detected = " (detected; data.format= to choose)" if cfg.data.format == "auto" and cfg.data.dataset != "demo" \
        else ""
    lines = [f"data: {FORMAT_NAMES[train_set.data_format]}{detected} | train {train_set.source_label}: "
             f"{len(train_set)} images | val {val_set.source_label}: {len(val_set)} images | "
             f"{len(train_set.category_names)} categories"]
    queries = cfg.model.num_queries
    for name, dataset in (("training", train_set), ("validation", val_set)):
        counts = dataset.objects_per_image()
        over = sum(count > queries for count in counts)
        if over:
            lines.append(f"warning: {over} {name} image(s) have more objects than model.num_queries={queries} (up "
                         f"to {max(counts)}): the model finds at most num_queries objects per image (and the COCO "
                         f"metrics count at most 100 detections per image); raise model.num_queries for such data")
    return lines


def _refuse_too_few_proposals(model: torch.nn.Module, cfg: Config, train_set: CocoDetection,
                              val_set: CocoDetection) -> None:
    """Two-stage and DINO: every input the data sizes give must have num_queries encoder tokens (before the
    first step)."""
    if not model.selects_encoder_tokens:
        return
    def sizes(dataset: CocoDetection) -> list[tuple[int, int]]:
        infos = (dataset.coco.imgs[i] for i in dataset.ids)
        return [(info["height"], info["width"]) for info in infos if "height" in info and "width" in info]
    refuse_too_few_tokens(model.num_queries, model.backbone.strides, model.num_feature_levels,
                          {"training": (sizes(train_set), min(cfg.data.train_scales)),
                           "validation": (sizes(val_set), cfg.data.val_size)}, cfg.data.max_size,
                          what="model.arch=dino" if getattr(model, "takes_targets", False) else "model.two_stage")


def calibrate_threshold(val_set: CocoDetection, detections: list[dict], state: TrainState,
                        ctx: LoopContext) -> float:
    """The score threshold that maximises F1 on the validation detections (rank 0;
    ``state.score_threshold``, hence the checkpoints); returns it, or the default
    when the model found nothing right."""
    if ctx.rank != 0:
        return DEFAULT_SCORE_THRESHOLD
    found = best_f1_threshold(val_set.coco.dataset.get("annotations", []), detections,
                              image_ids=val_set.coco.getImgIds(), step=state.step)
    state.score_threshold = found.to_dict() if found is not None else None
    ctx.logger.console(f"score threshold (maximum F1 on the validation set): {found.describe()}" if found else
                       f"score threshold: no correct detection yet, the default {DEFAULT_SCORE_THRESHOLD} is used")
    return found.threshold if found is not None else DEFAULT_SCORE_THRESHOLD


def _start_run_files(run: ResolvedRun, cfg: Config, logger: RunLogger, lock: RunLock | None,
                     resumed: Resumed | None, world_size: int) -> None:
    """Rank 0, once the resume (if any) is known to fit, holding the directory's lock: the
    run's files. config.yaml is written once, when the run is created; a resume appends what
    it changed to resumes.jsonl (and says so when the change breaks exact resumption)."""
    if not logger.enabled or lock is None:
        return
    for path in lock.remove_stale_temporaries():
        logger.console(f"removed {path.name}, left by an interrupted write")
    if not cfg.runtime.output_dir:  # runs/<experiment>/<time>: runs/<experiment>/latest names it
        try:
            update_latest_link(run.run_dir)
        except OutputError as error:  # a convenience: never a reason to stop the run
            logger.console(f"warning: {error} (runs/{cfg.experiment}/latest not updated)")
    config_file = run.run_dir / "config.yaml"
    existed = config_file.exists()
    if not existed:
        write_text(config_file, run.config_yaml(cfg))
    if run.resume and (resumed is not None or existed):  # not for resume=auto on a new directory
        previous = resumed.config if resumed is not None else _config_yaml(config_file)
        record = resume_record(previous, run.saved_config(cfg), resumed.world_size if resumed else None, world_size,
                               run.resume_path, resumed.state.step if resumed else 0)
        append_line(run.run_dir / "resumes.jsonl", json.dumps(record, default=str))
        note = inexact_resume_note(record)
        if note:
            logger.console(note)
    logger.open(cfg.runtime, run.saved_config(cfg), cfg.experiment,
                resume_step=(resumed.state.step if resumed else 0) if run.resume else None)


def _config_yaml(path: Path) -> dict:
    """The run's config.yaml as a dict ({} when it cannot be read: the resume record then lists every value)."""
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # a damaged or hand-edited file must not stop the resume
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _save_last(run: ResolvedRun, cfg: Config, parts: TrainingParts, state: TrainState, val_set: CocoDetection,
               dist_info: distributed.DistInfo, logger: RunLogger) -> None:
    rng = gather_rng_states(dist_info.world_size)  # a collective: every rank takes part
    if dist_info.is_main:
        path = save_training_checkpoint(run.run_dir / "checkpoint_last.pth", parts, state, run.saved_config(cfg),
                                        val_set.category_names, rng)
        logger.checkpoint("checkpoint_last", path)


def _log_epoch(logger: RunLogger, state: TrainState, epoch: int, result: EpochResult, device: torch.device) -> None:
    averages = distributed.all_reduce_mean(result.averages(), device)
    logger.record("epoch", state.step, {"epoch": epoch, "seconds": round(result.seconds, 2),
                                        "skipped_images": state.skipped_images,
                                        "nonfinite_skips": state.nonfinite_skips,
                                        **{f"train_{k}": v for k, v in averages.items()}})


def _finish(run: ResolvedRun, state: TrainState, logger: RunLogger, is_main: bool) -> dict[str, float]:
    if is_main and state.metrics:
        write_text(run.run_dir / "metrics.json", json.dumps(state.metrics, indent=2))
        if state.metrics_table:
            logger.console("final validation metrics (COCO bbox):\n" + state.metrics_table)
        else:  # resumed after the last evaluation: its metrics come from the checkpoint, without the table
            logger.console(f"final validation metrics (COCO bbox, from the checkpoint): AP {state.metrics['AP']:.3f} "
                           f"AP50 {state.metrics['AP50']:.3f} AP75 {state.metrics['AP75']:.3f}; all in metrics.json")
    logger.close()
    return state.metrics if is_main else {}
