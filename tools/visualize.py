#!/usr/bin/env python
"""See what the model and the data pipeline do.

Deformable attention (the paper's Figure 6): for the top-scoring detections of
each image, the last decoder layer's sampling points (all heads and levels
merged), coloured and sized by attention weight, with the predicted box and the
reference point (white cross); with --pixel, the last encoder layer's sampling
points for the feature position under that pixel.

    python tools/visualize.py attention runs/demo/<time>/checkpoint_best.pth img.jpg --queries 3
    python tools/visualize.py attention ckpt.pth photos/ --pixel 320,240 --output-dir out/attention

Dataset browser: ground-truth boxes after the training (or validation)
augmentations, to check a data pipeline.

    python tools/visualize.py dataset --demo --num 8
    python tools/visualize.py dataset --coco-path /data/coco --split train --num 16 --seed 3
    python tools/visualize.py dataset --images imgs/ --annotations train.json --run-config runs/x/config.yaml

PNG files are written to --output-dir (default outputs/visualize).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detr_deform.errors import EXIT_STATUS_HELP, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    attention = sub.add_parser("attention", help="deformable attention sampling points of a checkpoint")
    attention.add_argument("checkpoint")
    attention.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    attention.add_argument("--queries", type=int, default=3, help="top-scoring detections drawn per image")
    attention.add_argument("--threshold", type=float, default=0.0, help="minimum score of a drawn detection")
    attention.add_argument("--pixel", action="append", default=[],
                           help="x,y in image pixels: draw the encoder's sampling points there (repeatable)")
    attention.add_argument("--device", default="auto")
    attention.add_argument("--output-dir", type=Path, default=Path("outputs/visualize"))
    dataset = sub.add_parser("dataset", help="ground truth after the data augmentations")
    dataset.add_argument("--demo", action="store_true", help="the built-in demo dataset")
    dataset.add_argument("--coco-path", type=Path, help="COCO layout root")
    dataset.add_argument("--data", type=Path, help="a dataset folder in any layout: COCO, Pascal VOC or YOLO")
    dataset.add_argument("--format", choices=("auto", "coco", "voc", "yolo"), default="auto",
                         help="layout of --data (default: detected)")
    dataset.add_argument("--images", type=Path)
    dataset.add_argument("--annotations", type=Path)
    dataset.add_argument("--split", default="train", help="train or val (VOC / YOLO: any split name)")
    dataset.add_argument("--run-config", type=Path, help="a run's config.yaml: use its data settings")
    dataset.add_argument("--num", type=int, default=8, help="number of samples drawn")
    dataset.add_argument("--seed", type=int, default=0, help="augmentation seed (epoch)")
    dataset.add_argument("--output-dir", type=Path, default=Path("outputs/visualize"))
    args = parser.parse_args(argv)
    if args.command == "attention":
        try:
            args.pixel = [tuple(float(v) for v in p.split(",")) for p in args.pixel]
        except ValueError:
            parser.error(f"--pixel takes x,y (e.g. 320,240), got {args.pixel}")
        if any(len(p) != 2 for p in args.pixel):
            parser.error("--pixel takes x,y (e.g. 320,240)")
    elif sum(x is not None and x is not False for x in (args.demo or None, args.coco_path, args.data, args.images)) \
            != 1 or (args.images is None) != (args.annotations is None):
        parser.error("pass exactly one of --demo, --coco-path, --data, or --images with --annotations")
    return args


def visualize(args: argparse.Namespace):
    """The tool's work, in :mod:`detr_deform.cli.visualize` (imported here, after parsing)."""
    from detr_deform.cli.visualize import visualize as work

    return work(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: visualize(args))


if __name__ == "__main__":
    sys.exit(main())

