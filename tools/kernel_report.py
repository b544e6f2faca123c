#!/usr/bin/env python
"""Kernel report: what the CUDA kernels cost, measured without a GPU (CPU only, minutes).

    python tools/kernel_report.py                  # table, then "kernel report: N of M targets met"
    python tools/kernel_report.py --json           # the figures as JSON after the table
    python tools/kernel_report.py --skip-nvcc      # memory traffic only (no CUDA toolkit needed)

Memory traffic: the emulation's trace flavour (ops/ms_deform_attn/memory_trace.h) runs the kernels'
own code warp by warp and counts, for every warp-wide load, store and atomic, the distinct 32-byte
sectors its lanes touch; summed per kind and divided by the number of samples (n, q, m, l, p):
value reads, grad_value (atomics, or the gather's adds), the rest (locations, weights, grad_output,
keys, gradient writes), and lane atomics per sample. Encoder scale, batch 1, Lq = S with the
benchmark's realistic locations (tools/benchmark_ms_deform_attn.py), on a random subset of --queries
queries (per-sample figures depend on the warps, not on how many there are): COCO at 800x1066 (4
levels, 8 heads x 32 channels) and the demo (3 levels of a 112x149 image, 8 heads x 16 channels).
fp32, and bf16 as AMP gives it (bf16 value and grad_output, float32 locations and weights).

Compile-time facts for sm_90: the .cu compiled with nvcc -cubin -arch=sm_90 -Xptxas -v (registers,
spill stores/loads, shared memory per kernel) and disassembled with cuobjdump -sass (the triton
package ships one; this toolkit may not): SASS instructions per kernel and in its per-sample loop,
taken as the innermost loop (backward branch) that holds at least four global loads (the forward's
loop over points; the backward's loop over a lane's channels).

Targets (issue 21): grad_value traffic <= 18 sectors/sample in fp32 and <= 10 in bf16 (minimum 16 / 8:
four corner rows of 32 channels); forward value reads <= 18 / 10; no spills; forward <= 64 registers;
forward per-sample loop <= 90 SASS instructions in fp32. Exit status 0 when the report was made
(targets met or not: this is a benchmark), 1 when a step failed, 2 for bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

COCO_LEVELS = [(100, 134), (50, 67), (25, 34), (13, 17)]  # 800x1066, strides 8/16/32/64
DEMO_LEVELS = [(14, 19), (7, 10), (4, 5)]                 # 112x149, strides 8/16/32
SCALES = {"coco": (COCO_LEVELS, 8, 32), "demo": (DEMO_LEVELS, 8, 16)}
KERNELS = ("forward", "atomic backward", "deterministic backward", "gather")
# Demangled-name patterns (namespaces stripped) of the kernels the report reads from nvcc.
SASS_KERNELS = {
    ("forward", "fp32"): "forward_kernel<int, 4, float, float>",
    ("forward", "bf16"): "forward_kernel<int, 8, BFloat16, float>",
    ("atomic backward", "fp32"): "backward_kernel<float, float, AtomicScatter<float,",
    ("atomic backward", "bf16"): "backward_kernel<BFloat16, float, AtomicScatter<BFloat16,",
    ("deterministic backward", "fp32"): "backward_kernel<float, float, KeyedScatter<float>",
    ("deterministic backward", "bf16"): "backward_kernel<BFloat16, float, KeyedScatter<BFloat16>",
    ("gather", "fp32"): "gather_kernel<float>",
    ("gather", "bf16"): "gather_kernel<BFloat16>",
}


# ---------------------------------------------------------------- traffic --

def traffic(scale: str, precision: str, queries: int) -> dict[str, dict[str, float]]:
    """Per-sample sectors (value reads, grad_value, rest) and atomics of each kernel, emulated."""
    import torch
    from benchmark_ms_deform_attn import make_inputs

    from detr_deform.ops import emulation

    levels, heads, channels = SCALES[scale]
    (value, shapes, starts, locations, weights), _ = make_inputs(None, "cpu", torch.float32, heads=heads,
                                                                 channels=channels, levels=levels)
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(locations.shape[1], generator=g)[:queries].sort().values
    locations, weights = locations[:, pick].contiguous(), weights[:, pick].contiguous()
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    value = value.to(dtype)
    grad_output = torch.randn(1, locations.shape[1], heads * channels, generator=g).to(dtype)
    samples = weights.numel()
    runs = {}
    emulation.trace_start()
    emulation.emulated_forward(value, shapes, starts, locations, weights)
    runs["forward"] = emulation.trace_stop()["forward"]
    emulation.trace_start()
    emulation.emulated_backward(grad_output, value, shapes, starts, locations, weights)
    runs["atomic backward"] = emulation.trace_stop()["backward"]
    emulation.trace_start()
    emulation.emulated_backward(grad_output, value, shapes, starts, locations, weights, deterministic=True)
    deterministic = emulation.trace_stop()
    runs["deterministic backward"], runs["gather"] = deterministic["backward"], deterministic["gather"]
    return {kernel: {"value_read": run["value_read_sectors"] / samples,
                     "grad_value": run["grad_value_sectors"] / samples,
                     "rest": (run["other_read_sectors"] + run["other_write_sectors"]) / samples,
                     "atomics": run["atomics"] / samples} for kernel, run in runs.items()}


# -------------------------------------------------------------- compiling --

def cuobjdump_path() -> str | None:
    """The toolkit's cuobjdump, else the one the triton package ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(candidate) if candidate.exists() else None


