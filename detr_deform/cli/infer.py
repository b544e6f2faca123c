"""Running a checkpoint on images, folders and videos.

The work of ``tools/infer.py``, which imports this module after parsing its arguments
(``--help`` and argument errors answer before torch loads)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from detr_deform.data.errors import DatasetError
from detr_deform.data.images import load_rgb_image
from detr_deform.data.visualization import save_image
from detr_deform.errors import DetrDeformError
from detr_deform.inference.detector import DEFAULT_BATCH_SIZE, Detections, Detector
from detr_deform.inference.inputs import IMAGE_SUFFIXES, VIDEO_SUFFIXES, collect_images, is_video_file, other_files
from detr_deform.utils.device import resolve_device
from detr_deform.utils.files import OutputError, atomic_open, refuse_outputs_onto_inputs, same_file, writing

VIDEO_BATCH = DEFAULT_BATCH_SIZE  # frames share a size: batching them changes no result


def write_atomically(path: Path, text_chunks: Iterator[str]) -> None:
    """``path`` replaced at once by the concatenated chunks (the package's one atomic writer)."""
    with atomic_open(path) as handle:
        for chunk in text_chunks:
            handle.write(chunk)


def drawn_names(paths: list[Path], output_dir: Path, suffix: str, inputs: list[Path]) -> dict[Path, str]:
    """The file name of each image's drawing in ``output_dir``: ``<stem>.<suffix>``, numbered when
    two inputs share a stem, and ``<...>.drawn.<suffix>`` where that name is an input itself
    (``--output-dir`` = the photos' folder): a drawing never replaces a picture it was made from."""
    names, used = {}, set()
    for index, path in enumerate(paths, start=1):
        name = f"{path.stem}.{suffix}"
        if name in used:  # same file name from different folders
            name = f"{path.stem}_{index}.{suffix}"
        if any(same_file(output_dir / name, source) for source in inputs):
            name = f"{Path(name).stem}.drawn.{suffix}"
        used.add(name)
        names[path] = name
    return names


def planned_outputs(images: list[Path], videos: list[Path], args: argparse.Namespace) -> dict[str, Path]:
    """Every file this run will write, by what it is."""
    outputs = {}
    if images:
        for name in ("detections.json", "images.json", "detections.jsonl"):
            outputs[f"the results file {name}"] = args.output_dir / name
        if args.draw:
            outputs.update({f"the drawing {name}": args.output_dir / name for name in args.drawn.values()})
    used: set[str] = set()
    for video in videos:
        stem = unique_stem(video, used)
        outputs[f"the results file {stem}.detections.jsonl"] = args.output_dir / f"{stem}.detections.jsonl"
        if args.draw:
            outputs[f"the drawn video of {video.name}"] = args.output_dir / f"{stem}.drawn{video_suffix(video)}"
    return outputs


def check_outputs(images: list[Path], videos: list[Path], args: argparse.Namespace) -> None:
    """Before anything is loaded: no output is an input (OutputIsInputError), and the results of an
    earlier run in --output-dir are replaced only with --overwrite (OutputExistsError)."""
    inputs = [*images, *videos]
    args.drawn = drawn_names(images, args.output_dir, args.format, inputs) if args.draw else {}
    outputs = planned_outputs(images, videos, args)
    refuse_outputs_onto_inputs(outputs, {"the checkpoint": args.checkpoint,
                                         **{f"the input {path}": path for path in inputs}})
    existing = [path.name for path in outputs.values() if path.exists()]
    if existing and not args.overwrite:
        raise OutputExistsError(
            f"--output-dir {args.output_dir} already holds results ({', '.join(existing[:3])}"
            f"{f' and {len(existing) - 3} more' if len(existing) > 3 else ''}); pass --overwrite to replace them, "
            f"or choose another --output-dir (nothing was written)")


class OutputExistsError(DetrDeformError, ValueError):
    """An earlier run's results are where this run would write (exit status 2 without --overwrite)."""


def video_suffix(path: Path) -> str:
    """The drawn video's container: the input's when it is one PyAV writes, else .mp4."""
    return path.suffix.lower() if path.suffix.lower() in (".mp4", ".mov", ".mkv", ".webm", ".avi") else ".mp4"


def unique_stem(path: Path, used: set[str]) -> str:
    """``path``'s stem, numbered when another input already had it (same name in another folder)."""
    stem = path.stem if path.stem not in used else f"{path.stem}_{len(used) + 1}"
    used.add(stem)
    return stem


class ImageResults:
    """detections.jsonl written as results come; detections.json and images.json from it at the end."""

    def __init__(self, output_dir: Path, category_names: dict[int, str]) -> None:
        self.output_dir = output_dir
        self.lines_path = output_dir / "detections.jsonl"
        self.categories = [{"id": k, "name": v} for k, v in sorted(category_names.items())]
        self.images: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.count = 0
        with writing(self.lines_path):
            self._lines = open(self.lines_path, "w")

    def add(self, path: Path, detections: Detections, drawn: str | None) -> None:
        image_id = len(self.images) + 1
        entry = {"id": image_id, "file_name": str(path), "width": detections.width, "height": detections.height}
        self.images.append({**entry, "drawn": drawn} if drawn else entry)
        with writing(self.lines_path):
            for record in detections.records():
                self._lines.write(json.dumps({"image_id": image_id, "file_name": str(path), **record}) + "\n")
        self.count += len(detections)

    def flush(self) -> None:
        with writing(self.lines_path):
            self._lines.flush()

    def finish(self, finished: bool) -> None:
        """Writes the JSON files from what is on disk (a partial last line is left out)."""
        with contextlib.suppress(OSError):  # the error that stopped the run is reported instead
            self._lines.close()
        write_atomically(self.output_dir / "detections.json", self._json_array())
        index = {"images": self.images, "categories": self.categories, "skipped": self.skipped,
                 "finished": finished}
        write_atomically(self.output_dir / "images.json", iter([json.dumps(index, indent=1)]))

    def _json_array(self) -> Iterator[str]:
        yield "["
        separator = "\n"
        with open(self.lines_path) as lines:
            for line in lines:
                if line.endswith("\n"):
                    yield separator + line[:-1]
                    separator = ",\n"
        yield "\n]\n"


def progress(total: int | None, unit: str, desc: str):
    """A tqdm bar on a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm  # only for terminals

    return tqdm(total=total, unit=unit, desc=desc)


def run_images(detector: Detector, paths: list[Path], args: argparse.Namespace,
               others: list[Path] | None = None) -> dict[str, Any]:
    results = ImageResults(args.output_dir, detector.category_names)
    results.skipped.extend(str(path) for path in others or [])  # in the folders given, neither images nor videos
    batch_size, bar = args.batch_size or DEFAULT_BATCH_SIZE, progress(len(paths), "img", "inference")
    try:
        for start in range(0, len(paths), batch_size):
            loaded, failure = [], None
            for path in paths[start:start + batch_size]:
                try:
                    loaded.append((path, load_rgb_image(path)))
                except DatasetError as error:
                    if not args.skip_unreadable:
                        failure = error  # raised once the images before it in this batch have their results
                        break
                    results.skipped.append(str(path))
                    print(f"warning: skipped {error}", file=sys.stderr)
            found = detector([image for _, image in loaded], threshold=args.threshold, topk=args.topk,
                             batch_size=len(loaded)) if loaded else []
            for (path, image), detections in zip(loaded, found):
                detections.source = str(path)
                drawn = None
                if args.draw:
                    drawn = args.drawn[path]
                    save_image(detector.draw(image, detections), args.output_dir / drawn)
                results.add(path, detections, drawn)
            results.flush()
            if failure is not None:
                raise failure
            if bar is not None:
                bar.update(len(paths[start:start + batch_size]))
    except BaseException:
        try:
            results.finish(finished=False)
        except OutputError as error:  # keep the error that stopped the run
            print(f"warning: {error}", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
    results.finish(finished=True)
    threshold = detector.score_threshold if args.threshold is None else args.threshold
    source = detector.score_threshold_source if args.threshold is None else "--threshold"
    print(f"{len(results.images)} images, {results.count} detections with score >= {threshold:.3g} ({source}) -> "
          f"{args.output_dir / 'detections.json'}" + (f"; drawings in {args.output_dir}" if args.draw else "")
          + (f"; skipped {len(results.skipped)} file(s), not images or unreadable (listed under \"skipped\" in "
             f"images.json)" if results.skipped else ""))
    return {"images": results.images, "detections": results.count}


def run_video(detector: Detector, path: Path, args: argparse.Namespace, used: set[str]) -> dict[str, Any]:
    from detr_deform.inference.video import VideoReader, VideoWriter, detect_video  # PyAV: only for videos

    stem = unique_stem(path, used)
    lines_path = args.output_dir / f"{stem}.detections.jsonl"
    video_path = args.output_dir / f"{stem}.drawn{video_suffix(path)}" if args.draw else None
    frames = 0
    with VideoReader(path) as reader, writing(lines_path), open(lines_path, "w") as lines:
        bar = progress(reader.frame_count, "frame", path.name)
        writer = VideoWriter(video_path, reader.fps) if video_path else None
        started = time.perf_counter()
        try:
            for found in detect_video(detector, reader, args.threshold, args.topk, args.batch_size or VIDEO_BATCH):
                lines.write(json.dumps(found.to_dict()) + "\n")
                lines.flush()
                if writer is not None:
                    with writing(video_path):
                        writer.write(detector.draw(found.frame.image, found.detections))
                frames += 1
                if bar is not None:
                    bar.update(1)
        finally:
            if writer is not None:
                with writing(video_path):
                    writer.close()  # a playable file with the frames so far
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - started
    work = "decoding, detection, drawing and encoding" if writer else "decoding and detection"
    print(f"{path}: {frames} frames in {elapsed:.1f} s: {frames / max(elapsed, 1e-9):.2f} frames/s ({work}) -> "
          f"{lines_path}" + (f", {video_path}" if video_path else ""))
    return {"video": str(path), "frames": frames, "jsonl": str(lines_path),
            "drawn": str(video_path) if video_path else None, "frames_per_s": frames / max(elapsed, 1e-9)}


def split_inputs(sources: list[str]) -> tuple[list[Path], list[Path], list[Path]]:
    """(image files, video files, other files of the folders given) among the sources, each in the order given."""
    files = collect_images(sources, IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    videos = [f for f in files if is_video_file(f)]
    chosen = set(videos)
    return [f for f in files if f not in chosen], videos, other_files(sources, IMAGE_SUFFIXES + VIDEO_SUFFIXES)


def run(args: argparse.Namespace) -> dict[str, Any]:
    images, videos, others = split_inputs(args.inputs)
    if others:
        print(f"warning: skipped {len(others)} file(s) that are neither images nor videos: "
              f"{', '.join(p.name for p in others[:5])}{', ...' if len(others) > 5 else ''}", file=sys.stderr)
    check_outputs(images, videos, args)
    if videos:
        from detr_deform.inference.video import require_av  # fail before loading the model

        require_av()
    device = resolve_device(args.device, option="--device")
    detector = Detector.from_pretrained(args.checkpoint, device, args.val_size, args.max_size,
                                        revision=getattr(args, "revision", None))
    with writing(args.output_dir):
        args.output_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    if images:
        summary.update(run_images(detector, images, args, others))
    used: set[str] = set()
    summary["videos"] = [run_video(detector, video, args, used) for video in videos]
    return summary

