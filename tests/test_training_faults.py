"""Faults during training: NaN losses, SIGTERM + resume, kills and disk-full
during checkpoint writes, torchrun restarts and failing ranks, determinism."""
import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from detr_deform import CheckpointError, read_checkpoint, save_checkpoint
from detr_deform.engine.run_dir import lock_run_dir

from pipeline_helpers import PYTHON, ROOT, free_port, tiny_train_args, train

FAULTS = str(ROOT / "tests" / "scripts" / "train_with_faults.py")
QUICK = ["runtime.max_eval_images=2", "runtime.vis_images=0"]


def env(**faults) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **{k: str(v) for k, v in faults.items()})


def run_faulty(args, timeout=600, **faults) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, FAULTS, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env(**faults))


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]



def wait_for_train_records(process: subprocess.Popen, log: Path, count: int, timeout: float = 300) -> None:
    """Until ``log`` holds ``count`` training records (or the process ended, or the timeout passed)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if log.is_file() and len([line for line in log.read_text().splitlines() if '"train"' in line]) >= count:
            return
        time.sleep(0.05)


def test_nan_loss_stops_with_a_report(tiny_demo_root, tmp_path):
    out = tmp_path / "run"
    done = run_faulty(tiny_train_args(tiny_demo_root, out, *QUICK), FAULT_NAN_AT_STEPS=5)
    assert done.returncode == 2, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("error: non-finite loss/gradient at epoch 1, step 5 (images [")
    assert "loss_giou=nan" in message and "loss_ce=" in message and "runtime.on_nonfinite=skip" in message
    report = json.loads((out / "nonfinite_step5.json").read_text())
    assert report["epoch"] == 1 and report["step"] == 5 and len(report["image_ids"]) == 2
    state = read_checkpoint(out / "checkpoint_last.pth")      # the last good state (end of epoch 0) is kept
    assert state["epoch"] == 0 and state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_loss_skip_mode_drops_the_step_and_is_bounded(tiny_demo_root, tmp_path):
    out = tmp_path / "skip"
    done = run_faulty(tiny_train_args(tiny_demo_root, out, *QUICK, "runtime.on_nonfinite=skip"),
                      FAULT_NAN_AT_STEPS="2,4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in records(out, "nonfinite")] == [2, 4]
    assert "skipped step (2/10)" in done.stdout
    assert not {2, 4} & {r["step"] for r in records(out, "train")}
    state = read_checkpoint(out / "checkpoint_last.pth")
    assert state["nonfinite_skips"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    bounded = run_faulty(tiny_train_args(tiny_demo_root, tmp_path / "bounded", *QUICK, "runtime.on_nonfinite=skip",
                                         "runtime.max_nonfinite_skips=1"), FAULT_NAN_AT_STEPS="2,4")
    assert bounded.returncode == 2
    assert "step 4" in bounded.stderr and "runtime.max_nonfinite_skips=1" in bounded.stderr


def _final_weights(run_dir: Path) -> dict:
    return read_checkpoint(run_dir / "checkpoint_last.pth")["model"]


def test_sigterm_writes_a_checkpoint_and_resume_matches_uninterrupted_run(tiny_demo_root, tmp_path):
    """With gradient accumulation (2 micro-batches of 1 per step): the stop and the resume fall on an
    optimizer-step boundary, and the resumed run equals the uninterrupted one exactly."""
    common = ["runtime.deterministic=true", "optim.epochs=3", "data.num_workers=1", "optim.accumulate_steps=2", *QUICK]
    full = tmp_path / "full"
    done = train(*tiny_train_args(tiny_demo_root, full, *common, batch_size=1))
    assert done.returncode == 0, done.stderr[-3000:]

    part = tmp_path / "part"
    process = subprocess.Popen([PYTHON, FAULTS, *tiny_train_args(tiny_demo_root, part, *common, batch_size=1)],
                               cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(FAULT_SLEEP_S=0.3))
    wait_for_train_records(process, part / "log.jsonl", 4)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "runtime.resume=auto" in stderr
    state = read_checkpoint(part / "checkpoint_last.pth")
    assert 4 <= state["step"] < 9 and state["batches_done"] > 0     # stopped in the middle of an epoch
    assert state["batches_done"] % 2 == 0                            # ... after a whole optimizer step

    done = train(*tiny_train_args(tiny_demo_root, part, *common, "runtime.resume=auto", batch_size=1))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"batch {state['batches_done']}" in done.stdout
    full_losses = {r["step"]: r["loss"] for r in records(full, "train")}
    part_losses = {r["step"]: r["loss"] for r in records(part, "train")}
    assert part_losses == full_losses
    a, b = _final_weights(full), _final_weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_new_run_refuses_to_overwrite_an_existing_run(tiny_demo_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint_last.pth").write_bytes(b"precious")
    done = train(*tiny_train_args(tiny_demo_root, out))
    assert done.returncode == 2 and "already holds a run" in done.stderr
    assert (out / "checkpoint_last.pth").read_bytes() == b"precious"


KILLED_WRITER = """
import sys, time, torch
sys.path.insert(0, {root!r})
from detr_deform import save_checkpoint
from detr_deform.models.config import ModelConfig
model = torch.nn.Linear(4, 4)
real_save = torch.save
def slow_save(obj, handle, *a, **k):
    handle.write(b"PK" + bytes(1000)); handle.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = slow_save