def compile_sm90(workdir: Path) -> tuple[str, Path]:
    """nvcc -cubin -arch=sm_90 -Xptxas -v of ms_deform_attn_cuda.cu: (ptxas report, cubin)."""
    import sysconfig

    from detr_deform.ops import _build

    cpp_extension = _build._cpp_extension()
    home = _build._resolve_cuda_home()
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        raise RuntimeError("nvcc not found (set CUDA_HOME, or use --skip-nvcc)")
    includes = [str(_build.source_dir()), *cpp_extension.include_paths("cuda"), *_build._cuda_include_dirs(),
                sysconfig.get_paths()["include"]]
    cubin = workdir / "ms_deform_attn_cuda.cubin"
    command = [str(Path(home) / "bin" / "nvcc"), "-cubin", "-arch=sm_90", "-O3", "-std=c++20",
               "--Werror=cross-execution-space-call",
               *cpp_extension.COMMON_NVCC_FLAGS, "-DTORCH_EXTENSION_NAME=kernel_report",
               "-DTORCH_API_INCLUDE_EXTENSION_H", "-Xptxas", "-v", *[f"-I{path}" for path in includes],
               str(_build.source_dir() / "ms_deform_attn_cuda.cu"), "-o", str(cubin)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed: {_build._first_error_line(done.stderr + done.stdout)}")
    return done.stdout + done.stderr, cubin


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
    """mangled kernel name -> registers, spill_stores, spill_loads, smem (bytes), from -Xptxas -v."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)'", line)
        if entry:
            current = kernels.setdefault(entry.group(1), {"registers": 0, "spill_stores": 0, "spill_loads": 0,
                                                          "smem": 0})
            continue
        if current is None:
            continue
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills:
            current["spill_stores"], current["spill_loads"] = int(spills.group(1)), int(spills.group(2))
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current["registers"] = int(used.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
    return kernels


def parse_sass(text: str) -> dict[str, dict[str, int]]:
    """mangled kernel name -> instructions (without NOPs) and per_sample_loop (see the module docstring).
    Branch targets come as labels (`(.L_x_3)`) or as addresses (0xb60), depending on cuobjdump."""
    functions: dict[str, list[tuple[int, str]]] = {}
    labels: dict[str, dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        header = re.search(r"Function : (\w+)", line)
        if header:
            name = header.group(1)
            functions[name], labels[name] = [], {}
            continue
        if name is None:
            continue
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[name][label.group(1)] = len(functions[name])
            continue
        instruction = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if instruction and not re.match(r"(@!?U?P\w+\s+)?NOP\b", instruction.group(2)):
            functions[name].append((int(instruction.group(1), 16), instruction.group(2)))
    out = {}
    for name, body in functions.items():
        by_address = {address: index for index, (address, _) in enumerate(body)}
        loops = []
        for index, (_, instruction) in enumerate(body):
            target = re.search(r"BRA\s+(?:`\((\.L_x_\d+)\)|(0x[0-9a-f]+))", instruction)
            if not target:
                continue
            start = (labels[name].get(target.group(1)) if target.group(1) else
                     next((i for a, i in sorted(by_address.items()) if a >= int(target.group(2), 16)), None))
            if start is not None and start <= index:
                span = [op for _, op in body[start:index + 1]]
                if sum(bool(re.search(r"(^|\s)LDG", op)) for op in span) >= 4:
                    loops.append(len(span))
        out[name] = {"instructions": len(body), "per_sample_loop": min(loops) if loops else 0}
    return out


def demangle(names: list[str]) -> dict[str, str]:
    """mangled -> demangled name with namespaces stripped (c++filt), for matching SASS_KERNELS."""
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=False)
    plain = done.stdout.splitlines() if done.returncode == 0 else names
    strip = re.compile(r"(detr_deform::|\(anonymous namespace\)::|cuda_kernels::|c10::)")
    return {mangled: strip.sub("", readable) for mangled, readable in zip(names, plain)}


def compile_facts(keep: Path | None = None) -> dict[str, dict[str, dict[str, int]]]:
    """(kernel, precision) -> registers, spills, smem, instructions, per-sample loop, for sm_90;
    ``keep``: a folder for the cubin, nvcc's output (ptxas.txt) and the disassembly (sass.txt)."""
    cuobjdump = cuobjdump_path()
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (neither in the CUDA toolkit nor in the triton package)")
    with tempfile.TemporaryDirectory() as scratch:
        workdir = keep or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        ptxas, cubin = compile_sm90(workdir)
        dump = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=False)
        if dump.returncode != 0:
            raise RuntimeError(f"cuobjdump -sass failed: {dump.stderr.strip()[:300]}")
        if keep:
            (workdir / "ptxas.txt").write_text(ptxas)
            (workdir / "sass.txt").write_text(dump.stdout)
    warnings = [line for line in ptxas.splitlines() if "warning" in line.lower() and "__host__" in line]
    if warnings:  # a host function called from device code: the kernel would be gutted
        raise RuntimeError(f"nvcc: {warnings[0].strip()[:300]}")
    registers, sass = parse_ptxas(ptxas), parse_sass(dump.stdout)
    readable = demangle(sorted(set(registers) | set(sass)))
    facts: dict[str, dict[str, dict[str, int]]] = {}
    for (kernel, precision), pattern in SASS_KERNELS.items():
        match = [name for name, plain in readable.items() if pattern in plain]
        if not match:
            raise RuntimeError(f"no sm_90 kernel matches {pattern!r}")
        name = match[0]
        facts.setdefault(kernel, {})[precision] = {**registers.get(name, {}), **sass.get(name, {})}
    return facts


