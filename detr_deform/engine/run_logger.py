"""Run output on rank 0: JSON-lines log, TensorBoard events, console lines."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class RunLogger:
    """Writes ``log.jsonl`` and TensorBoard events under the run directory (rank 0 only)."""

    def __init__(self, run_dir: Path | None, enabled: bool) -> None:
        self.enabled = enabled and run_dir is not None
        self.writer = None
        self.log_file = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self.log_file = open(run_dir / "log.jsonl", "a", encoding="utf-8")

    def record(self, kind: str, step: int, values: dict[str, Any], tb_prefix: str | None = None) -> None:
        if not self.enabled:
            return
        entry = {"type": kind, "step": step, "time": round(time.time(), 3), **values}
        self.log_file.write(json.dumps(entry) + "\n")
        self.log_file.flush()
        if tb_prefix is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.writer.add_scalar(f"{tb_prefix}/{key}", value, step)

    def image(self, tag: str, image, step: int) -> None:
        if self.enabled:
            self.writer.add_image(tag, image, step)

    def console(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.log_file is not None:
            self.log_file.close()
