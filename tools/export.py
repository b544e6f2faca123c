#!/usr/bin/env python
"""Export a checkpoint (ours, official or Hugging Face) to ONNX and check it with onnxruntime.

    python tools/export.py runs/demo/<time>/checkpoint_best.pth --output demo.onnx
    python tools/export.py r50_deformable_detr-checkpoint.pth --height 800 --width 1066 --check-images val2017/

The graph has one input "images" (1, 3, height, width): an RGB image resized to
exactly height x width, scaled to [0, 1] and normalised with the ImageNet
mean/std; outputs "pred_logits" (1, Q, C) and "pred_boxes" (1, Q, 4) as
normalised (cx, cy, w, h) — apply a sigmoid and take the top-k (query, class)
pairs as detr_deform's PostProcess does. Default size: height = the checkpoint's
validation size (800 for official files), width = 4/3 of it (capped by its max size).

After export, PyTorch and onnxruntime run on --check-images (default: a few
random images) and the largest absolute difference of each output is printed;
the exit status is 1 when it exceeds --tolerance; 2 for bad input, including an
--output that is the checkpoint itself (under any name). Limitations: docs/tools.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detr_deform.errors import EXIT_STATUS_HELP, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--output", type=Path, help="ONNX file (default: next to the checkpoint, .onnx)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 16 for GridSample)")
    parser.add_argument("--check-images", nargs="*", default=[],
                        help="image files/folders/globs for the onnxruntime check (default: random images)")
    parser.add_argument("--max-check-images", type=int, default=3,
                        help="at most this many images are compared (also the number of random ones)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest acceptable absolute difference")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_args(argv)
    if args.opset < 16:
        parser.error("--opset must be >= 16 (GridSample)")
    if args.max_check_images < 1:
        parser.error(f"--max-check-images must be at least 1, got {args.max_check_images}")
    return args


def export(args: argparse.Namespace):
    """The tool's work, in :mod:`detr_deform.cli.export_onnx` (imported here, after parsing)."""
    from detr_deform.cli.export_onnx import export as work

    return work(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: export(args))


if __name__ == "__main__":
    sys.exit(main())

