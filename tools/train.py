#!/usr/bin/env python
"""Train Deformable DETR (usage: python tools/train.py --help).

    python tools/train.py experiment=demo                      # built-in demo, CPU, minutes
    python tools/train.py experiment=two_stage data.root=/data/coco model.pretrained_backbone=/w/r50.pth
    torchrun --nproc_per_node=8 tools/train.py experiment=two_stage data.root=/data/coco
    python tools/train.py experiment=two_stage runtime.output_dir=runs/x runtime.resume=auto

Configuration: configs/ (Hydra); every key is documented in docs/configuration.md.
Exit status: 0 done; 2 a configuration, data or checkpoint problem, a run directory in use by another
live run, or a non-finite loss (one line on stderr, from the first process of each machine); 1 a run
file that could not be written (disk full: one line naming it); 128+N stopped by signal N after
writing a checkpoint (143 for SIGTERM, 130 for Ctrl-C); 130 after a second Ctrl-C (nothing saved
for the current step).
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from detr_deform.checkpoint import CheckpointError
from detr_deform.cli import config_from_hydra, precheck
from detr_deform.config import ConfigError, register_configs
from detr_deform.data.errors import DatasetError
from detr_deform.engine.faults import NonFiniteLossError, TrainingInterrupted
from detr_deform.engine.trainer import train
from detr_deform.utils.files import OutputError

register_configs()


def report(message: str) -> None:
    """One line on stderr, from the first process of each machine only: under torchrun every
    rank runs the same checks and would otherwise print the same refusal once per process."""
    if os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0":
        print(message, file=sys.stderr)


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def run(cfg: DictConfig) -> None:
    try:
        train(config_from_hydra(cfg))
    except TrainingInterrupted as stop:
        report(str(stop))
        sys.exit(stop.exit_code)
    except (ConfigError, DatasetError, CheckpointError, NonFiniteLossError) as error:
        report(f"error: {error}")
        sys.exit(2)
    except OutputError as error:
        report(f"error: {error}; the run's earlier files (checkpoints, logs) are intact")
        sys.exit(1)
    except OSError as error:  # below the checks (an input mount gone, an I/O error): no traceback
        report(f"error: {type(error).__name__}: {error}; the run's earlier files (checkpoints, logs) are intact")
        sys.exit(1)
    except KeyboardInterrupt:
        report("interrupted by a second Ctrl-C: no checkpoint was written for the current step; the last "
               "checkpoint_last.pth of the run is intact")
        sys.exit(130)


def main() -> None:
    try:
        precheck(sys.argv[1:])
    except ConfigError as error:
        report(f"error: {error}")
        sys.exit(2)
    run()


if __name__ == "__main__":
    main()
