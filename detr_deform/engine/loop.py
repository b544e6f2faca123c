"""One training epoch: (micro-)batches → ``accumulated_step`` → bookkeeping (EMA, loss sums,
logging, progress), with the non-finite-loss policy and stop signals."""
from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from detr_deform.config import Config, ConfigError
from detr_deform.data.coco import raise_worker_errors_cleanly, skipped_in
from detr_deform.engine import faults, loader_faults
from detr_deform.engine.checkpointing import TrainingParts
from detr_deform.engine.loaders import Loaders
from detr_deform.engine.run_logger import RunLogger
from detr_deform.engine.state import TrainState
from detr_deform.engine.steps import Batch, accumulated_step, move_targets
from detr_deform.utils import distributed

EARLY_STEPS = (1, 2, 5, 10)  # steps that print a console line before the first log_every line (no bar)


@dataclass
class NonFinitePolicy:
    """runtime.on_nonfinite: ``stop`` raises NonFiniteLossError with a report
    (also written as ``nonfinite_stepN.json`` by rank 0); ``skip`` drops the step
    (the weights were not updated), at most ``max_skips`` times in a run."""
    mode: str
    max_skips: int
    run_dir: Path
    is_main: bool

    def handle(self, report: dict, state: TrainState, logger: RunLogger) -> None:
        if self.mode == "stop" or state.nonfinite_skips >= self.max_skips:
            detail = f"; report written to {faults.write_report(self.run_dir, report)}" if self.is_main else ""
            why = ("runtime.on_nonfinite=stop" if self.mode == "stop" else
                   f"more than runtime.max_nonfinite_skips={self.max_skips} skipped steps")
            raise faults.NonFiniteLossError(
                f"{faults.format_report(report)}{detail}. Stopped ({why}); the weights were not updated by "
                f"this step and {self.run_dir / 'checkpoint_last.pth'} holds the last good state. Lower the "
                f"learning rate, check the images above, or set runtime.on_nonfinite=skip")
        state.nonfinite_skips += 1
        logger.record("nonfinite", state.step, report)
        logger.console(f"warning: skipped step ({state.nonfinite_skips}/{self.max_skips}): "
                       f"{faults.format_report(report)}")


@dataclass
class LoopContext:
    """What the epoch loop needs besides the model parts, the data and the state."""
    cfg: Config
    device: torch.device
    rank: int
    logger: RunLogger
    stopper: faults.GracefulStop
    nonfinite: NonFinitePolicy


@dataclass
class EpochResult:
    """Per-term loss sums over the finite steps; ``stopped``: a stop signal ended the epoch early."""
    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    stopped: bool = False

    def add(self, losses: dict[str, float], total: float) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.sums["loss"] = self.sums.get("loss", 0.0) + total
        self.steps += 1

    def averages(self) -> dict[str, float]:
        return {k: v / max(1, self.steps) for k, v in self.sums.items()}


def train_one_epoch(parts: TrainingParts, loaders: Loaders, state: TrainState, epoch: int,
                    ctx: LoopContext) -> EpochResult:
    """Trains epoch ``epoch`` from ``state.batches_done`` on (a resumed epoch
    skips the micro-batches already done). One optimizer step takes
    ``optim.accumulate_steps`` micro-batches (an incomplete group at the end of
    the epoch is dropped); ``state`` is updated after every step. Returns early,
    with ``stopped``, when any rank got a stop signal or a stalled DataLoader worker
    (always at a step boundary). Raises TrainingFailed (one line) for a killed
    DataLoader worker or an out-of-memory error."""
    cfg = ctx.cfg
    loader = loaders.train
    loaders.train_sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    loader.generator.manual_seed(cfg.runtime.seed * 100003 + epoch * 1009 + ctx.rank)
    loader.batch_sampler.skip = state.batches_done
    steps_per_epoch = optimizer_steps_per_epoch(len(loader), cfg)
    parts.train_model.train()
    result = EpochResult()
    start = time.time()
    watch = loader_faults.WorkerWatch(loader, "training")
    try:
        _train_steps(parts, watch, state, epoch, steps_per_epoch, ctx, result)
    except (RuntimeError, MemoryError) as error:
        raise _one_line_failure(error, watch, state, epoch, ctx) from error
    if not result.stopped:
        state.epoch, state.batches_done = epoch, 0
    result.seconds = time.time() - start
    return result


