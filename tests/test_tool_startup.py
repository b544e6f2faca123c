"""Every command answers --help and argument errors before torch loads (issue: seconds of
imports before parsing). Asserted as behaviour — which modules were imported — not as time;
the measured times are in docs/benchmarks.md."""
import subprocess
import sys

import pytest

from pipeline_helpers import ROOT

# Runs a command's main as `python <tool> <args>` would, then reports what had been imported.
PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    if sys.argv[0].startswith("-m"):
        sys.argv[0] = sys.argv[0][2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    code = stop.code
else:
    code = 0
heavy = sorted(name for name in ("torch", "torchvision", "pycocotools") if name in sys.modules)
print(f"STATUS {code} HEAVY {','.join(heavy) or '-'}", file=sys.stderr)
"""

TOOLS = sorted(p.name for p in (ROOT / "tools").glob("*.py") if p.name != "gpu_check_parts.py")
# (command, an argument error) per command; the error must be caught by the parser (exit 2).
BAD_ARGUMENTS = {"eval.py": ["ck.pth", "--topk", "0"], "infer.py": ["ck.pth"], "train.py": ["--experiment", "demo"],
                 "convert.py": ["a.pth", "b.pth"], "export.py": ["ck.pth", "--height", "x"],
                 "visualize.py": ["nothing"], "check_dataset.py": ["--nope"],
                 "convert_dataset.py": ["voc/"]}


def probe(command: str, *args: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, command, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("STATUS "), done.stderr[-2000:]
    _, status, _, heavy = line.split()
    return int(status), heavy


@pytest.mark.parametrize("tool", TOOLS)
def test_help_does_not_import_torch(tool):
    status, heavy = probe(f"tools/{tool}", "--help")
    assert (status, heavy) == (0, "-"), f"tools/{tool} --help imported {heavy} (exit {status})"


@pytest.mark.parametrize("tool", sorted(BAD_ARGUMENTS))
def test_argument_errors_do_not_import_torch(tool):
    status, heavy = probe(f"tools/{tool}", *BAD_ARGUMENTS[tool])
    assert (status, heavy) == (2, "-"), f"tools/{tool} {BAD_ARGUMENTS[tool]}: exit {status}, imported {heavy}"


def test_the_operator_command_answers_help_without_torch():
    assert probe("-mdetr_deform.ops", "--help") == (0, "-")


def test_train_help_is_the_text_hydra_prints():
    """tools/train.py --help fills configs/config.yaml's help template itself (Hydra's own --help takes
    seconds composing every group); a hydra.* override sends --help through Hydra: the same bytes."""
    ours = subprocess.run([sys.executable, "tools/train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    hydra = subprocess.run([sys.executable, "tools/train.py", "--help", "hydra.verbose=false"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert ours.returncode == hydra.returncode == 0, ours.stderr + hydra.stderr
    assert ours.stdout == hydra.stdout and "Config groups" in ours.stdout and "experiment: " in ours.stdout
