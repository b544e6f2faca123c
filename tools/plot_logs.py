#!/usr/bin/env python
"""Plot training curves of one or several runs into one PNG.

    python tools/plot_logs.py runs/demo/20261122-101500
    python tools/plot_logs.py runs/two_stage/a runs/two_stage/b --labels lr2e-4 lr1e-4 --output compare.png
    python tools/plot_logs.py runs/x/log.jsonl --losses loss loss_ce loss_giou --smooth 50

Panels: the total loss and each loss term (train steps, optionally smoothed),
the learning rate, and COCO AP / AP50 / AP75 against the training step — each
metric with its own marker (and colour, for one run), on the step axis of the
training panels; with few evaluations of one run (a demo evaluates once) every
point is labelled with its value.
Reads the JSON-lines log every run writes (<run>/log.jsonl).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from detr_deform.errors import EXIT_STATUS_HELP, DetrDeformError, optional_import, run_tool
from detr_deform.utils.files import writing

DEFAULT_LOSSES = ("loss", "loss_ce", "loss_bbox", "loss_giou")
METRICS = ("AP", "AP50", "AP75")
METRIC_MARKERS = {"AP": "o", "AP50": "s", "AP75": "^"}
METRIC_STYLES = {"AP": "-", "AP50": "--", "AP75": ":"}
FEW_POINTS = 5  # evaluations per curve up to which each point is labelled with its value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or log.jsonl files")
    parser.add_argument("--labels", nargs="+", help="legend names (default: the run directory names)")
    parser.add_argument("--losses", nargs="+", default=list(DEFAULT_LOSSES), help="loss terms to plot")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window over logged steps")
    parser.add_argument("--output", type=Path, default=Path("outputs/plot_logs.png"))
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels needs one name per run ({len(args.runs)})")
    return args


def read_log(path: Path) -> list[dict]:
    file = path / "log.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no log found: {file} (expected a run directory with log.jsonl)")
    records = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # The last line of a log being written (or cut by a crash) may be partial.
            print(f"warning: {file}:{number}: skipped a malformed line", file=sys.stderr)
    return records


def smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, total, queue = [], 0.0, []
    for value in values:
        queue.append(value)
        total += value
        if len(queue) > window:
            total -= queue.pop(0)
        out.append(total / len(queue))
    return out


def series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get("type") == kind and isinstance(r.get(key), (int, float))
              and math.isfinite(r[key])]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot(runs: list[tuple[str, list[dict]]], losses: list[str], window: int, output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"train {key}", "train", [key]) for key in losses]
    panels.append(("learning rate", "train", ["lr"]))
    columns = 3
    rows = math.ceil((len(panels) + 1) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for axis, (title, kind, keys) in zip(axes.flat, panels):
        for index, (label, records) in enumerate(runs):
            colour = f"C{index % 10}"
            for key in keys:
                if key == "lr":
                    lr_keys = sorted({k for r in records if r.get("type") == "train" for k in r if k.startswith("lr_")})
                    key = next((k for k in lr_keys if "backbone" not in k), lr_keys[0] if lr_keys else "lr")
                steps, values = series(records, kind, key)
                if not steps:
                    continue
                if kind == "train" and key != "lr" and not key.startswith("lr_"):
                    values = smooth(values, window)
                axis.plot(steps, values, "-", color=colour, label=label)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if title.startswith("train loss") or title == "learning rate":
            if any(v > 0 for line in axis.get_lines() for v in line.get_ydata()):
                axis.set_yscale("log")
        if axis.get_lines():
            axis.legend(fontsize=7)
    plot_metrics(list(axes.flat)[len(panels)], runs)
    for axis in list(axes.flat)[len(panels) + 1:]:
        axis.set_visible(False)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def plot_metrics(axis, runs: list[tuple[str, list[dict]]]) -> None:
    """COCO AP / AP50 / AP75 against the step: a marker per metric, a colour per metric
    (one run) or per run (several); the x axis spans the training steps, as the other
    panels do, so that one evaluation is a point at the end of training, not alone on
    an axis of its own; values written beside the points when there are few."""
    last_step = max((r["step"] for _, records in runs for r in records if isinstance(r.get("step"), (int, float))),
                    default=0)
    for index, (label, records) in enumerate(runs):
        for number, key in enumerate(METRICS):
            steps, values = series(records, "val", key)
            if not steps:
                continue
            colour = f"C{number % 10}" if len(runs) == 1 else f"C{index % 10}"
            name = key if len(runs) == 1 else f"{label} {key}"
            axis.plot(steps, values, METRIC_STYLES[key], color=colour, label=name, marker=METRIC_MARKERS[key],
                      markersize=7 if len(steps) <= FEW_POINTS else 4)
            if len(steps) <= FEW_POINTS and len(runs) == 1:  # several runs: the legend, not crowded labels
                for step, value in zip(steps, values):
                    axis.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(-8, 0),
                                  ha="right", va="center", fontsize=7, color=colour)
    axis.set_title("COCO AP (val)")
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    axis.set_xlim(0, max(1, last_step) * 1.04)
    tops = [v for line in axis.get_lines() for v in line.get_ydata()]
    axis.set_ylim(0, min(1.0, max(tops, default=1.0) + 0.08) if tops else 1.0)
    if axis.get_lines():
        axis.legend(fontsize=7, loc="lower right")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: plot_runs(args))


def plot_runs(args: argparse.Namespace) -> None:
    logs = []
    for run in args.runs:
        try:
            logs.append(read_log(run))
        except (OSError, UnicodeDecodeError) as error:  # missing, unreadable or not a text file: bad input
            raise LogError(str(error)) from error
    optional_import("matplotlib", "tools", "plot_logs.py")
    labels = args.labels or [(run if run.is_dir() else run.parent).name for run in args.runs]
    with writing(args.output):  # the PNG could not be written (read-only folder, disk full)
        output = plot(list(zip(labels, logs)), args.losses, args.smooth, args.output)
    print(f"wrote {output}")


class LogError(DetrDeformError):
    """A run's log.jsonl is missing or unreadable (bad input: exit status 2)."""


if __name__ == "__main__":
    sys.exit(main())
