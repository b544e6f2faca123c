#!/usr/bin/env python
"""Run a checkpoint (ours, an official model-zoo file or a Hugging Face model directory) on images and videos.

    python tools/infer.py runs/demo/<time>/checkpoint_best.pth photos/ --draw
    python tools/infer.py r50_deformable_detr-checkpoint.pth "data/**/*.jpg" --threshold 0.5 --output-dir out/
    python tools/infer.py ckpt.pth a.jpg b.png --device cuda --batch-size 8 --topk 50 --draw --format jpg
    python tools/infer.py ckpt.pth clip.mp4 --draw          # needs PyAV: pip install "detr_deform[video]"

Images: <output-dir>/detections.json, a list of COCO-results-style entries
{"image_id", "file_name", "category_id", "category_name", "bbox": [x, y, w, h], "score"}
(image ids number the images from 1 in the order of "images" in
<output-dir>/images.json, which also has "categories", "skipped" — files of the
folders given that are not images or videos, and unreadable images with
--skip-unreadable — and "finished"),
and with --draw a copy of every image with its boxes, names and scores (enlarged
when under 512 pixels). Results are written as they come: every batch appends its
entries to <output-dir>/detections.jsonl (one entry a line) and flushes it; the two
JSON files are written from it at the end — also when the run stops on an error or
Ctrl-C, with "finished": false.

Videos (.mp4, .mov, .avi, .mkv, .webm, ..., or any file PIL cannot read and PyAV
can): <output-dir>/<name>.detections.jsonl with one line per frame {"frame", "time",
"width", "height", "detections": [entries as above, without image_id/file_name]},
and with --draw the annotated video <output-dir>/<name>.drawn.<suffix>; the measured
frames/s is printed at the end.

An output never replaces an input (the same file under any name: refused), a drawing
never takes the name of the picture it was made from (``<stem>.drawn.<format>`` then),
and the results of an earlier run in --output-dir are replaced only with --overwrite.
A run stopped by Ctrl-C keeps the results so far (exit status 130).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detr_deform.errors import EXIT_STATUS_HELP, run_tool
from detr_deform.inference.defaults import DEFAULT_BATCH_SIZE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint: ours, an official model-zoo .pth, a Hugging Face "
                                           "save_pretrained folder, or a hub id org/name (the hub cache first)")
    parser.add_argument("--revision", help="with a hub id: the branch, tag or commit (default main)")
    parser.add_argument("inputs", nargs="+", help="image or video files, folders or glob patterns (quote globs)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/infer"))
    parser.add_argument("--threshold", type=float,
                        help="minimum score kept (JSON and drawings); default: the checkpoint's calibrated threshold "
                             "(maximum F1 on its validation set), else 0.3 (official and Hugging Face files)")
    parser.add_argument("--topk", type=int, default=100, help="at most this many detections per image")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int,
                        help=f"images of the same size per forward pass (default {DEFAULT_BATCH_SIZE}, as the Python "
                             f"Detector; images are grouped by size, never padded, so results do not depend on it)")
    parser.add_argument("--val-size", type=int, help="shorter side (default: the checkpoint's, else 800)")
    parser.add_argument("--max-size", type=int, help="longer-side limit (default: the checkpoint's, else 1333)")
    parser.add_argument("--draw", action="store_true", help="also write images (and videos) with the detections drawn")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="format of the drawn images")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="warn about and skip unreadable image files instead of stopping")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in --output-dir (refused otherwise)")
    args = parser.parse_args(argv)
    for option in ("batch_size", "topk", "val_size", "max_size"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1")
    return args


def run(args: argparse.Namespace):
    """The tool's work, in :mod:`detr_deform.cli.infer` (imported here, after parsing)."""
    from detr_deform.cli.infer import run as work

    return work(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    def body() -> None:
        run(args)  # its summary is for Python callers; the results are in the files

    return run_tool(body, interrupt_note=f"the results so far are in {args.output_dir}")


if __name__ == "__main__":
    sys.exit(main())