save_checkpoint({path!r}, model, ModelConfig(num_classes=3), note="second")
"""


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    from detr_deform.models.config import ModelConfig

    path = tmp_path / "checkpoint_last.pth"
    save_checkpoint(path, torch.nn.Linear(4, 4), ModelConfig(num_classes=3), note="first")
    writer = subprocess.Popen([PYTHON, "-c", KILLED_WRITER.format(root=str(ROOT), path=str(path))],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()
    writer.wait(timeout=60)
    assert read_checkpoint(path)["note"] == "first"
    leftovers = list(tmp_path.glob(".checkpoint_last.pth.*.tmp"))
    assert len(leftovers) == 1
    lock = lock_run_dir(tmp_path, str(tmp_path))       # only the directory's owner removes temporaries
    assert lock.remove_stale_temporaries() == leftovers and not leftovers[0].exists()
    lock.release()
    assert path.exists()
    with pytest.raises(RuntimeError, match="needs the lock"):
        lock.remove_stale_temporaries()


def test_disk_full_during_save_is_a_clear_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    from detr_deform.models.config import ModelConfig

    path = tmp_path / "checkpoint_last.pth"
    save_checkpoint(path, torch.nn.Linear(4, 4), ModelConfig(num_classes=3), note="first")

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*No space left.*previous checkpoint"):
        save_checkpoint(path, torch.nn.Linear(4, 4), ModelConfig(num_classes=3), note="second")
    monkeypatch.undo()
    assert read_checkpoint(path)["note"] == "first"
    assert list(tmp_path.iterdir()) == [path]


def torchrun(args, nproc: int, max_restarts: int, timeout=600, rdzv: str = "static", **faults):
    port = free_port()
    where = (["--master_addr=127.0.0.1", f"--master_port={port}"] if rdzv == "static" else
             ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"])
    cmd = [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
           *where, FAULTS, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env(**faults))


@pytest.mark.parametrize("nproc, rdzv", [(2, "static"), (2, "c10d")])
def test_torchrun_restart_resumes_from_the_latest_checkpoint(tiny_demo_root, tmp_path, nproc, rdzv):
    """A worker dies (rank 1 of 2: the other one is stopped by the agent); torchrun --max-restarts
    starts all workers again, and they rejoin (a fresh store namespace per attempt) and resume."""
    out = tmp_path / "run"
    done = torchrun(tiny_train_args(tiny_demo_root, out, *QUICK, "optim.epochs=3", "runtime.dist_timeout_s=120",
                                    batch_size=2 if nproc == 1 else 1),
                    nproc=nproc, max_restarts=1, rdzv=rdzv, timeout=300, FAULT_CRASH_AT_STEP=5,
                    FAULT_CRASH_ONCE=1, FAULT_CRASH_RANK=nproc - 1)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"injected crash at step 5 on rank {nproc - 1}" in done.stdout
    assert "resumed from" in done.stdout and "at epoch 1 (step 3)" in done.stdout
    state = read_checkpoint(out / "checkpoint_last.pth")
    assert state["epoch"] == 2 and state["step"] == 9


def test_a_failing_rank_ends_the_whole_job(tiny_demo_root, tmp_path):
    done = torchrun(tiny_train_args(tiny_demo_root, tmp_path / "run", *QUICK), nproc=2, max_restarts=0,
                    timeout=300, FAULT_CRASH_AT_STEP=2, FAULT_CRASH_RANK=1)
    assert done.returncode != 0
    assert "injected crash at step 2 on rank 1" in done.stdout
    assert "ChildFailedError" in done.stderr or "failed" in done.stderr.lower()


def test_deterministic_runs_are_bitwise_identical(tiny_demo_root, tmp_path):
    args = ["runtime.deterministic=true", "data.num_workers=2", "optim.epochs=1", "runtime.max_steps_per_epoch=5",
            *QUICK]
    runs = []
    for name in ("a", "b"):
        done = train(*tiny_train_args(tiny_demo_root, tmp_path / name, *args))
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append([(r["step"], r["loss"], r["loss_ce"], r["grad_norm"]) for r in records(tmp_path / name, "train")])
    assert len(runs[0]) == 5 and runs[0] == runs[1]


def test_sigterm_to_the_launcher_exits_143_with_checkpoints(tiny_demo_root, tmp_path):
    """torchrun itself exits 1 when its job is stopped by SIGTERM; python -m detr_deform.launch (same
    arguments) exits 128 + 15 after the workers wrote their mid-epoch checkpoint."""
    out = tmp_path / "run"
    cmd = [PYTHON, "-m", "detr_deform.launch", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", FAULTS, *tiny_train_args(tiny_demo_root, out, *QUICK, "optim.epochs=3",
                                                           batch_size=1)]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env(FAULT_SLEEP_S=0.5))
    wait_for_train_records(process, out / "log.jsonl", 2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-3000:]
    assert "launch: stopped by SIGTERM" in stderr
    state = read_checkpoint(out / "checkpoint_last.pth")
    assert state["batches_done"] > 0 and state["step"] >= 2
