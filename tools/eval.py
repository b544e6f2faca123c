#!/usr/bin/env python
"""Evaluate a checkpoint (ours, an official model-zoo file or a Hugging Face folder) with pycocotools.

    python tools/eval.py runs/demo/<time>/checkpoint_best.pth              # data from the checkpoint's config
    python tools/eval.py r50_deformable_detr-checkpoint.pth --coco-path /data/coco
    HF_HUB_OFFLINE=1 python tools/eval.py SenseTime/deformable-detr --coco-path /data/coco   # from the hub cache
    python tools/eval.py ckpt.pth --images /data/val --annotations /data/val.json --dump-detections dets.json
    python tools/eval.py ckpt.pth --data /data/VOCdevkit/VOC2007 --split test   # Pascal VOC or YOLO folders as they are
    torchrun --nproc_per_node=8 tools/eval.py ckpt.pth --coco-path /data/coco

Prints the 12 COCO metrics and the score threshold that maximises detection F1
on this set (IoU >= 0.5, same class; docs/evaluation.md) next to the one stored in
the checkpoint, and writes them as JSON (--output; default next to
the checkpoint as <name>.eval.json, or outputs/eval/<name>.eval.json when that
folder is read-only). Distributed evaluation gives exactly the single-process
result (every image is evaluated once). A checkpoint with NaN/inf weights is
evaluated with a warning next to the metrics (and in the JSON).
An output that is an input (the checkpoint or the annotation file, under any name:
symlink, hard link) is refused before anything runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from detr_deform.errors import EXIT_STATUS_HELP, run_tool


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint",
                        help="checkpoint: ours, an official model-zoo .pth, a Hugging Face save_pretrained folder, or "
                             "a hub id org/name (the hub cache first; offline with HF_HUB_OFFLINE=1)")
    parser.add_argument("--revision", help="with a hub id: the branch, tag or commit (default main)")
    parser.add_argument("--data", help="a dataset folder: COCO root, Pascal VOC year folder or YOLO folder / data.yaml")
    parser.add_argument("--format", choices=("auto", "coco", "voc", "yolo"), default="auto",
                        help="layout of --data (default: detected)")
    parser.add_argument("--split", help="split to evaluate (default: the run's data.val_split, else val)")
    parser.add_argument("--class-names", nargs="+", help="Pascal VOC: the class list in id order (default: the run's)")
    parser.add_argument("--coco-path", help="COCO root (val2017/ and annotations/instances_val2017.json)")
    parser.add_argument("--images", help="image folder of a COCO-format set")
    parser.add_argument("--annotations", help="instances JSON of a COCO-format set")
    parser.add_argument("--val-size", type=int, help="shorter side (default: the checkpoint's, else 800)")
    parser.add_argument("--max-size", type=int, help="longer-side limit (default: the checkpoint's, else 1333)")
    parser.add_argument("--batch-size", type=int,
                        help="images per forward pass (default: the batch size the run was trained and evaluated "
                             "with, from our checkpoint's config; 2, the official value, for other files)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--topk", type=int, help="detections per image (default 100)")
    parser.add_argument("--output", help="metrics JSON path")
    parser.add_argument("--dump-detections", help="write detections in COCO results format here")
    parser.add_argument("--coco-eval", choices=("pycocotools", "faster"), default="pycocotools",
                        help="COCO evaluator: pycocotools (reference) or faster (faster-coco-eval, same metrics; "
                             "pip install 'detr_deform[faster-coco-eval]')")
    args = parser.parse_args(argv)
    if args.coco_eval == "faster" and importlib.util.find_spec("faster_coco_eval") is None:
        parser.error("--coco-eval faster needs faster-coco-eval: pip install 'detr_deform[faster-coco-eval]'")
    for option, least in (("batch_size", 1), ("topk", 1), ("val_size", 1), ("max_size", 1), ("num_workers", 0)):
        value = getattr(args, option)
        if value is not None and value < least:
            parser.error(f"--{option.replace('_', '-')} must be at least {least}, got {value}")
    return args


def evaluate_checkpoint(args: argparse.Namespace):
    """The tool's work, in :mod:`detr_deform.cli.evaluate` (imported here, after parsing)."""
    from detr_deform.cli.evaluate import evaluate_checkpoint as work

    return work(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: evaluate_checkpoint(args))


if __name__ == "__main__":
    sys.exit(main())

