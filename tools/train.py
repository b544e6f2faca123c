#!/usr/bin/env python
"""Train Deformable DETR (usage: python tools/train.py --help).

    python tools/train.py experiment=demo                      # built-in demo, CPU, minutes
    python tools/train.py experiment=two_stage data.root=/data/coco model.pretrained_backbone=/w/r50.pth
    torchrun --nproc_per_node=8 tools/train.py experiment=two_stage data.root=/data/coco
    python tools/train.py experiment=two_stage runtime.output_dir=runs/x runtime.resume=auto

Configuration: configs/ (Hydra); every key is documented in docs/configuration.md.
Exit status (the table every tool shares, docs/tools.md): 0 done; 1 the run failed while running
(a run file that could not be written, e.g. disk full: one line naming it; an I/O error; a killed
DataLoader worker; out of memory); 2 a configuration, data or checkpoint problem, a run directory in
use by another live run, or a non-finite loss (one line on stderr, from the first process of each
machine; nothing lost); 3 stopped by a stalled DataLoader worker (data.worker_timeout_s) after writing
a checkpoint (resumable); 128+N stopped by signal N after writing a checkpoint (143 for SIGTERM, 130
for Ctrl-C); 130 after a second Ctrl-C (nothing saved for the current step).
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from detr_deform.cli.compose import HELP_FLAGS, compose_config, config_from_hydra, hydra_mode, usage_text
from detr_deform.config import Config, register_configs
from detr_deform.errors import run_tool

register_configs()

# What the one-line errors add (docs/tools.md has the exit-status table every tool shares).
FAILURE_NOTE = "the run's earlier files (checkpoints, logs) are intact"
INTERRUPT_NOTE = ("a second Ctrl-C; no checkpoint was written for the current step, the last checkpoint_last.pth "
                  "of the run is intact")


def report(message: str) -> None:
    """One line on stderr, from the first process of each machine only: under torchrun every
    rank runs the same checks and would otherwise print the same refusal once per process."""
    if os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0":
        print(message, file=sys.stderr)


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def run(cfg: DictConfig) -> None:
    """Hydra's own path (--help, --cfg job, --multirun, hydra.* overrides): Hydra composes."""
    status = run_tool(lambda: train_reporting_failures(config_from_hydra(cfg)), failure_note=FAILURE_NOTE,
                      interrupt_note=INTERRUPT_NOTE, report=report)
    if status:
        sys.exit(status)


def train_reporting_failures(cfg: Config) -> None:
    """Trains (:mod:`detr_deform.cli.train`, imported here: the configuration is composed and
    checked, and ``--help`` answered, before torch and the models load)."""
    from detr_deform.cli.train import train_reporting_failures as work

    work(cfg)


def main() -> None:
    sys.exit(run_tool(lambda: start(sys.argv[1:]), failure_note=FAILURE_NOTE, interrupt_note=INTERRUPT_NOTE,
                      report=report))


def start(argv: list[str]) -> None:
    """A plain run is composed and validated once (a bad value is one line before anything is
    created), then trained; Hydra's flags go to Hydra's main."""
    if list(argv) in ([flag] for flag in HELP_FLAGS):
        print(usage_text())  # Hydra's own --help prints the same text, seconds later
    elif hydra_mode(argv):
        run()
    else:
        train_reporting_failures(compose_config(argv))


if __name__ == "__main__":
    main()
