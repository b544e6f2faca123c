import os

import pytest
import torch

# Tests must never reach the network (no pretrained downloads, no hubs).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory):
    """A small copy of the built-in demo dataset (12 train / 7 val images)."""
    from detr_deform.data.demo import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp("data") / "demo", sizes={"train": 12, "val": 7})


@pytest.fixture(scope="session")
def trained_run(tiny_demo_root, tmp_path_factory):
    """A tiny model trained for 2 x 3 steps of batch 3 on the tiny demo data by tools/train.py:
    (run directory, completed process). Batch 3, not eval.py's fallback of 2, so that
    test_eval_reproduces_training_ap checks that eval.py batches images as training's evaluation did."""
    from pipeline_helpers import tiny_train_args, train

    out = tmp_path_factory.mktemp("run")
    done = train(*tiny_train_args(tiny_demo_root, out, batch_size=3))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done
