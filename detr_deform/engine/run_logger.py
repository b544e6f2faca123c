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

from detr_deform.engine.trackers import TensorBoardTracker, Tracker, build_trackers
from detr_deform.utils.files import writing
from detr_deform.visualization import denormalize, detection_labels, draw_boxes


class RunLogger:
    """Writes ``log.jsonl`` and feeds the trackers of ``runtime.loggers`` (rank 0
    only). Console lines work at once; the files are created by ``open`` (so that
    nothing is written into a run directory before the run is known to start)."""

    def __init__(self, run_dir: Path | None, enabled: bool) -> None:
        self.run_dir = run_dir
        self.enabled = enabled and run_dir is not None
        self.trackers: list[Tracker] = []
        self.log_file = None

    def open(self, runtime, config: dict[str, Any], experiment: str) -> None:
        """Creates the run's log files and starts the trackers (``config``: the resolved configuration)."""
        if not self.enabled or self.log_file is not None:
            return
        with writing(self.run_dir / "log.jsonl"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.log_file = open(self.run_dir / "log.jsonl", "a", encoding="utf-8")
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
