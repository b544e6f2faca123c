"""The work of ``tools/train.py`` once its configuration is composed and validated."""
from __future__ import annotations

from detr_deform.config import Config
from detr_deform.engine.faults import TrainingFailed
from detr_deform.engine.loader_faults import describe_runtime_failure
from detr_deform.engine.trainer import train


def train_reporting_failures(cfg: Config) -> None:
    """``train``, with a dead DataLoader worker or an out-of-memory error outside the training
    steps (in the evaluation) as one line too: inside them the loop already says so."""
    try:
        train(cfg)
    except (RuntimeError, MemoryError) as error:
        failure = describe_runtime_failure(error)
        if failure is None:
            raise
        raise TrainingFailed(f"error: {failure[0]}", exit_code=failure[1]) from error
