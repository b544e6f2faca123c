"""The training run behind ``tools/train.py``: one process, torchrun or SLURM."""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from detr_deform.checkpoint import read_checkpoint
from detr_deform.loading import init_from, save_checkpoint
from detr_deform.config import Config, ConfigError
from detr_deform.data.coco import CocoDetection, collate_fn, raise_worker_errors_cleanly, skipped_in
from detr_deform.data.demo import ensure_demo_dataset
from detr_deform.data.transforms import build_transforms
from detr_deform.engine import distributed, faults
from detr_deform.engine.coco_eval import format_metrics_table
from detr_deform.engine.optim import build_optimizer, build_scheduler
from detr_deform.engine.run_logger import RunLogger
from detr_deform.engine.steps import evaluate, move_targets, train_step
from detr_deform.models.build import build_criterion, build_model, build_postprocessor


def resolve_data_root(cfg: Config, dist_info: distributed.DistInfo) -> None:
    """For the demo dataset: generate it (once; ranks wait for rank 0)."""
    if cfg.data.dataset != "demo":
        return
    if dist_info.is_main:
        cfg.data.root = str(ensure_demo_dataset(cfg.data.root))
    distributed.barrier()
    cfg.data.root = str(ensure_demo_dataset(cfg.data.root))


def build_datasets(cfg: Config) -> tuple[CocoDetection, CocoDetection]:
    d = cfg.data
    kwargs = dict(scales=d.train_scales, max_size=d.max_size, val_size=d.val_size,
                  crop_resize_sizes=d.crop_resize_sizes, crop_min=d.crop_min, crop_max=d.crop_max)
    train_images, train_annotations = d.split_paths("train")
    val_images, val_annotations = d.split_paths("val")
    train = CocoDetection(train_images, train_annotations, build_transforms("train", **kwargs),
                          on_bad_sample=d.on_bad_sample, seed=cfg.runtime.seed)
    val = CocoDetection(val_images, val_annotations, build_transforms("val", **kwargs),
                        on_bad_sample=d.on_bad_sample, seed=cfg.runtime.seed)
    return train, val


def check_num_classes(cfg: Config, dataset: CocoDetection) -> None:
    from_data = dataset.num_classes
    if cfg.model.num_classes is None:
        cfg.model.num_classes = from_data
    elif cfg.model.num_classes != from_data:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but {dataset.annotation_file} declares category ids up to "
            f"{from_data - 1}, i.e. num_classes={from_data} (max id + 1); remove model.num_classes to use the "
            f"dataset's value"
        )


class ResumableBatchSampler(BatchSampler):
    """A batch sampler whose next epoch can start after the first ``skip``
    batches, without loading them (resuming in the middle of an epoch)."""

    def __init__(self, batch_sampler: BatchSampler) -> None:
        self.batch_sampler = batch_sampler
        self.sampler = batch_sampler.sampler
        self.skip = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for index, batch in enumerate(self.batch_sampler):
            if index >= skip:
                yield batch


class AspectRatioBatchSampler(BatchSampler):
    """Batches of images that are all landscape or all portrait (less padding)."""

    def __init__(self, sampler, group_ids: list[int], batch_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=True)
        self.group_ids = group_ids

    def __iter__(self):
        buckets: dict[int, list[int]] = {}
        for index in self.sampler:
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield list(bucket)
                bucket.clear()


def build_loaders(cfg: Config, train: CocoDetection, val: CocoDetection, dist_info: distributed.DistInfo):
    train_sampler = DistributedSampler(train, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True,
                                       seed=cfg.runtime.seed)
    if cfg.data.aspect_ratio_grouping:
        groups = [int(train.coco.imgs[i]["width"] >= train.coco.imgs[i]["height"]) for i in train.ids]
        batch_sampler = AspectRatioBatchSampler(train_sampler, groups, cfg.optim.batch_size)
    else:
        batch_sampler = BatchSampler(train_sampler, cfg.optim.batch_size, drop_last=True)
    generator = torch.Generator()
    train_loader = DataLoader(train, batch_sampler=ResumableBatchSampler(batch_sampler), collate_fn=collate_fn,
                              num_workers=cfg.data.num_workers, generator=generator,
                              worker_init_fn=faults.quiet_worker_signals,
                              pin_memory=dist_info.device.type == "cuda")
    val_subset = val
    if cfg.runtime.max_eval_images is not None:
        val_subset = torch.utils.data.Subset(val, range(min(len(val), cfg.runtime.max_eval_images)))
    val_sampler = DistributedSampler(val_subset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                     shuffle=False)
    val_loader = DataLoader(val_subset, batch_size=cfg.optim.batch_size, sampler=val_sampler,
                            collate_fn=collate_fn, num_workers=cfg.data.num_workers,
                            worker_init_fn=faults.quiet_worker_signals)
    return train_loader, train_sampler, val_loader