def _train_steps(parts: TrainingParts, watch: loader_faults.WorkerWatch, state: TrainState, epoch: int,
                 steps_per_epoch: int, ctx: LoopContext, result: EpochResult) -> None:
    cfg, logger = ctx.cfg, ctx.logger
    accumulate = cfg.optim.accumulate_steps
    first_step = state.batches_done // accumulate
    bar = _progress_bar(cfg, ctx.rank, steps_per_epoch, first_step, epoch)
    start = time.time()  # the early steps' console lines give the time per step
    groups = _micro_batch_groups(raise_worker_errors_cleanly(watch), accumulate, ctx, state)
    steps = itertools.islice(groups, max(0, steps_per_epoch - first_step))
    for step_index in itertools.count(first_step):
        micro_batches = _next_group(steps)
        # Agreed before the step's collectives: a rank whose worker stalled stops every rank here
        # (the others wait in this all-reduce, shorter than runtime.dist_timeout_s, not in DDP's backward).
        stalled = isinstance(micro_batches, loader_faults.WorkerStalled)
        if distributed.any_rank(stalled, ctx.device):
            ctx.stopper.stop_for(str(micro_batches) if stalled else "a stalled DataLoader worker on another rank",
                                 faults.STOPPED_RESUMABLE)
            result.stopped = True
            break
        if micro_batches is None:
            break
        losses, total, grad_norm = accumulated_step(parts.train_model, parts.criterion, micro_batches,
                                                    parts.optimizer, cfg.optim.clip_max_norm, cfg.runtime.amp,
                                                    parts.scaler)
        state.step += 1
        parts.scheduler.after_step()
        # Every rank takes the same decision (under fp16 only the rank that hit a NaN loss sees it):
        # the policy, the EMA and the logged means stay in step across ranks.
        if distributed.any_rank(faults.is_nonfinite(total, grad_norm, parts.scaler is not None), ctx.device):
            targets = [t for _, batch_targets in micro_batches for t in batch_targets]
            ctx.nonfinite.handle(faults.nonfinite_report(epoch, state.step, targets, losses, total, grad_norm),
                                 state, logger)
        else:
            if parts.ema is not None:
                parts.ema.update_parameters(parts.model)
            result.add(losses, total)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total:.3f}")
            if state.step % cfg.runtime.log_every == 0 or step_index == steps_per_epoch - 1:
                _log_step(logger, parts.optimizer, state.step, epoch, step_index, steps_per_epoch, losses, total,
                          grad_norm, console=bar is None)
            elif bar is None and state.step in EARLY_STEPS:  # console only: the log keeps its log_every rhythm
                logger.console(f"epoch {epoch} step {step_index + 1}/{steps_per_epoch} loss {total:.4f} "
                               f"({(time.time() - start) / (step_index + 1 - first_step):.2f} s/step; then a line "
                               f"every runtime.log_every={cfg.runtime.log_every} steps)")
        state.epoch, state.batches_done = epoch, (step_index + 1) * accumulate
        if ctx.stopper.requested(ctx.device):
            result.stopped = True
            break
    if bar is not None:
        bar.close()


def _next_group(steps: Iterator[list[Batch]]) -> list[Batch] | loader_faults.WorkerStalled | None:
    """The next group of micro-batches, None at the end of the epoch, or the stall."""
    try:
        return next(steps)
    except StopIteration:
        return None
    except loader_faults.WorkerStalled as stall:
        return stall


