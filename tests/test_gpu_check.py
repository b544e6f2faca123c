"""tools/gpu_check.py without a GPU: its no-CUDA mode (emulated kernel checks, every GPU
part listed as skipped), the dry run of all GPU parts on the CPU at tiny sizes
(--device cpu --tiny), and its reporting of failures and budget overruns."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
GPU_PARTS = ["build", "op_tests", "op_bench", "ddp", "model_bench", "train_demo", "compile"]
NO_GPU = [] if not torch.cuda.is_available() else ["--device", "none"]  # the default, on a machine without CUDA


def gpu_check(tmp_path: Path, *args: str, timeout: int = 900) -> tuple[subprocess.CompletedProcess, list[str], dict]:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "tools/gpu_check.py", "--output-dir", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    report = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    return done, lines, report


def test_without_gpu_runs_the_emulated_checks_and_lists_the_gpu_parts(tmp_path):
    """The plain command, as on a machine without CUDA: every emulated check, within its budget."""
    from detr_deform.ops.kernel_checks import CHECKS

    checks = list(CHECKS)
    done, lines, report = gpu_check(tmp_path, *NO_GPU)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert lines[-1] == f"{len(checks) + 1} passed, 0 failed"  # the harness build + every check
    skipped = [line for line in lines if line.startswith("skipped: ")]
    assert lines[-2] == f"{len(skipped)} skipped"
    for part in GPU_PARTS:
        assert any(line.startswith(f"skipped: {part}/") and "no CUDA device" in line for line in lines), part
    for check in ("op_tests/gradcheck_fp64", "op_tests/deterministic_bitwise", "op_tests/large_offsets",
                  "op_tests/layout_errors", "op_bench/encoder/bfloat16", "model_bench/dat_tiny/train/bf16/b2",
                  "ddp/ddp_step", "compile/training_step"):  # every GPU check is listed, not only the parts
        assert any(line.startswith(f"skipped: {check}: no CUDA device") for line in lines), check
    passed = [r["name"] for r in report["results"] if r["status"] == "passed"]
    assert passed == ["build harness", *checks]
    assert "| emulation | shuffled_thread_order | passed |" in (tmp_path / "out" / "results.md").read_text()


def test_a_failing_check_fails_the_run(tmp_path):
    done, lines, report = gpu_check(tmp_path, *NO_GPU, "--emulation-checks", "launch_config", "no_such_check")
    assert done.returncode == 1
    assert lines[-1] == "2 passed, 1 failed"
    failed = [r for r in report["results"] if r["status"] == "failed"]
    assert len(failed) == 1 and "KeyError" in failed[0]["note"] and failed[0]["data"]["traceback"]


def test_parts_that_would_overrun_are_skipped(tmp_path):
    done, lines, _ = gpu_check(tmp_path, *NO_GPU, "--budget-s", "5")
    assert done.returncode == 3  # incomplete: not a pass
    assert lines[-1] == "0 passed, 0 failed"
    assert lines[-2].startswith("incomplete: 1 skipped for lack of time (emulation/(part))")
    assert any(line.startswith("skipped: emulation/") and "would overrun" in line for line in lines), lines


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    return gpu_check(tmp_path, "--device", "cpu", "--tiny", "--budget-s", "900", "--parts", *GPU_PARTS), tmp_path


def test_dry_run_of_the_gpu_parts_on_cpu(dry_run):
    (done, lines, report), _ = dry_run
    assert done.returncode == 0, "\n".join(lines[-40:]) + done.stderr[-3000:]
    assert re.fullmatch(r"\d+ passed, 0 failed", lines[-1])
    results = report["results"]
    for part in GPU_PARTS:
        assert any(r["part"] == part and r["status"] == "passed" for r in results), f"{part} passed nothing"
    skipped = {(r["part"], r["name"]) for r in results if r["status"] == "skipped"}
    assert skipped == {("op_tests", "large_offsets")}, skipped  # needs GPU memory; emulated in CI instead
    names = {(r["part"], r["name"]) for r in results}
    for expected in [("op_tests", "deterministic_bitwise"), ("op_tests", "gradcheck_fp64"),
                     ("op_bench", "encoder/bfloat16"), ("op_bench", "targets"), ("ddp", "ddp_step"),
                     ("model_bench", "r50_two_stage/train/fp16/b2"), ("model_bench", "r50_two_stage/train/bf16/b2"),
                     ("model_bench", "dat_tiny/train/off/b2"), ("model_bench", "r50/infer/bf16/b2"),
                     ("model_bench", "dino_r50/train/off/b2"),
                     ("model_bench", "targets"), ("train_demo", "loss_falls"),
                     ("compile", "inference"), ("compile", "training_step")]:
        assert expected in names, expected


def test_dry_run_report(dry_run):
    (_, _, report), tmp_path = dry_run
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "## MSDeformAttn operator" in markdown and "## Models" in markdown
    ddp = next(r for r in report["results"] if r["name"] == "ddp_step")
    assert ddp["data"]["backend"] == "gloo" and ddp["data"]["max_diff"] == 0.0
    bench = next(r for r in report["results"] if r["name"] == "encoder/float32")
    assert bench["data"]["cpp"]["forward_backward_ms"] > 0 and bench["data"]["speedup"] > 0


@pytest.mark.parametrize("how", ["-O", "PYTHONOPTIMIZE"])
def test_refuses_to_run_optimized(tmp_path, how):
    """Under python -O every assert of what the checks import would vanish: refused, in one line."""
    import os

    env = dict(os.environ)
    command = [sys.executable, "tools/gpu_check.py", "--output-dir", str(tmp_path / "out")]
    if how == "-O":
        command.insert(1, "-O")
    else:
        env["PYTHONOPTIMIZE"] = "1"
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stdout == "" and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: tools/gpu_check.py refuses to run under python -O / PYTHONOPTIMIZE")
    assert not (tmp_path / "out").exists()


def test_a_stopped_part_takes_its_whole_process_group(tmp_path):
    """kill_group (used on a part's timeout) ends the part's children too (nvcc, ninja, torchrun workers):
    here a shell and the sleep it started in the background, which both hold the pipe; the pipe's EOF is
    the event that every writer is gone."""
    import threading

    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check

    process = subprocess.Popen(["sh", "-c", "sleep 600 & exec sleep 600"], stdout=subprocess.PIPE,
                               start_new_session=True)
    ended = threading.Event()
    reader = threading.Thread(target=lambda: (process.stdout.read(), ended.set()), daemon=True)
    reader.start()
    gpu_check.kill_group(process)
    assert ended.wait(timeout=60), "a process of the group survived"
    process.wait(timeout=60)
    gpu_check.kill_group(process)  # a group that is gone already: no error


def test_part_budgets_fit_the_default_total():
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check

    assert sum(part.budget_s for part in gpu_check.PARTS) <= gpu_check.DEFAULT_BUDGET_S == 480
    assert [part.name for part in gpu_check.PARTS][:3] == ["build", "op_tests", "op_bench"]  # by value
    assert "--output-dir \"$OUT/gpu_check\"" in (ROOT / "tools" / "gpu_check.py").read_text()


def test_no_bare_asserts_in_the_kit():
    """Checks raise through require(): nothing in tools/ or detr_deform/ops may use assert."""
    import ast

    files = sorted((ROOT / "tools").glob("*.py")) + sorted((ROOT / "detr_deform" / "ops").glob("*.py"))
    offenders = [f"{path.name}:{node.lineno}" for path in files for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Assert)]
    assert offenders == []
