"""Run output on rank 0: JSON-lines log, the experiment trackers (TensorBoard,
MLflow, W&B), console lines, and the validation pictures written to TensorBoard."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detr_deform.data.visualization import denormalize, detection_labels, draw_boxes
from detr_deform.engine.trackers import TensorBoardTracker, Tracker, build_trackers
from detr_deform.utils.files import write_text, writing


class RunLogger:
    """Writes ``log.jsonl`` and feeds the trackers of ``runtime.loggers`` (rank 0
    only). Console lines work at once; the files are created by ``open`` (so that
    nothing is written into a run directory before the run is known to start)."""

    def __init__(self, run_dir: Path | None, enabled: bool) -> None:
        self.run_dir = run_dir
        self.enabled = enabled and run_dir is not None
        self.trackers: list[Tracker] = []
        self.log_file = None

    def open(self, runtime, config: dict[str, Any], experiment: str, resume_step: int | None = None) -> None:
        """Creates the run's log files and starts the trackers (``config``: the resolved configuration).
        ``resume_step``: a resumed run's step; the log is first repaired (``repair_log``)."""
        if not self.enabled or self.log_file is not None:
            return
        log = self.run_dir / "log.jsonl"
        if resume_step is not None and log.is_file():
            for message in repair_log(log, resume_step):
                self.console(message)
        with writing(log):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.log_file = open(log, "a", encoding="utf-8")
        with writing(self.run_dir):
            self.trackers = build_trackers(runtime, self.run_dir, config, experiment)

    @property
    def has_images(self) -> bool:
        return any(isinstance(t, TensorBoardTracker) for t in self.trackers)

    def record(self, kind: str, step: int, values: dict[str, Any], tb_prefix: str | None = None) -> None:
        """A log.jsonl entry; with ``tb_prefix`` its numbers also go to the trackers as ``prefix/key``."""
        if self.log_file is None:
            return
        entry = {"type": kind, "step": step, "time": round(time.time(), 3), **values}
        with writing(self.run_dir / "log.jsonl"):
            self.log_file.write(json.dumps(entry) + "\n")
            self.log_file.flush()
        if tb_prefix is not None:
            scalars = {k: v for k, v in values.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step")}
            self._to_trackers("scalars", tb_prefix, scalars, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self._to_trackers("image", tag, image, step)

    def checkpoint(self, name: str, path: Path) -> None:
        self._to_trackers("checkpoint", name, path)

    def _to_trackers(self, method: str, *args: Any) -> None:
        """Calls ``method`` of every tracker. A tracker that fails (disk full under its
        files, an MLflow database error, a W&B problem) is dropped with one warning
        instead of ending the run: log.jsonl keeps every value, checkpoints go on."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:
                self.trackers.remove(tracker)
                reason = (str(error).strip().splitlines() or [""])[0][:200]
                print(f"warning: {type(tracker).__name__} failed and is switched off for the rest of the run "
                      f"({type(error).__name__}: {reason}); log.jsonl in the run directory keeps every value",
                      file=sys.stderr, flush=True)

    def console(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        self._to_trackers("close")
        if self.log_file is not None:
            with writing(self.run_dir / "log.jsonl"):
                self.log_file.close()


def repair_log(log: Path, resume_step: int) -> list[str]:
    """Before a resumed run appends to ``log``: a last line cut short by a kill (no newline)
    is moved to ``log.jsonl.partial``, and the records of the interrupted attempt after the
    checkpoint's step (it will log those steps again) to ``log.superseded.jsonl``, so that
    every step appears once. Returns what was done, as console lines."""
    data = log.read_bytes()
    messages = []
    complete = data[:data.rfind(b"\n") + 1]  # everything up to the last newline
    if len(complete) < len(data):
        _append_bytes(log.with_name("log.jsonl.partial"), data[len(complete):] + b"\n")
        messages.append(f"log.jsonl: cut a truncated last line ({len(data) - len(complete)} bytes, kept in "
                        f"log.jsonl.partial)")
    kept, superseded = [], []
    for line in complete.splitlines(keepends=True):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            step = None  # not a record of ours: kept as it is
        (superseded if isinstance(step, int) and step > resume_step else kept).append(line)
    if superseded:
        _append_bytes(log.with_name("log.superseded.jsonl"), b"".join(superseded))
        messages.append(f"log.jsonl: {len(superseded)} record(s) after step {resume_step} of the interrupted attempt "
                        f"moved to log.superseded.jsonl (those steps run again)")
    if len(complete) < len(data) or superseded:
        write_text(log, b"".join(kept).decode("utf-8", errors="replace"))
    return messages


def _append_bytes(path: Path, data: bytes) -> None:
    with writing(path), open(path, "ab") as handle:
        handle.write(data)


@torch.no_grad()
def log_prediction_images(logger: RunLogger, model: nn.Module, postprocessor: nn.Module, dataset, count: int,
                          device: torch.device, step: int, category_names: dict[int, str],
                          threshold: float = 0.3) -> None:
    """The first ``count`` validation images with the detections above ``threshold``."""
    if not logger.has_images or count <= 0:
        return
    model.eval()
    for index in range(min(count, len(dataset))):
        image, _ = dataset[index]
        if image is None:  # unreadable, left out (data.on_bad_sample=skip)
            continue
        outputs = model([image.to(device)])
        size = torch.tensor([image.shape[-2:]], device=device)
        result = postprocessor({k: outputs[k] for k in ("pred_logits", "pred_boxes")}, size)[0]
        keep = result["scores"] > threshold
        labels = result["labels"][keep].cpu()
        drawn = draw_boxes(denormalize(image), result["boxes"][keep].cpu(),
                           detection_labels(result["scores"][keep], labels, category_names), labels.tolist())
        logger.image(f"val/predictions_{index}", drawn, step)
