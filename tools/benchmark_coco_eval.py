#!/usr/bin/env python
"""Time one COCO bbox evaluation with pycocotools and with faster-coco-eval on a
synthetic COCO-format set (ground truth, and detections: noisy matches, wrong
classes, misses and false positives, up to 100 per image like Deformable DETR's
top-100), and check that both give the same 12 metrics.

    python tools/benchmark_coco_eval.py --images 5000 --repeat 3 --markdown

Times are medians over --repeat evaluations (each: index, evaluate, accumulate,
summarize, as the training loop does), measured in this process.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detr_deform.errors import EXIT_STATUS_HELP  # noqa: E402


def synthetic_coco(num_images: int, seed: int = 0, detections_per_image: int = 100) -> tuple[dict, list[dict]]:
    """A COCO instances dict (80 categories, 0-15 objects per 640x480 image, 5 % crowd) and
    detections: each object found with box noise (85 %) or a wrong class (20 % of those),
    the rest of the image's ``detections_per_image`` random low-scoring boxes."""
    rng = random.Random(seed)
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "width": 640, "height": 480} for i in range(1, num_images + 1)]
    annotations: list[dict] = []
    detections: list[dict] = []
    for image in images:
        found = []
        for _ in range(rng.randint(0, 15)):
            w, h = rng.uniform(4, 300), rng.uniform(4, 240)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            label = rng.randint(1, 80)
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": label,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.05)})
            if rng.random() < 0.85:
                found.append({"image_id": image["id"], "category_id": label if rng.random() < 0.8 else
                              rng.randint(1, 80), "bbox": [x + rng.gauss(0, 4), y + rng.gauss(0, 4),
                                                           w * rng.uniform(0.85, 1.15), h * rng.uniform(0.85, 1.15)],
                              "score": rng.uniform(0.3, 1.0)})
        while len(found) < detections_per_image:
            w, h = rng.uniform(4, 300), rng.uniform(4, 240)
            found.append({"image_id": image["id"], "category_id": rng.randint(1, 80),
                          "bbox": [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h],
                          "score": rng.uniform(0.0, 0.4)})
        detections += found
    content = {"images": images, "annotations": annotations,
               "categories": [{"id": c, "name": f"class{c}"} for c in range(1, 81)]}
    return content, detections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeat < 1:
        parser.error("--images and --repeat must be at least 1")
    # Imported after parsing: --help and argument errors answer before torch loads.
    from detr_deform.data.coco import load_coco_json
    from detr_deform.evaluation.coco_eval import evaluate_coco

    content, detections = synthetic_coco(args.images)
    coco = load_coco_json("synthetic", content)
    ids = [image["id"] for image in content["images"]]
    results = {}
    for backend in ("pycocotools", "faster"):
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            metrics, _ = evaluate_coco(coco, detections, ids, backend)
            times.append(time.perf_counter() - start)
        results[backend] = (statistics.median(times), metrics)
    reference, faster = results["pycocotools"][1], results["faster"][1]
    worst = max(abs(reference[k] - faster[k]) for k in reference)
    print(f"{args.images} images, {len(content['annotations'])} annotations, {len(detections)} detections; "
          f"AP {reference['AP']:.4f}; largest metric difference {worst:.2e}")
    for backend, (seconds, _) in results.items():
        print(f"  {backend}: {seconds:.2f} s per evaluation (median of {args.repeat})")
    if args.markdown:
        base = results["pycocotools"][0]
        print("\n| evaluator | seconds per evaluation | speed-up |\n|---|---|---|")
        for backend, (seconds, _) in results.items():
            print(f"| {backend} | {seconds:.2f} | {base / seconds:.1f}x |")
    return 0 if worst <= 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
