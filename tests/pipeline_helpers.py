"""Shared pieces of the pipeline tests: tiny demo data and tiny-model overrides."""
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

TINY_MODEL = [
    "model.hidden_dim=64", "model.nheads=4", "model.enc_layers=1", "model.dec_layers=2",
    "model.dim_feedforward=64", "model.num_queries=10",
]
# The tiny runs keep the demo's (randomly initialised) ResNet-18 frozen: these runs test the pipeline,
# not learning, and a frozen backbone takes a third off each run (no backward through it, no Adam state
# in the checkpoints). Tests about the backbone's own training pass model.train_backbone=true.
TINY_RUN = [*TINY_MODEL, "model.train_backbone=false"]


def tiny_train_args(data_root: Path, output_dir: Path, *extra: str, batch_size: int = 2) -> list[str]:
    return [
        "experiment=demo", f"data.root={data_root}", f"runtime.output_dir={output_dir}", "data.num_workers=0",
        "data.train_scales=[96]", "data.val_size=96", "data.max_size=128", "data.crop_resize_sizes=[96]",
        "data.crop_min=64", "data.crop_max=96", f"optim.batch_size={batch_size}", "optim.epochs=2",
        "optim.lr_drop=10",
        "runtime.max_steps_per_epoch=3", "runtime.eval_every=1", "runtime.log_every=1", "runtime.vis_images=1",
        *TINY_RUN, *extra,
    ]


def free_port() -> int:
    """A TCP port free now, chosen by the OS (no fixed port: two test runs on one machine must not
    collide). Another process could take it before the launcher binds it; the window is a few ms."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def train(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run([PYTHON, "tools/train.py", *args], timeout=timeout)
