"""Datasets and data loaders of a training run: the train/val datasets (COCO, VOC
or YOLO layout), the (aspect-ratio grouped, resumable) batch samplers, and the loaders
with their distributed samplers."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from detr_deform.config import Config, DataConfig
from detr_deform.data.coco import CocoDetection, collate_fn
from detr_deform.data.transforms import build_transforms


def build_datasets(data: DataConfig, root: str | Path | None, seed: int) -> tuple[CocoDetection, CocoDetection]:
    """(train, val) datasets with the official augmentations; ``root`` is the
    resolved data root (see ``DataConfig.resolved_root``)."""
    checks = dict(on_bad_sample=data.on_bad_sample, seed=seed, max_category_id=data.max_category_id)
    kwargs = dict(scales=data.train_scales, max_size=data.max_size, val_size=data.val_size,
                  crop_resize_sizes=data.crop_resize_sizes, crop_min=data.crop_min, crop_max=data.crop_max)
    train = CocoDetection.from_split(data.split_data("train", root), build_transforms("train", **kwargs), **checks)
    # An unreadable validation image is left out of the evaluation, not replaced by another one.
    val = CocoDetection.from_split(data.split_data("val", root), build_transforms("val", **kwargs), replace_bad=False,
                                   **checks)
    return train, val


def quiet_worker_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn. Ctrl-C signals the whole process group: workers
    ignore SIGINT and let the main process stop and shut them down. SLURM sends
    SIGTERM to every process of the job: a worker then exits with status 0 (not
    "killed by a signal", which would make the main process fail before it can
    write its checkpoint). The DataLoader's own shutdown still works: it ends
    workers through its queues, and with SIGTERM as a last resort."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


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


@dataclass
class Loaders:
    """``train`` iterates batches of ``train_sampler`` (a DistributedSampler whose
    epoch is set per epoch); ``train.batch_sampler.skip`` resumes mid-epoch."""
    train: DataLoader
    train_sampler: DistributedSampler
    val: DataLoader


def worker_timeout(cfg: Config, world_size: int) -> float:
    """Seconds a DataLoader worker may take for a batch before the run stops (resumable) instead of
    hanging: ``data.worker_timeout_s`` (0: no limit; no workers: none). Under DDP at most half of
    ``runtime.dist_timeout_s``: the other ranks wait for a stalled one in a collective, and all of
    them must learn of the stall and stop together before that collective times out."""
    if cfg.data.num_workers == 0 or cfg.data.worker_timeout_s == 0:
        return 0
    if world_size > 1:
        return min(cfg.data.worker_timeout_s, cfg.runtime.dist_timeout_s / 2)
    return cfg.data.worker_timeout_s


def build_loaders(cfg: Config, train: CocoDetection, val: CocoDetection, rank: int, world_size: int,
                  pin_memory: bool) -> Loaders:
    train_sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True,
                                       seed=cfg.runtime.seed)
    if cfg.data.aspect_ratio_grouping:
        groups = [int(train.coco.imgs[i]["width"] >= train.coco.imgs[i]["height"]) for i in train.ids]
        batch_sampler = AspectRatioBatchSampler(train_sampler, groups, cfg.optim.batch_size)
    else:
        batch_sampler = BatchSampler(train_sampler, cfg.optim.batch_size, drop_last=True)
    timeout = worker_timeout(cfg, world_size)
    train_loader = DataLoader(train, batch_sampler=ResumableBatchSampler(batch_sampler), collate_fn=collate_fn,
                              num_workers=cfg.data.num_workers, generator=torch.Generator(),
                              worker_init_fn=quiet_worker_signals, pin_memory=pin_memory, timeout=timeout)
    val_subset: Dataset = val
    if cfg.runtime.max_eval_images is not None:
        val_subset = torch.utils.data.Subset(val, range(min(len(val), cfg.runtime.max_eval_images)))
    val_sampler = DistributedSampler(val_subset, num_replicas=world_size, rank=rank, shuffle=False)
    val_loader = DataLoader(val_subset, batch_size=cfg.optim.batch_size, sampler=val_sampler,
                            collate_fn=collate_fn, num_workers=cfg.data.num_workers,
                            worker_init_fn=quiet_worker_signals, timeout=timeout)
    return Loaders(train_loader, train_sampler, val_loader)
