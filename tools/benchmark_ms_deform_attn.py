#!/usr/bin/env python
"""Benchmark the MSDeformAttn operator: compiled (cpp) vs pure-PyTorch reference.

Measures forward and forward+backward wall time (median of --repeat runs after
one warm-up) and peak memory of one forward+backward. Each (impl, scale) case
runs in its own subprocess so that peak memory can be read from the process'
maximum resident set size (CPU) or torch.cuda.max_memory_allocated (GPU).

    python tools/benchmark_ms_deform_attn.py                 # CPU, both scales
    python tools/benchmark_ms_deform_attn.py --device cuda --dtype float16
    python tools/benchmark_ms_deform_attn.py --markdown      # table for docs/benchmarks.md
    python tools/benchmark_ms_deform_attn.py --scales decoder --repeat 1   # quick check
    python tools/benchmark_ms_deform_attn.py --device cuda --deterministic # atomic-free CUDA backward

On a GPU, `python tools/gpu_check.py` runs these measurements (and more) in one go.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys

from detr_deform.errors import EXIT_STATUS_HELP

# torch is imported inside the functions that use it: --help and argument errors answer before it loads.

# Deformable DETR at 800x1333 (strides 8/16/32/64), hidden 256 = 8 heads x 32.
LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
SCALES = {"encoder": None, "decoder": 300}  # number of queries; None -> Lq = S


def reference_points(num_query, generator, levels=LEVELS):
    """Encoder: every pixel centre of every level (normalised); decoder: uniform."""
    import torch

    if num_query is not None:
        return torch.rand(1, num_query, 1, 1, 1, 2, generator=generator)
    refs = []
    for h, w in levels:
        y, x = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        refs.append(torch.stack([x.flatten() / w, y.flatten() / h], -1))
    return torch.cat(refs)[None, :, None, None, None, :]


def make_inputs(num_query, device, dtype, heads=8, channels=32, points=4, batch=1, locations="realistic",
                levels=LEVELS):
    """((value, spatial_shapes, level_start_index, sampling_locations, attention_weights), Lq) on ``device``;
    ``levels`` (H, W) default to Deformable DETR's at 800x1333. Also used by tools/gpu_check.py."""
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor(levels, dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    num_value = int(areas.sum())
    value = torch.randn(batch, num_value, heads, channels, generator=g)
    if locations == "uniform":
        # Worst case for caches: every sample anywhere on its level.
        num_query = num_value if num_query is None else num_query
        locations = torch.rand(batch, num_query, heads, len(levels), points, 2, generator=g)
    else:
        # What the model does: around each query's reference point, on the
        # initial ring of k+1 pixels per head direction, plus 2-pixel noise.
        ref = reference_points(num_query, g, levels)
        num_query = ref.shape[1]
        theta = torch.arange(heads) * 2 * math.pi / heads
        dirs = torch.stack([theta.cos(), theta.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True)[0]
        ring = dirs[:, None, None, :] * torch.arange(1, points + 1)[None, None, :, None]
        level_wh = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32)[None, :, None, :]
        noise = torch.randn(batch, num_query, heads, len(levels), points, 2, generator=g) * 2
        locations = ref + (ring + noise) / level_wh
    weights = torch.rand(batch, num_query, heads, len(levels), points, generator=g).softmax(-1)
    to = dict(device=device, dtype=dtype)
    return (value.to(**to), shapes.to(device), starts.to(device), locations.to(**to), weights.to(**to)), num_query


def run_case(impl: str, scale: str, device: str, dtype: str, repeat: int, locations: str,
             deterministic: bool = False) -> dict:
    import torch

    from detr_deform.ops import load_compiled_op, ms_deform_attn
    from detr_deform.utils.timing import median_seconds, synchronize

    if impl == "cpp":
        load_compiled_op()
    dtype_t = getattr(torch, dtype)
    inputs, num_query = make_inputs(SCALES[scale], device, dtype_t, locations=locations)
    value, shapes, starts, locations, weights = inputs
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]

    def forward():
        with torch.no_grad():
            return ms_deform_attn(value, shapes, starts, locations, weights, impl=impl, deterministic=deterministic)

    def forward_backward():
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], impl=impl, deterministic=deterministic)
        out.backward(torch.ones_like(out))

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    forward_backward()  # warm-up, and the peak-memory measurement
    synchronize(device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    timings = {name: median_seconds(fn, device, repeat)
               for name, fn in (("forward", forward), ("forward_backward", forward_backward))}
    return {"impl": impl, "scale": scale, "num_query": num_query, "peak_bytes": peak, **timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--locations", default="realistic", choices=["realistic", "uniform"],
                        help="realistic: around each query's reference point (default); uniform: anywhere")
    parser.add_argument("--scales", nargs="+", default=list(SCALES), choices=list(SCALES),
                        help="encoder: Lq = S (every pixel of every level); decoder: 300 queries")
    parser.add_argument("--deterministic", action="store_true",
                        help="the compiled op's deterministic (atomic-free) backward; the CPU kernels always are")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--_case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    if args._case:
        print(json.dumps(run_case(args._case[0], args._case[1], args.device, args.dtype, args.repeat,
                                  args.locations, args.deterministic)))
        return 0

    rows = []
    for scale in args.scales:
        for impl in ("cpp", "pytorch"):
            cmd = [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype, "--repeat",
                   str(args.repeat), "--locations", args.locations, "--_case", impl, scale]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.deterministic:
                cmd.append("--deterministic")
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))

    header = ["scale", "Lq", "impl", "forward (ms)", "fwd+bwd (ms)", "peak mem fwd+bwd (MiB)", "fwd+bwd speed-up"]
    lines = []
    for row in rows:
        ref = next(r for r in rows if r["scale"] == row["scale"] and r["impl"] == "pytorch")
        lines.append([row["scale"], str(row["num_query"]), row["impl"], f"{row['forward'] * 1e3:.1f}",
                      f"{row['forward_backward'] * 1e3:.1f}", f"{row['peak_bytes'] / 2**20:.0f}",
                      f"{ref['forward_backward'] / row['forward_backward']:.1f}x"])
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for line in lines:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    print(f"\ndevice={args.device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"levels={LEVELS} M=8 D=32 P=4 batch=1 locations={args.locations} deterministic={args.deterministic}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
