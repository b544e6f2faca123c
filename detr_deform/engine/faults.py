"""What the trainer does when something goes wrong: pre-emption signals,
non-finite losses, torchrun restarts (leftovers of interrupted writes:
:mod:`detr_deform.engine.run_dir`, which removes them only under the run's lock)."""
from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from detr_deform.errors import EXIT_FAILED, EXIT_STOPPED, DetrDeformError
from detr_deform.utils import distributed
from detr_deform.utils.files import write_text

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLossError(DetrDeformError, FloatingPointError):
    """A loss or gradient became NaN/inf; the message lists the step, images and terms. Exit
    status 2: the usual causes are the configuration (learning rate) or the data, and the run's
    checkpoints are intact."""


STOPPED_RESUMABLE = EXIT_STOPPED  # a run stopped early, resumable (a stalled DataLoader worker)
RUN_FAILED = EXIT_FAILED          # a run that failed while running (killed worker, out of memory, ...)


class TrainingInterrupted(DetrDeformError):
    """The run stopped after writing a checkpoint: on SIGTERM/SIGINT (``exit_code``
    128 + the signal number) or a stalled DataLoader worker (3). Its message is printed
    as it is (no "error:")."""

    prefix = ""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message, exit_code=exit_code)


class TrainingFailed(DetrDeformError):
    """The run failed while running (a killed DataLoader worker, out of memory); the
    message is one line naming the cause, the last checkpoint and how to continue
    (it starts with "error:" itself). Nothing was written for the failed step."""

    prefix = ""

    def __init__(self, message: str, exit_code: int = RUN_FAILED) -> None:
        super().__init__(message, exit_code=exit_code)


def resume_command(run_dir: Path) -> str:
    return f"python tools/train.py <same arguments> runtime.output_dir={run_dir} runtime.resume=auto"


def resume_hint(run_dir: Path) -> str:
    """Where the run can continue from: the last checkpoint (untouched) and the command."""
    last = Path(run_dir) / "checkpoint_last.pth"
    if last.is_file():
        return f"the last checkpoint, {last}, is untouched; continue with: {resume_command(run_dir)}"
    return f"no checkpoint was written yet (the first epoch had not ended): start the run again in {run_dir}"


class GracefulStop:
    """Turns SIGTERM/SIGINT into a request to stop after the current step (the
    trainer then writes a checkpoint and exits). A second SIGINT (Ctrl-C twice)
    interrupts at once. Handlers are installed only in the main thread and
    restored on exit."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._exit_code: int | None = None
        self._previous: dict[int, Any] = {}

    def stop_for(self, reason: str, exit_code: int) -> None:
        """A stop for another reason than a signal (e.g. a stalled DataLoader worker):
        the run then ends as after SIGTERM, with ``exit_code``."""
        self.signal_name, self._exit_code = reason, exit_code

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name} received: finishing this step, saving a checkpoint, then exiting "
              f"(Ctrl-C again to abort without saving)", flush=True)

    def requested(self, device: torch.device) -> bool:
        """Whether any rank received a stop signal (all ranks agree)."""
        stop = distributed.any_rank(self.signal_name is not None, device)
        if stop and self.signal_name is None:
            self.signal_name = "stop request from another rank"
        return stop

    @property
    def exit_code(self) -> int:
        """128 + signal number, the shell convention for a run ended by a signal
        (or the code given to ``stop_for``)."""
        if self._exit_code is not None:
            return self._exit_code
        for signum in STOP_SIGNALS:
            if signal.Signals(signum).name == self.signal_name:
                return 128 + signum
        return 128 + signal.SIGTERM


def is_nonfinite(total: float, grad_norm: torch.Tensor, fp16_scaler_in_use: bool) -> bool:
    """A non-finite loss, or a non-finite gradient norm without an fp16 GradScaler
    (with one, overflowing gradients are routine: the scaler skips the step and
    lowers its scale)."""
    if not math.isfinite(total):
        return True
    return not fp16_scaler_in_use and not bool(torch.isfinite(torch.as_tensor(grad_norm)))


def nonfinite_report(epoch: int, step: int, targets: list[dict], losses: dict[str, float], total: float,
                     grad_norm: torch.Tensor) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "step": step,
        "image_ids": [int(t["image_id"]) for t in targets],
        "loss": total,
        "grad_norm": float(grad_norm),
        "loss_terms": dict(sorted(losses.items())),
    }


def format_report(report: dict[str, Any]) -> str:
    terms = ", ".join(f"{k}={v:.4g}" for k, v in report["loss_terms"].items())
    return (f"non-finite loss/gradient at epoch {report['epoch']}, step {report['step']} "
            f"(images {report['image_ids']}): loss={report['loss']:.4g}, grad_norm={report['grad_norm']:.4g}; {terms}")


def write_report(run_dir: Path, report: dict[str, Any]) -> Path:
    return write_text(run_dir / f"nonfinite_step{report['step']}.json", json.dumps(report, indent=2, allow_nan=True))


def restarted_by_torchrun() -> bool:
    """True in a worker that torchrun restarted after a failure (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