# ---------------------------------------------------------------- targets --

def targets(figures: dict) -> list[tuple[str, bool | None, str]]:
    """(target, met (None: not measured), measured) at COCO scale."""
    coco = figures["traffic"].get("coco", {})
    facts = figures.get("sm90")

    def sectors(precision: str, kernel: str, kind: str) -> float | None:
        return coco.get(precision, {}).get(kernel, {}).get(kind)

    rows = []
    for precision, bound in (("fp32", 18), ("bf16", 10)):
        for label, kernel, kind in (("grad_value traffic", "atomic backward", "grad_value"),
                                    ("forward value reads", "forward", "value_read")):
            value = sectors(precision, kernel, kind)
            rows.append((f"{label} <= {bound} sectors/sample ({precision})",
                         None if value is None else value <= bound,
                         "not measured" if value is None else f"{value:.2f}"))
    if facts is None:
        rows += [(target, None, "not measured (no nvcc / cuobjdump)") for target in
                 ("no spills", "forward <= 64 registers", "forward per-sample loop <= 90 SASS (fp32)")]
        return rows
    spills = {f"{k} {p}": f["spill_stores"] + f["spill_loads"] for k, by in facts.items() for p, f in by.items()}
    rows.append(("no spills", all(v == 0 for v in spills.values()),
                 ", ".join(f"{k}: {v} B" for k, v in spills.items() if v) or "0 bytes in every kernel"))
    registers = max(f["registers"] for f in facts["forward"].values())
    rows.append(("forward <= 64 registers", registers <= 64, f"{registers} (largest of fp32, bf16)"))
    loop = facts["forward"]["fp32"]["per_sample_loop"]
    rows.append(("forward per-sample loop <= 90 SASS (fp32)", loop <= 90 if loop else None,
                 f"{loop}" if loop else "loop not isolated"))
    return rows


