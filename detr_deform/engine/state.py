"""Where a training run stands (``TrainState``), and the random-number state
that makes a resumed run continue exactly."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """The progress counters that a checkpoint stores and a resume restores.

    ``epoch`` is the last epoch trained — completely, unless ``batches_done`` > 0
    (a checkpoint written on a stop signal in the middle of that epoch); -1
    before the first. ``step`` counts optimizer steps since the start of the run.
    """
    epoch: int = -1
    batches_done: int = 0
    step: int = 0
    best_ap: float = -1.0
    nonfinite_skips: int = 0
    skipped_images: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # the F1-maximising score threshold of the last evaluation (ScoreThreshold.to_dict(), with its step)
    score_threshold: dict[str, Any] | None = None
    # the evaluator's summary table of the last evaluation this process ran (not stored in checkpoints)
    metrics_table: str = ""

    @property
    def next_epoch(self) -> int:
        """The epoch to run next (the interrupted one, or the one after the last complete one)."""
        return self.epoch if self.batches_done else self.epoch + 1

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries (top-level keys of our checkpoint files)."""
        return {"epoch": self.epoch, "step": self.step, "best_ap": self.best_ap, "metrics": self.metrics,
                "batches_done": self.batches_done, "nonfinite_skips": self.nonfinite_skips,
                "skipped_images": self.skipped_images, "score_threshold": self.score_threshold}

    def load_state_dict(self, content: dict[str, Any]) -> None:
        """From a checkpoint's content; keys that older checkpoints lack keep their defaults."""
        self.epoch = int(content["epoch"])
        self.step = int(content["step"])
        self.best_ap = float(content.get("best_ap", -1.0))
        self.metrics = dict(content.get("metrics") or {})
        self.batches_done = int(content.get("batches_done", 0))
        self.nonfinite_skips = int(content.get("nonfinite_skips", 0))
        self.skipped_images = int(content.get("skipped_images", 0))
        self.score_threshold = content.get("score_threshold")


def seed_everything(seed: int) -> None:
    """Seeds torch, Python and NumPy (the trainer adds the rank to the run's seed)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict[str, Any]:
    """This process' random-number state, in checkpoint-safe types (tensors, lists)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, keys, *rest = state["python"]
    random.setstate((version, tuple(keys), *rest))
    numpy_state = list(state["numpy"])
    numpy_state[1] = np.asarray(numpy_state[1], dtype=np.uint32)
    np.random.set_state(tuple(numpy_state))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
