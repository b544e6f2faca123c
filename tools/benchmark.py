#!/usr/bin/env python
"""Benchmark any experiment configuration: parameters, FLOPs, inference latency
and throughput (batch 1 and 4), training-step time and peak memory, CPU or GPU.

    python tools/benchmark.py experiment=demo                          # CPU
    python tools/benchmark.py experiment=two_stage --height 800 --width 1066 --device cuda
    python tools/benchmark.py experiment=deformable_detr --batch-sizes 1 2 --repeat 5 --markdown

Arguments of the form key=value are Hydra overrides of configs/ (as for
tools/train.py); the model is built with random weights (nothing is
downloaded). Default input: the configuration's validation size (shorter side)
x 4/3. Times are medians of --repeat runs after --warmup runs. Each
measurement runs in a fresh subprocess so that peak memory is its own: the
maximum resident set size of the process on CPU (includes the Python/torch
baseline, reported separately), torch.cuda.max_memory_allocated on GPU.
FLOPs come from torch.utils.flop_counter (2 per multiply-add); the
MSDeformAttn operator counts 10 per (query, head, level, point, channel): 4
bilinear taps and the attention weight.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from detr_deform.errors import EXIT_STATUS_HELP

# torch is imported inside the functions that use it: --help and argument errors answer before it loads.

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=two_stage")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="inference batch sizes")
    parser.add_argument("--train-batch-size", type=int, help="default: the config's optim.batch_size")
    parser.add_argument("--num-classes", type=int, default=91)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: one measurement in a subprocess
    return parser.parse_args(argv)


def load_config(overrides: list[str], num_classes: int):
    from detr_deform.cli.compose import compose_config

    cfg = compose_config(overrides)
    cfg.model.pretrained_backbone = None
    if cfg.model.num_classes is None:
        cfg.model.num_classes = num_classes
    return cfg


def register_operator_flops() -> bool:
    """Counts the compiled operator; False when it is unavailable (the
    grid_sample fallback's FLOPs are then not counted)."""
    import torch
    from torch.utils.flop_counter import register_flop_formula

    from detr_deform.ops import compiled_op_available

    if not compiled_op_available():
        return False

    @register_flop_formula(torch.ops.detr_deform.ms_deform_attn_forward)
    def _flops(value_shape, spatial_shapes_shape, level_start_shape, locations_shape, weights_shape, *args,
               out_shape=None, **kwargs) -> int:
        batch, queries, heads, levels, points, _ = locations_shape
        return 10 * batch * queries * heads * levels * points * value_shape[-1]

    return True


def run_phase(args: argparse.Namespace) -> dict:
    """One measurement, in this (fresh) process (engine/measure.py: the batch, the timed step, memory)."""
    import torch

    from detr_deform.engine.measure import peak_memory_mib, synthetic_batch, time_inference, time_training_step
    from detr_deform.engine.optim import build_optimizer
    from detr_deform.models.build import build_criterion, build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.overrides, args.num_classes)
    device = torch.device(args.device)
    baseline = peak_memory_mib(device) if device.type == "cpu" else 0.0
    model = build_model(cfg.model).to(device)
    kind, _, batch = args.phase.partition(":")
    batch = int(batch or 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if kind == "static":
        from torch.utils.flop_counter import FlopCounterMode

        counted = register_operator_flops()
        parameters = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model.eval()
        # The FLOP counter's module tracker trips over parameters that require grad inside no_grad.
        model.requires_grad_(False)
        images, _ = synthetic_batch([0], args.height, args.width, cfg.model.num_classes, device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images)
        return {"parameters": parameters, "trainable_parameters": trainable,
                "gflops": counter.get_total_flops() / 1e9, "attention_flops_counted": counted,
                "baseline_rss_mib": baseline}
    run_model = torch.compile(model, backend=cfg.runtime.compile_backend) if cfg.runtime.compile else model
    images, targets = synthetic_batch([6] * batch, args.height, args.width, cfg.model.num_classes, device)
    if kind == "infer":
        model.eval()
        first = time_inference(run_model, images, device, repeat=1, warmup=0)  # with compile: includes compiling
        seconds = time_inference(run_model, images, device, repeat=args.repeat, warmup=args.warmup)
        return {"batch": batch, "latency_ms": seconds * 1000, "images_per_s": batch / seconds, "first_call_s": first,
                "peak_memory_mib": peak_memory_mib(device)}
    criterion = build_criterion(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    model.train()
    timing = dict(clip_max_norm=cfg.optim.clip_max_norm, amp=cfg.runtime.amp)
    first, _ = time_training_step(run_model, criterion, optimizer, images, targets, device, repeat=1, warmup=0,
                                  **timing)
    seconds, _ = time_training_step(run_model, criterion, optimizer, images, targets, device, repeat=args.repeat,
                                    warmup=args.warmup, **timing)
    return {"batch": batch, "step_s": seconds, "first_call_s": first, "peak_memory_mib": peak_memory_mib(device)}


def measure(args: argparse.Namespace, phase: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), *args.overrides, "--phase", phase,
               "--device", args.device, "--height", str(args.height), "--width", str(args.width),
               "--num-classes", str(args.num_classes), "--warmup", str(args.warmup), "--repeat", str(args.repeat)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark phase {phase} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.phase:
        print(json.dumps(run_phase(args)))
        return 0
    from detr_deform.config import ConfigError

    try:
        cfg = load_config(args.overrides, args.num_classes)
    except (ConfigError, Exception) as error:  # Hydra raises several types for bad overrides
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.height = args.height or cfg.data.val_size
    args.width = args.width or min(cfg.data.max_size, round(args.height * 4 / 3))
    train_batch = args.train_batch_size or cfg.optim.batch_size
    results = {"experiment": cfg.experiment, "overrides": args.overrides, "device": args.device,
               "input": [args.height, args.width], "threads": args.threads or torch.get_num_threads(),
               **measure(args, "static"),
               "inference": [measure(args, f"infer:{b}") for b in args.batch_sizes],
               "train": measure(args, f"train:{train_batch}")}
    lines = [f"{cfg.experiment} ({' '.join(args.overrides) or 'defaults'}) on {args.device}, "
             f"input {args.height}x{args.width}, {results['threads']} threads",
             f"  parameters {results['parameters'] / 1e6:.2f} M ({results['trainable_parameters'] / 1e6:.2f} M "
             f"trainable), {results['gflops']:.1f} GFLOPs per image (inference)"]
    for entry in results["inference"]:
        lines.append(f"  inference batch {entry['batch']}: {entry['latency_ms']:.1f} ms "
                     f"({entry['images_per_s']:.2f} img/s), peak memory {entry['peak_memory_mib']:.0f} MiB")
    train = results["train"]
    lines.append(f"  training step batch {train['batch']}: {train['step_s'] * 1000:.0f} ms (first step "
                 f"{train['first_call_s']:.1f} s), peak memory "
                 f"{train['peak_memory_mib']:.0f} MiB" + (f" (process baseline {results['baseline_rss_mib']:.0f} MiB)"
                                                         if args.device == "cpu" else ""))
    print("\n".join(lines))
    if args.markdown:
        infer = " | ".join(f"{e['latency_ms']:.0f} ms / {e['images_per_s']:.1f}" for e in results["inference"])
        print(f"\n| experiment | device | input | params | GFLOPs | inference ms / img/s "
              f"(batch {', '.join(map(str, args.batch_sizes))}) | train step (batch {train['batch']}) | "
              f"train peak MiB |\n|---|---|---|---|---|---|---|---|\n"
              f"| {cfg.experiment} | {args.device} | {args.height}x{args.width} | "
              f"{results['parameters'] / 1e6:.1f} M | "
              f"{results['gflops']:.1f} | {infer} | {train['step_s'] * 1000:.0f} ms | {train['peak_memory_mib']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
