#!/usr/bin/env python
"""GPU readiness check: the one command to run on a GPU machine.

    python tools/gpu_check.py                          # with CUDA: all parts; without: the emulated kernel checks
    python tools/gpu_check.py --output-dir "$OUT/gpu_check"   # a machine that returns only one folder
    python tools/gpu_check.py --output-dir out --budget-s 480 --parts build op_tests op_bench
    python tools/gpu_check.py --device cpu --tiny      # dry run of the GPU parts' code on the CPU (CI)

Parts, in this order (by value: what a short GPU loan must see first); each runs in
its own subprocess and process group (a crashed CUDA context or a hang cannot take
the rest down, and a part stopped on its timeout is killed with every child it
started: nvcc, ninja, torchrun workers) with its own time budget, cut to what is
left of --budget-s; the budgets add up to the default total. A part that would
overrun is skipped with a note, and a part that runs over its budget is stopped
and reported as skipped (timed out). Every check raises explicitly (no assert), and
the tool refuses to start under python -O / PYTHONOPTIMIZE, which would strip the
asserts of anything it imports:

  build        build the operator for the local GPU (the emulation harness builds alongside)
  op_tests     the op on the GPU vs the CPU op, the reference and the emulation: fp64 / fp32,
               gradcheck fp64, torch.library.opcheck, fp16 / bf16 accumulation, non-contiguous
               inputs, encoder-scale gradients vs the pure-PyTorch path, the deterministic
               backward bitwise twice, offsets beyond 2^31 elements, a second GPU if present
  op_bench     op forward and forward+backward vs the pure-PyTorch path, encoder and decoder
               scale, fp32 and bf16 (results and gradients checked); cost of the deterministic backward
  model_bench  R50 (plain; two-stage + box refinement), 800x1066: training step time and peak
               memory at batch 2 in fp32 / AMP fp16 / bf16, inference images/s at batch 1 and 8;
               DAT-T's training step
  train_demo   the demo trained for 300 steps through tools/train.py: the loss must fall as on CPU
  emulation    the CUDA kernels' own code run on the CPU (detr_deform.ops.kernel_checks; CI runs it too)
  ddp          one NCCL DDP training step through torchrun (1 process) vs a plain step
  compile      torch.compile of the demo-size model: same outputs as eager, a training step

Without CUDA only "emulation" runs (with all of --budget-s) and every GPU part is listed as skipped.
--device cpu --tiny runs the GPU parts' code on the CPU at tiny sizes (gloo for
DDP, the "eager" compile backend), in this process and without per-part
budgets, so that only the CUDA-specific calls remain untested. Writes results.md and
results.json into --output-dir (default
outputs/gpu_check/<timestamp>). The last line is "N passed, N failed"; the
exit status is 1 when a check failed, else 3 when a part or check was skipped
for lack of time (the run is incomplete), else 0. Parts skipped for want of a
GPU do not count against it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's detr_deform, also when run from elsewhere


@dataclass
class Result:
    part: str
    name: str
    status: str               # passed | failed | skipped
    seconds: float = 0.0
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    out_of_time: bool = False  # skipped for lack of time (not for lack of a GPU): the run is incomplete


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: float           # most this part may take
    min_s: float              # skipped when less than this is left of the total budget
    needs_gpu: bool = True


# Budgets add up to the default --budget-s (480 s = 8 min). They are estimates for one H200 with
# 16 cores (no GPU run yet): the build compiles for the visible GPU only (one architecture), the
# emulation runs on the CPU and is also run by CI, so it comes late.
PARTS = [
    Part("build", 90, 40),
    Part("op_tests", 60, 20),
    Part("op_bench", 50, 20),
    Part("model_bench", 90, 40),
    Part("train_demo", 70, 40),
    Part("emulation", 40, 10, needs_gpu=False),
    Part("ddp", 30, 15),
    Part("compile", 50, 30),
]
DEFAULT_BUDGET_S = 480.0
PART_NAMES = [part.name for part in PARTS]


class PartContext:
    """What a part sees in its subprocess: the device, the sizes, its deadline, and check()."""

    def __init__(self, part: str, device: str, tiny: bool, budget_s: float, output_dir: Path,
                 emulation_checks: list[str] | None):
        self.part, self.device, self.tiny = part, device, tiny
        self.deadline = time.monotonic() + budget_s
        self.output_dir = output_dir
        self.emulation_checks = emulation_checks
        self.results: list[Result] = []
        self.data: dict[str, dict] = {}   # name -> data of passed checks, for summaries
        self._path = output_dir / f"part_{part}.json"

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, name: str, fn: Callable[[], Any]) -> dict | None:
        """Runs fn (returning a note, or (note, data)); records passed / failed / skipped."""
        if self.time_left() <= 0:
            self._record(Result(self.part, name, "skipped", note="part time budget used up", out_of_time=True))
            return None
        start = time.monotonic()
        try:
            out = fn()
        except Exception as error:  # a check may fail in any way; record it and go on
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self._record(Result(self.part, name, "failed", time.monotonic() - start,
                                f"{type(error).__name__}: {first}"[:400], {"traceback": traceback.format_exc()}))
            return None
        note, data = out if isinstance(out, tuple) else (out, {})
        self._record(Result(self.part, name, "passed", time.monotonic() - start, note or "", data))
        self.data[name] = data
        return data

    def skip(self, name: str, note: str) -> None:
        self._record(Result(self.part, name, "skipped", note=note))

    def _record(self, result: Result) -> None:
        self.results.append(result)
        print(f"[{result.part}] {result.name}: {result.status} ({result.seconds:.1f} s) {result.note}", flush=True)
        # Written after every check, so that a crash or timeout keeps what ran before it.
        self._path.write_text(json.dumps([asdict(r) for r in self.results], indent=1))


# ------------------------------------------------------------------ parts --

def part_build(ctx: PartContext) -> None:
    import torch

    from detr_deform.ops import _build

    def build():
        library = _build.build_and_load(with_cuda=ctx.device == "cuda", verbose=False)
        data = {"library": str(library), "torch": torch.__version__, "cuda": torch.version.cuda,
                "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "(the visible GPU's)")}
        if ctx.device == "cuda":
            data.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                        devices=torch.cuda.device_count())
        return f"built and loaded {library.name}", data

    ctx.check("operator", build)


def part_op_tests(ctx: PartContext) -> None:
    import torch

    from detr_deform.ops import load_compiled_op
    from detr_deform.ops.device_checks import device_checks

    if ctx.check("load", lambda: load_compiled_op() or "loaded") is None:
        return
    for name, fn in device_checks(torch.device(ctx.device), tiny=ctx.tiny).items():
        ctx.check(name, fn)
    if ctx.device == "cuda" and torch.cuda.device_count() < 2:
        ctx.skip("second_device", "only one GPU visible")
    if ctx.tiny:
        ctx.skip("large_offsets", "needs ~30 GB of GPU memory (dry run: covered by the emulation's large_offsets)")


def part_emulation(ctx: PartContext) -> None:
    from detr_deform.ops import emulation, kernel_checks

    if ctx.check("build harness", lambda: emulation.load_emulation() or "built and loaded") is None:
        return
    for name in ctx.emulation_checks or list(kernel_checks.CHECKS):
        ctx.check(name, lambda n=name: kernel_checks.CHECKS[n]())


def heavy_part(name: str) -> Callable[[PartContext], None]:
    """The benchmark / model parts live in tools/gpu_check_parts.py (imported in the part's process only)."""
    def run(ctx: PartContext) -> None:
        import gpu_check_parts

        getattr(gpu_check_parts, name)(ctx)

    return run


PART_FUNCTIONS = {"build": part_build, "op_tests": part_op_tests, "emulation": part_emulation,
                  **{name: heavy_part(name) for name in ("op_bench", "ddp", "model_bench", "train_demo", "compile")}}


# ----------------------------------------------------------------- parent --

def run_part_subprocess(part: Part, args: argparse.Namespace, timeout: float, output_dir: Path) -> list[Result]:
    """Runs one part in a child process (its output in part_<name>.log) and collects its results."""
    command = [sys.executable, str(Path(__file__).resolve()), "_part", part.name, "--device", args.device,
               "--budget-s", f"{timeout:.0f}", "--output-dir", str(output_dir)]
    if args.tiny:
        command.append("--tiny")
    if args.emulation_checks:
        command += ["--emulation-checks", *args.emulation_checks]
    results_path = output_dir / f"part_{part.name}.json"
    log_path = output_dir / f"part_{part.name}.log"
    # Its own session = its own process group: on a timeout the whole group goes (nvcc, ninja,
    # torchrun and its workers), so nothing the part started keeps running into the next part.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               start_new_session=True)
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        kill_group(process)

    # A little grace beyond the part's budget for the interpreter to start and finish.
    watchdog = threading.Timer(timeout + 20, stop)
    watchdog.start()
    with open(log_path, "w") as log:
        for line in process.stdout:  # everything to the log; the per-check lines to the console too
            log.write(line)
            if line.startswith(f"[{part.name}]"):
                print(line, end="", flush=True)
    process.wait()
    watchdog.cancel()
    kill_group(process)  # anything the part left behind (its group outlives it)
    extra: list[Result] = []
    if timed_out.is_set():
        extra.append(Result(part.name, "process", "skipped",
                            note=f"timed out after {timeout:.0f} s (its budget); results so far kept",
                            out_of_time=True))
    elif process.returncode != 0:
        extra.append(Result(part.name, "process", "failed",
                            note=f"the part's process exited with status {process.returncode}",
                            data={"log_tail": log_path.read_text()[-2000:]}))
    results = [Result(**r) for r in json.loads(results_path.read_text())] if results_path.exists() else []
    return results + extra


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the process group that ``process`` leads (started with start_new_session=True)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is already gone
        pass


def run_part_in_process(part: Part, args: argparse.Namespace, budget_s: float, output_dir: Path) -> list[Result]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    ctx = PartContext(part.name, args.device, args.tiny, budget_s, output_dir, args.emulation_checks)
    run_part(ctx)
    return ctx.results


def plan(args: argparse.Namespace) -> tuple[list[Part], list[Result]]:
    """The parts to run, and skip records for the others (without a GPU: one per check it would run)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_check_parts  # the check names of the GPU parts

    skipped = []
    selected = []
    for part in PARTS:
        if args.parts and part.name not in args.parts:
            continue
        if part.needs_gpu and args.device == "none":
            skipped += [Result(part.name, check, "skipped", note=args.no_gpu_reason)
                        for check in gpu_check_parts.planned_checks(part.name)]
        else:
            selected.append(part)
    return selected, skipped


def resolve_device(args: argparse.Namespace) -> None:
    import torch

    args.no_gpu_reason = ""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "none"
    if args.device == "none":
        args.no_gpu_reason = (f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}: "
                              "torch.cuda.is_available() is False)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    if args.device == "cpu" and not args.tiny:
        raise SystemExit("error: --device cpu is a dry run of the GPU parts and needs --tiny")


def start_background_builds(args: argparse.Namespace, parts: list[Part], output_dir: Path) -> subprocess.Popen | None:
    """The emulation harness compiles with g++ while nvcc compiles the op (builds share a lock per directory)."""
    if args.device != "cuda" or not any(p.name in ("emulation", "op_tests") for p in parts):
        return None
    with open(output_dir / "emulation_build.log", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "detr_deform.ops", "build", "--emulation"], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


OPTIMIZE_REFUSAL = ("error: tools/gpu_check.py refuses to run under python -O / PYTHONOPTIMIZE: it would strip "
                    "the assert statements of everything the checks import; run it without -O and with "
                    "PYTHONOPTIMIZE unset")


def main(argv: list[str] | None = None) -> int:
    if sys.flags.optimize:
        print(OPTIMIZE_REFUSAL, file=sys.stderr)
        return 2
    args = parse_args(argv)
    if args.command == "_part":
        return child_main(args)
    if args.command == "_ddp_step":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import gpu_check_parts

        return gpu_check_parts.ddp_step_main(args)
    resolve_device(args)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output_dir = Path(args.output_dir or ROOT / "outputs" / "gpu_check" / stamp).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: device {args.device}{' (tiny sizes)' if args.tiny else ''}, budget {args.budget_s:.0f} s, "
          f"results in {output_dir}", flush=True)
    parts, results = plan(args)
    start = time.monotonic()
    background = start_background_builds(args, parts, output_dir)
    for part in parts:
        left = args.budget_s - (time.monotonic() - start)
        if left < part.min_s:
            results.append(Result(part.name, "(part)", "skipped",
                                  note=f"would overrun: {left:.0f} s of the {args.budget_s:.0f} s budget left, "
                                       f"this part needs at least {part.min_s:.0f} s", out_of_time=True))
            continue
        if args.tiny:
            # A dry run is about the code, not the time: no budget per part, and no process per part
            # (the subprocess path is what every non-dry run, with or without a GPU, uses).
            results += run_part_in_process(part, args, left, output_dir)
        else:
            # Without a GPU the emulation is the only part: it may use all of the budget.
            budget = left if args.device == "none" else min(part.budget_s, left)
            results += run_part_subprocess(part, args, budget, output_dir)
    if background is not None:
        kill_group(background)
    return write_report(results, args, output_dir, time.monotonic() - start)


# ----------------------------------------------------------------- report --

def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _meta(results: list[Result], args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    import platform

    import torch

    build = next((r.data for r in results if r.part == "build" and r.status == "passed"), {})
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": args.device, "tiny": args.tiny,
            "gpu": build.get("gpu"), "torch": torch.__version__, "cuda": torch.version.cuda,
            "host": platform.node(), "budget_s": args.budget_s, "wall_s": round(seconds, 1)}


def write_report(results: list[Result], args: argparse.Namespace, output_dir: Path, seconds: float) -> int:
    """results.json + results.md; prints the skips and the closing "N passed, N failed" line."""
    meta = _meta(results, args, seconds)
    (output_dir / "results.json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]},
                                                        indent=1))
    lines = ["# tools/gpu_check.py results", "",
             ", ".join(f"{k}: {v}" for k, v in meta.items() if v is not None), ""]
    lines += _table(["part", "check", "status", "s", "note"],
                    [[r.part, r.name, r.status, f"{r.seconds:.1f}", r.note.replace("|", "/")] for r in results])
    for result in results:
        for title, table in result.data.get("tables", {}).items():
            lines += ["", f"## {title}", ""] + _table(table["header"], table["rows"])
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    counts = {status: sum(r.status == status for r in results) for status in ("passed", "failed", "skipped")}
    for result in results:
        if result.status != "passed":
            print(f"{result.status}: {result.part}/{result.name}: {result.note}")
    print(f"results: {output_dir / 'results.md'}, {output_dir / 'results.json'}")
    short = [f"{r.part}/{r.name}" for r in results if r.out_of_time]
    print(f"{counts['skipped']} skipped")
    if short:
        print(f"incomplete: {len(short)} skipped for lack of time ({', '.join(short[:6])}"
              f"{', ...' if len(short) > 6 else ''}); rerun with a larger --budget-s or only those --parts")
    print(f"{counts['passed']} passed, {counts['failed']} failed")
    return 1 if counts["failed"] else (3 if short else 0)


def run_part(ctx: PartContext) -> None:
    try:
        PART_FUNCTIONS[ctx.part](ctx)
    except Exception as error:  # an import or set-up error of the part itself
        ctx._record(Result(ctx.part, "(part)", "failed", note=f"{type(error).__name__}: {error}"[:400],
                           data={"traceback": traceback.format_exc()}))


def child_main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    run_part(PartContext(args.part, args.device, args.tiny, args.budget_s, Path(args.output_dir),
                         args.emulation_checks))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "_part", "_ddp_step"],
                        help=argparse.SUPPRESS)
    parser.add_argument("part", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "none"],
                        help="auto: cuda if available, else only the emulated checks; cpu: dry run (needs --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (dry runs of the GPU parts on the CPU)")
    parser.add_argument("--output-dir", help="where results.md / results.json and the part logs go (default: "
                        "outputs/gpu_check/<timestamp>, which git ignores; on a machine that returns one folder, "
                        "e.g. --output-dir \"$OUT/gpu_check\")")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"total time budget in seconds (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--parts", nargs="+", choices=PART_NAMES, help="run only these parts")
    parser.add_argument("--emulation-checks", nargs="+", metavar="NAME",
                        help="only these checks of detr_deform.ops.kernel_checks (default: all)")
    parser.add_argument("--out", help=argparse.SUPPRESS)  # _ddp_step: where to write its JSON
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
