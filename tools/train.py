#!/usr/bin/env python
"""Train Deformable DETR.

    python tools/train.py experiment=demo                      # built-in demo, CPU, minutes
    python tools/train.py experiment=two_stage data.root=/data/coco model.pretrained_backbone=/w/r50.pth
    torchrun --nproc_per_node=8 tools/train.py experiment=two_stage data.root=/data/coco
    python tools/train.py experiment=two_stage runtime.output_dir=runs/x runtime.resume=auto

Configuration: configs/ (Hydra); every key is documented in docs/configuration.md.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from detr_deform.checkpoint import CheckpointError
from detr_deform.config import Config, ConfigError, register_configs, validate
from detr_deform.data.errors import DatasetError

register_configs()


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from detr_deform.engine.faults import NonFiniteLossError, TrainingInterrupted
    from detr_deform.engine.trainer import train

    try:
        config: Config = OmegaConf.to_object(cfg)
        validate(config)
        train(config)
    except TrainingInterrupted as stop:
        print(str(stop), file=sys.stderr)
        sys.exit(stop.exit_code)
    except (ConfigError, DatasetError, CheckpointError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
