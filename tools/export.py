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
import json
import sys
from pathlib import Path

import torch

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


def check_images(args: argparse.Namespace, height: int, width: int) -> list[torch.Tensor]:
    from torchvision.transforms.v2 import functional as F

    from detr_deform.data.images import load_rgb_image
    from detr_deform.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from detr_deform.inference.inputs import collect_images

    if not args.check_images:
        generator = torch.Generator().manual_seed(0)
        return [torch.randn(3, height, width, generator=generator) for _ in range(args.max_check_images)]
    tensors = []
    for path in collect_images(args.check_images)[: args.max_check_images]:
        image = F.to_dtype(F.to_image(load_rgb_image(path)), torch.float32, scale=True)
        image = F.resize(image, [height, width], antialias=True)
        tensors.append(F.normalize(image, IMAGENET_MEAN, IMAGENET_STD))
    return tensors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: export(args))


def export(args: argparse.Namespace) -> int:
    """Exports, then (unless --no-check) compares with onnxruntime; the exit status."""
    from detr_deform.errors import MissingExtraError
    from detr_deform.export.onnx import compare_with_onnxruntime, export_onnx
    from detr_deform.inference.detector import Detector
    from detr_deform.utils.files import refuse_outputs_onto_inputs, write_text, writing

    output = Path(args.output or Path(args.checkpoint).with_suffix(".onnx"))
    refuse_outputs_onto_inputs({"--output": output, "the check report": output.with_suffix(".check.json")},
                               {"the checkpoint": args.checkpoint,
                                **{f"--check-images {path}": path for path in args.check_images}})
    detector = Detector.from_pretrained(args.checkpoint, device="cpu")
    height = args.height or detector.val_size
    width = args.width or min(detector.max_size, round(height * 4 / 3))
    try:
        with writing(output):  # disk full, read-only folder: one line naming the file
            export_onnx(detector.model, output, height, width, args.opset)
        print(f"exported {output} ({output.stat().st_size / 2**20:.1f} MiB), input images (1, 3, {height}, {width})")
        if args.no_check:
            return 0
        images = check_images(args, height, width)
        worst = compare_with_onnxruntime(detector.model, output, images)
    except ModuleNotFoundError as error:
        if error.name not in ("onnx", "onnxruntime", "onnxscript"):  # a broken installation: show the traceback
            raise
        skip = " (or pass --no-check to skip the onnxruntime comparison)" if error.name == "onnxruntime" else ""
        raise MissingExtraError(f"exporting and checking need {error.name}: pip install 'detr_deform[tools]'{skip}",
                                name=error.name) from error
    report = {"onnx": str(output), "height": height, "width": width, "images_checked": len(images),
              "max_abs_diff": worst, "tolerance": args.tolerance, "ok": max(worst.values()) <= args.tolerance}
    write_text(output.with_suffix(".check.json"), json.dumps(report, indent=2))
    print(f"onnxruntime vs PyTorch on {len(images)} image(s): max |diff| pred_logits {worst['pred_logits']:.2e}, "
          f"pred_boxes {worst['pred_boxes']:.2e} ({'OK' if report['ok'] else 'ABOVE'} tolerance {args.tolerance:g})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