def choose_run_dir(cfg: Config, dist_info: distributed.DistInfo) -> Path:
    """runtime.output_dir, else (resume=auto) the newest run of this experiment
    that has a checkpoint, else runs/<experiment>/<time>; decided on rank 0."""
    run_dir = None
    if dist_info.is_main:
        if cfg.runtime.output_dir:
            run_dir = Path(cfg.runtime.output_dir)
            if not cfg.runtime.resume and (run_dir / "checkpoint_last.pth").is_file():
                raise ConfigError(
                    f"runtime.output_dir={run_dir} already holds a run (checkpoint_last.pth); pass "
                    f"runtime.resume=auto to continue it, or choose another output_dir (nothing was overwritten)")
        else:
            base = Path("runs") / cfg.experiment
            previous = sorted(base.glob("*/checkpoint_last.pth")) if base.is_dir() else []
            if cfg.runtime.resume == "auto" and previous:
                run_dir = previous[-1].parent
            else:
                run_dir = base / time.strftime("%Y%m%d-%H%M%S")
        run_dir = str(run_dir.resolve())
    return Path(distributed.broadcast_object(run_dir))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, keys, *rest = state["python"]
    random.setstate((version, tuple(keys), *rest))
    numpy_state = list(state["numpy"])
    numpy_state[1] = np.asarray(numpy_state[1], dtype=np.uint32)
    np.random.set_state(tuple(numpy_state))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def log_prediction_images(logger: RunLogger, model, postprocessor, dataset, count: int, device, step: int,
                          category_names: dict[int, str], threshold: float = 0.3) -> None:
    from detr_deform.visualization import denormalize, detection_labels, draw_boxes

    if not logger.enabled or count <= 0:
        return
    model.eval()
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        outputs = model([image.to(device)])
        size = torch.tensor([image.shape[-2:]], device=device)
        result = postprocessor({k: outputs[k] for k in ("pred_logits", "pred_boxes")}, size)[0]
        keep = result["scores"] > threshold
        labels = result["labels"][keep].cpu()
        drawn = draw_boxes(denormalize(image), result["boxes"][keep].cpu(),
                           detection_labels(result["scores"][keep], labels, category_names), labels.tolist())
        logger.image(f"val/predictions_{index}", drawn, step)


