import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from filelock import FileLock

# Tests must never reach the network (no pretrained downloads, no hubs).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The usual umask, whatever the shell had: tests/test_file_modes.py checks what outputs get under it.
os.umask(0o022)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shared_dir(tmp_path_factory, name: str) -> tuple[Path, FileLock]:
    """A folder shared by every xdist worker of this test session (their base temporary folders
    have one parent) and the lock that builds it once: the first worker builds, the others wait
    on the lock and then read what it left."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    return root / name, FileLock(str(root / f"{name}.lock"))


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory):
    """A small copy of the built-in demo dataset (12 train / 7 val images), made once per session."""
    from detr_deform.data.demo import ensure_demo_dataset

    folder, lock = _shared_dir(tmp_path_factory, "data")
    with lock:
        return ensure_demo_dataset(folder / "demo", sizes={"train": 12, "val": 7})


@pytest.fixture(scope="session")
def trained_run(tiny_demo_root, tmp_path_factory):
    """A tiny model trained for 2 x 3 steps of batch 3 on the tiny demo data by tools/train.py:
    (run directory, completed process), trained once per session whichever worker asks first.
    Batch 3, not eval.py's fallback of 2, so that test_eval_reproduces_training_ap checks that
    eval.py batches images as training's evaluation did. Tests must not change the run directory
    (copy it first)."""
    from pipeline_helpers import tiny_train_args, train

    out, lock = _shared_dir(tmp_path_factory, "trained_run")
    record = out.parent / "trained_run.json"
    with lock:
        if not record.is_file():
            done = train(*tiny_train_args(tiny_demo_root, out, batch_size=3))
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            record.write_text(json.dumps({"args": done.args, "returncode": done.returncode,
                                          "stdout": done.stdout, "stderr": done.stderr}))
        saved = json.loads(record.read_text())
    return out, subprocess.CompletedProcess(saved["args"], saved["returncode"], saved["stdout"], saved["stderr"])


# Marks (pyproject.toml declares them; `python -m pytest -q` runs everything, `-m "not slow"` is the
# quick loop). Given per module from measured durations (docs/benchmarks.md, "Test suite"): these
# modules train or evaluate through tools/*.py in new interpreters and take most of the suite's time.
SLOW_MODULES = {
    "test_training_features", "test_robustness", "test_training_faults", "test_lost_work", "test_tools",
    "test_data_robustness", "test_gpu_check", "test_overfit", "test_train_pipeline", "test_loader_faults",
    "test_input_limits", "test_config", "test_kernel_report", "test_hf", "test_newcomer", "test_distributed_step",
    "test_file_modes", "test_custom_datasets",
}
# Modules that run a tool or a launcher in a new interpreter (some of their tests only).
SUBPROCESS_MODULES = SLOW_MODULES - {"test_overfit"} | {
    "test_convert", "test_dat", "test_ops_build", "test_video", "test_ms_deform_attn_sizes", "test_tool_startup",
    "test_hub"}
# Modules whose tests (those naming torchrun / DDP / ranks / nodes) form a torch.distributed group.
DISTRIBUTED_MODULES = {"test_distributed_step", "test_loader_faults", "test_lost_work", "test_train_pipeline",
                       "test_training_faults", "test_hub"}
DISTRIBUTED_WORDS = ("ddp", "torchrun", "distributed", "rank", "node", "launcher")


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if module in SUBPROCESS_MODULES:
            item.add_marker(pytest.mark.subprocess)
        if module in DISTRIBUTED_MODULES and any(word in item.name.lower() for word in DISTRIBUTED_WORDS):
            item.add_marker(pytest.mark.distributed)