def _one_line_failure(error: BaseException, watch: loader_faults.WorkerWatch, state: TrainState, epoch: int,
                      ctx: LoopContext) -> BaseException:
    """TrainingFailed for a dead DataLoader worker or an out-of-memory error (``error`` itself otherwise)."""
    where = f"epoch {epoch}, step {state.step + 1}"
    died = loader_faults.describe_worker_death(error, watch)
    if died is not None:
        message = f"{died} (at {where})"
    elif loader_faults.is_out_of_memory(error):
        message = loader_faults.describe_out_of_memory(error, ctx.cfg.optim.batch_size,
                                                       ctx.cfg.optim.accumulate_steps, where)
    else:
        return error
    return faults.TrainingFailed(f"error: {message}. Nothing was written for this step: "
                                 f"{faults.resume_hint(ctx.nonfinite.run_dir)}")


def optimizer_steps_per_epoch(micro_batches: int, cfg: Config) -> int:
    """Optimizer steps in an epoch of ``micro_batches`` loader batches (runtime.max_steps_per_epoch caps it).
    No step at all is a ConfigError: the run would evaluate and save untrained weights every epoch."""
    steps = micro_batches // cfg.optim.accumulate_steps
    if steps == 0:
        raise ConfigError(
            f"optim.accumulate_steps={cfg.optim.accumulate_steps} but an epoch has only {micro_batches} batch(es) "
            f"(optim.batch_size={cfg.optim.batch_size} per process): no optimizer step would ever run; lower "
            f"optim.accumulate_steps or optim.batch_size, or add training images")
    if cfg.runtime.max_steps_per_epoch is not None:
        steps = min(steps, cfg.runtime.max_steps_per_epoch)
    return steps


def _micro_batch_groups(batches: Iterable, accumulate: int, ctx: LoopContext,
                        state: TrainState) -> Iterator[list[Batch]]:
    """Groups of ``accumulate`` micro-batches on the device; images skipped by
    data.on_bad_sample=skip are counted and reported on the way."""
    group: list[Batch] = []
    for images, targets in batches:
        for _, reason in skipped_in(targets):
            state.skipped_images += 1
            ctx.logger.console(f"warning: skipped unreadable image (data.on_bad_sample=skip): {reason}")
        group.append(([image.to(ctx.device, non_blocking=True) for image in images],
                      move_targets(targets, ctx.device)))
        if len(group) == accumulate:
            yield group
            group = []


def _progress_bar(cfg: Config, rank: int, total: int, initial: int, epoch: int) -> tqdm | None:
    """A tqdm bar on rank 0 (runtime.progress: bar, or auto on a terminal); else None (log lines)."""
    wanted = cfg.runtime.progress == "bar" or (cfg.runtime.progress == "auto" and sys.stderr.isatty())
    if rank != 0 or not wanted:
        return None
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)


def _log_step(logger: RunLogger, optimizer: torch.optim.Optimizer, step: int, epoch: int, batch_index: int,
              steps_per_epoch: int, losses: dict[str, float], total: float, grad_norm: torch.Tensor,
              console: bool) -> None:
    values = {"epoch": epoch, "loss": total, "grad_norm": float(grad_norm), **losses,
              **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}}
    logger.record("train", step, values, tb_prefix="train")
    if console:
        # DINO: also its denoising and interm (selected encoder tokens) terms of the final layer.
        extra = "".join(f" {name} {losses[f'loss_ce_{name}']:.3f}/{losses[f'loss_bbox_{name}']:.3f}/"
                        f"{losses[f'loss_giou_{name}']:.3f}" for name in ("dn", "interm")
                        if f"loss_ce_{name}" in losses)
        logger.console(f"epoch {epoch} step {batch_index + 1}/{steps_per_epoch} loss {total:.4f} "
                       f"(ce {losses['loss_ce']:.3f} bbox {losses['loss_bbox']:.3f} "
                       f"giou {losses['loss_giou']:.3f}{extra}) lr {optimizer.param_groups[0]['lr']:.2e}")