def table(figures: dict) -> list[str]:
    """Markdown tables: traffic per scale and precision, compile facts, targets."""
    lines = ["| scale | dtype | kernel | value read | grad_value | rest | atomics |",
             "|---|---|---|---|---|---|---|"]
    for scale, by_precision in figures["traffic"].items():
        for precision, kernels in by_precision.items():
            for kernel, row in kernels.items():
                lines.append(f"| {scale} | {precision} | {kernel} | {row['value_read']:.2f} | "
                             f"{row['grad_value']:.2f} | {row['rest']:.2f} | {row['atomics']:.2f} |")
    lines += ["", "(32-byte sectors per sample; atomics: lane atomics per sample)", ""]
    if figures.get("sm90"):
        lines += ["| kernel (sm_90) | dtype | registers | spills (B) | smem (B) | SASS | per-sample loop |",
                  "|---|---|---|---|---|---|---|"]
        for kernel, by_precision in figures["sm90"].items():
            for precision, f in by_precision.items():
                lines.append(f"| {kernel} | {precision} | {f['registers']} | "
                             f"{f['spill_stores'] + f['spill_loads']} | {f['smem']} | {f['instructions']} | "
                             f"{f['per_sample_loop'] or 'n/a'} |")
        lines.append("")
    elif figures.get("sm90_error"):
        lines += [f"sm_90 compile facts not measured: {figures['sm90_error']}", ""]
    lines += ["| target | met | measured |", "|---|---|---|"]
    for target, met, measured in targets(figures):
        lines.append(f"| {target} | {'n/a' if met is None else 'yes' if met else 'NO'} | {measured} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON after the table")
    parser.add_argument("--skip-nvcc", action="store_true", help="memory traffic only")
    parser.add_argument("--queries", type=int, default=256, help="queries per scale (default 256)")
    parser.add_argument("--keep", type=Path, help="keep the sm_90 cubin, ptxas.txt and sass.txt in this folder")
    args = parser.parse_args(argv)
    if args.queries <= 0:
        parser.error(f"--queries must be positive, got {args.queries}")
    from detr_deform.ops import emulation

    try:
        emulation.load_emulation(trace=True)
        figures: dict = {"traffic": {scale: {precision: traffic(scale, precision, args.queries)
                                             for precision in ("fp32", "bf16")} for scale in SCALES}}
    except Exception as error:  # a build or emulation failure: one line
        print(f"error: kernel report: memory traffic: {type(error).__name__}: {str(error).splitlines()[0]}",
              file=sys.stderr)
        return 1
    if not args.skip_nvcc:
        try:
            figures["sm90"] = compile_facts(args.keep)
        except (RuntimeError, OSError) as error:
            figures["sm90_error"] = str(error).splitlines()[0]
    print("\n".join(table(figures)))
    rows = targets(figures)
    if args.json:
        print(json.dumps({**figures, "targets": [{"target": t, "met": m, "measured": v} for t, m, v in rows]},
                         indent=1))
    print(f"kernel report: {sum(m is True for _, m, _ in rows)} of {len(rows)} targets met")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