class TrainingInterrupted(Exception):
    """The run stopped on SIGTERM/SIGINT after writing a checkpoint; ``exit_code``
    is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
    device = dist_info.device
    seed = cfg.runtime.seed + dist_info.rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    if cfg.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if faults.restarted_by_torchrun() and not cfg.runtime.resume:
        cfg.runtime.resume = "auto"  # a worker restarted by torchrun --max-restarts continues the run

    resolve_data_root(cfg, dist_info)
    train_set, val_set = build_datasets(cfg)
    check_num_classes(cfg, train_set)
    run_dir = choose_run_dir(cfg, dist_info)
    logger = RunLogger(run_dir, dist_info.is_main)
    if dist_info.is_main:
        for path in faults.remove_stale_temporaries(run_dir):
            logger.console(f"removed {path.name}, left by an interrupted checkpoint write")
        (run_dir / "config.yaml").write_text(_to_yaml(cfg))
    logger.console(f"run directory: {run_dir} | world size {dist_info.world_size} | device {device}")

    model = build_model(cfg.model).to(device)
    if cfg.runtime.init_from:


        report = init_from(model, cfg.runtime.init_from)
        logger.console(f"init_from {cfg.runtime.init_from}: {len(report['loaded'])} tensors loaded, "
                       f"{len(report['shape_mismatch'])} shape mismatches, {len(report['missing'])} missing")
    if dist_info.distributed and cfg.model.backbone_norm == "sync_bn":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    criterion = build_criterion(cfg.model)
    postprocessor = build_postprocessor(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    scaler = torch.amp.GradScaler(device.type) if cfg.runtime.amp == "fp16" else None
    ema = None
    if cfg.runtime.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.runtime.ema_decay), use_buffers=True)
    train_model = model
    if dist_info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    start_epoch, step, best_ap, skip_batches, nonfinite_skips = 0, 0, -1.0, 0, 0
    resume_path = _resume_path(cfg, run_dir)
    if resume_path is not None:
        state = read_checkpoint(resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        step, best_ap = state["step"], state.get("best_ap", -1.0)
        nonfinite_skips = state.get("nonfinite_skips", 0)
        skip_batches = state.get("batches_done", 0)
        start_epoch = state["epoch"] if skip_batches else state["epoch"] + 1
        rng = state.get("rng", {}).get(str(dist_info.rank))
        if rng is not None:
            _set_rng_state(rng)
        where = f"epoch {start_epoch}, batch {skip_batches}" if skip_batches else f"epoch {start_epoch}"
        logger.console(f"resumed from {resume_path} at {where} (step {step})")

    train_loader, train_sampler, val_loader = build_loaders(cfg, train_set, val_set, dist_info)
    steps_per_epoch = len(train_loader)
    if cfg.runtime.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.runtime.max_steps_per_epoch)
    use_bar = dist_info.is_main and (cfg.runtime.progress == "bar" or
                                     (cfg.runtime.progress == "auto" and sys.stderr.isatty()))

    def save_last(epoch: int, batches_done: int = 0) -> None:
        rng_states = _gather_rng(dist_info)
        if dist_info.is_main:
            _save(run_dir / "checkpoint_last.pth", cfg, model, optimizer, scheduler, scaler, ema, epoch, step,
                  best_ap, metrics, val_set, rng_states, batches_done=batches_done, nonfinite_skips=nonfinite_skips)

    metrics: dict[str, float] = {}
    skipped_images = 0
    for epoch in range(start_epoch, cfg.optim.epochs):
        train_sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        train_loader.generator.manual_seed(cfg.runtime.seed * 100003 + epoch * 1009 + dist_info.rank)
        train_loader.batch_sampler.skip = skip_batches
        train_model.train()
        epoch_sums: dict[str, float] = {}
        summed_steps = 0
        epoch_start = time.time()
        bar = None
        if use_bar:
            from tqdm import tqdm

            bar = tqdm(total=steps_per_epoch, initial=skip_batches, desc=f"epoch {epoch}", dynamic_ncols=True,
                       leave=False)
        batches = raise_worker_errors_cleanly(train_loader)
        for batch_index, (images, targets) in enumerate(batches, start=skip_batches):
            if batch_index >= steps_per_epoch:
                break
            for image_id, reason in skipped_in(targets):
                skipped_images += 1
                logger.console(f"warning: skipped unreadable image (data.on_bad_sample=skip): {reason}")
            images = [image.to(device, non_blocking=True) for image in images]
            targets = move_targets(targets, device)
            losses, total, grad_norm = train_step(train_model, criterion, images, targets, optimizer,
                                                  cfg.optim.clip_max_norm, cfg.runtime.amp, scaler)
            step += 1
            if faults.is_nonfinite(total, grad_norm, scaler is not None):
                report = faults.nonfinite_report(epoch, step, targets, losses, total, grad_norm)
                if cfg.runtime.on_nonfinite == "stop" or nonfinite_skips >= cfg.runtime.max_nonfinite_skips:
                    detail = ""
                    if dist_info.is_main:
                        detail = f"; report written to {faults.write_report(run_dir, report)}"
                    why = ("runtime.on_nonfinite=stop" if cfg.runtime.on_nonfinite == "stop" else
                           f"more than runtime.max_nonfinite_skips={cfg.runtime.max_nonfinite_skips} skipped steps")
                    raise faults.NonFiniteLossError(
                        f"{faults.format_report(report)}{detail}. Stopped ({why}); the weights were not updated by "
                        f"this step and {run_dir / 'checkpoint_last.pth'} holds the last good state. Lower the "
                        f"learning rate, check the images above, or set runtime.on_nonfinite=skip")
                nonfinite_skips += 1
                logger.record("nonfinite", step, report)
                logger.console(f"warning: skipped step ({nonfinite_skips}/{cfg.runtime.max_nonfinite_skips}): "
                               f"{faults.format_report(report)}")
            else:
                if ema is not None:
                    ema.update_parameters(model)
                for key, value in losses.items():
                    epoch_sums[key] = epoch_sums.get(key, 0.0) + value
                epoch_sums["loss"] = epoch_sums.get("loss", 0.0) + total
                summed_steps += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{total:.3f}")
                if step % cfg.runtime.log_every == 0 or batch_index == steps_per_epoch - 1:
                    values = {"epoch": epoch, "loss": total, "grad_norm": float(grad_norm), **losses,
                              **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}}
                    logger.record("train", step, values, tb_prefix="train")
                    if bar is None:
                        logger.console(f"epoch {epoch} step {batch_index + 1}/{steps_per_epoch} loss {total:.4f} "
                                       f"(ce {losses['loss_ce']:.3f} bbox {losses['loss_bbox']:.3f} "
                                       f"giou {losses['loss_giou']:.3f}) lr {optimizer.param_groups[0]['lr']:.2e}")
            if stopper.requested(device):
                if bar is not None:
                    bar.close()
                save_last(epoch, batches_done=batch_index + 1)
                distributed.barrier()
                raise TrainingInterrupted(
                    f"stopped by {stopper.signal_name} at epoch {epoch}, step {step}; checkpoint written to "
                    f"{run_dir / 'checkpoint_last.pth'}. Continue with: python tools/train.py <same arguments> "
                    f"runtime.output_dir={run_dir} runtime.resume=auto", stopper.exit_code)
        if bar is not None:
            bar.close()
        skip_batches = 0
        scheduler.step()
        averages = distributed.all_reduce_mean({k: v / max(1, summed_steps) for k, v in epoch_sums.items()}, device)
        logger.record("epoch", step, {"epoch": epoch, "seconds": round(time.time() - epoch_start, 2),
                                      "skipped_images": skipped_images, "nonfinite_skips": nonfinite_skips,
                                      **{f"train_{k}": v for k, v in averages.items()}})

        is_last = epoch == cfg.optim.epochs - 1
        if (epoch + 1) % cfg.runtime.eval_every == 0 or is_last:
            eval_model = ema.module if ema is not None else model
            metrics, _, table = evaluate(eval_model, postprocessor, val_loader, val_set.coco, device, cfg.runtime.amp)
            logger.record("val", step, {"epoch": epoch, **metrics}, tb_prefix="val")
            logger.console(f"epoch {epoch}: AP {metrics['AP']:.3f} AP50 {metrics['AP50']:.3f} AP75 {metrics['AP75']:.3f}")
            log_prediction_images(logger, eval_model, postprocessor, val_set, cfg.runtime.vis_images, device, step,
                                  val_set.category_names)
            if dist_info.is_main and metrics["AP"] > best_ap:
                best_ap = metrics["AP"]
                _save(run_dir / "checkpoint_best.pth", cfg, model, optimizer, scheduler, scaler, ema, epoch, step,
                      best_ap, metrics, val_set, nonfinite_skips=nonfinite_skips)
        save_last(epoch)
        distributed.barrier()

    if dist_info.is_main and metrics:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.console("final validation metrics (COCO bbox):\n" + format_metrics_table(metrics))
    logger.close()
    return metrics if dist_info.is_main else {}


def _gather_rng(dist_info: distributed.DistInfo) -> dict[str, Any]:
    state = _rng_state()
    if not dist_info.distributed:
        return {"0": state}
    gathered: list = [None] * dist_info.world_size
    torch.distributed.all_gather_object(gathered, state)
    return {str(rank): s for rank, s in enumerate(gathered)}


def _resume_path(cfg: Config, run_dir: Path) -> Path | None:
    resume = cfg.runtime.resume
    if not resume:
        return None
    if resume == "auto":
        candidate = run_dir / "checkpoint_last.pth"
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"runtime.resume: checkpoint not found: {path}")
    return path


def _to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(asdict(cfg)))


def _save(path: Path, cfg, model, optimizer, scheduler, scaler, ema, epoch, step, best_ap, metrics, val_set,
          rng_states=None, batches_done: int = 0, nonfinite_skips: int = 0) -> None:
    """``epoch`` is the last epoch trained, completely unless ``batches_done`` > 0
    (a checkpoint written on a stop signal in the middle of the epoch)."""
    save_checkpoint(path, model, asdict(cfg), optimizer=optimizer.state_dict(),
                    lr_scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                    ema=ema.state_dict() if ema is not None else None, epoch=epoch, step=step, best_ap=best_ap,
                    metrics=metrics, category_names={str(k): v for k, v in val_set.category_names.items()},
                    rng=rng_states or {}, batches_done=batches_done, nonfinite_skips=nonfinite_skips)
