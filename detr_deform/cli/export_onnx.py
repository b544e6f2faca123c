"""Exporting a checkpoint to ONNX and checking it with onnxruntime.

The work of ``tools/export.py``, which imports this module after parsing its arguments
(``--help`` and argument errors answer before torch loads)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


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

