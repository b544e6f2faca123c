"""DataLoader workers that stall (SIGSTOP) or die (SIGKILL), and out-of-memory errors,
in real training processes: one line each, the table's exit code, checkpoints kept."""
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from detr_deform import read_checkpoint
from detr_deform.engine import loader_faults

from pipeline_helpers import PYTHON, ROOT, tiny_train_args

FAULTS = str(ROOT / "tests" / "scripts" / "train_with_faults.py")
QUICK = ["runtime.max_eval_images=2", "runtime.vis_images=0"]


def env(**faults) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **{k: str(v) for k, v in faults.items()})


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def forked_workers(pid: int) -> list[int]:
    """DataLoader workers of ``pid``: its forked children (same command line; not e.g. a resource tracker)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    workers = []
    for child in children(pid):
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes() == command:
                workers.append(child)
        except OSError:
            continue
    return workers


def wait_until(condition, process: subprocess.Popen, timeout: float = 300):
    """Polls ``condition()`` until it returns something truthy (returned), the process ends or the timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met (process returned {process.poll()})")


def train_records(log: Path, epoch: int | None = None) -> int:
    if not log.is_file():
        return 0
    lines = [line for line in log.read_text().splitlines() if line.startswith('{"type": "train"')]
    return len([line for line in lines if epoch is None or f'"epoch": {epoch}' in line])


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _release(pids: list[int]) -> None:
    """Test cleanup: processes this test stopped are killed (they are children of the run it started)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_stopped_worker_ends_the_run_resumable_with_exit_3(tiny_demo_root, tmp_path):
    out = tmp_path / "run"
    args = tiny_train_args(tiny_demo_root, out, *QUICK, "data.num_workers=1", "data.worker_timeout_s=3",
                           "optim.epochs=1", "runtime.max_steps_per_epoch=null", batch_size=1)
    process = subprocess.Popen([PYTHON, FAULTS, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env(FAULT_SLEEP_S=0.1))
    stopped: list[int] = []
    try:
        wait_until(lambda: train_records(out / "log.jsonl") >= 1, process)
        stopped = wait_until(lambda: forked_workers(process.pid), process)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        _, stderr = process.communicate(timeout=300)
    finally:
        _release(stopped)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 3, stderr[-3000:]
    message = last_line(stderr)
    assert message.startswith("stopped by a stalled DataLoader worker (training data, worker pid(s) "
                              f"{stopped[0]}: no batch within data.worker_timeout_s=3 s"), message
    assert "checkpoint written to" in message and "runtime.resume=auto" in message
    assert "Traceback" not in stderr
    state = read_checkpoint(out / "checkpoint_last.pth")   # the position, at a step boundary
    assert state["epoch"] == 0 and 1 <= state["step"] < 12 and state["batches_done"] == state["step"]


def test_a_killed_worker_is_one_line_naming_it_and_the_last_checkpoint(tiny_demo_root, tmp_path):
    out = tmp_path / "run"
    args = tiny_train_args(tiny_demo_root, out, *QUICK, "data.num_workers=2", "runtime.max_steps_per_epoch=6",
                           batch_size=1)
    process = subprocess.Popen([PYTHON, FAULTS, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env(FAULT_SLEEP_S=0.5))
    try:
        wait_until(lambda: train_records(out / "log.jsonl", epoch=1) >= 1, process)   # after epoch 0's checkpoint
        before = (out / "checkpoint_last.pth").read_bytes()
        workers = wait_until(lambda: forked_workers(process.pid), process)
        os.kill(workers[-1], signal.SIGKILL)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr[-3000:]
    message = last_line(stderr)
    assert message.startswith("error: DataLoader worker "), message
    assert f"(pid {workers[-1]}) (training data) was killed by signal SIGKILL" in message
    assert "out-of-memory killer" in message and "at epoch 1, step" in message
    assert f"{out / 'checkpoint_last.pth'}, is untouched" in message and "runtime.resume=auto" in message
    assert "Traceback" not in stderr
    assert (out / "checkpoint_last.pth").read_bytes() == before


def test_out_of_memory_is_one_line_with_what_to_lower(tiny_demo_root, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([PYTHON, FAULTS, *tiny_train_args(tiny_demo_root, out, *QUICK)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env(FAULT_OOM_AT_STEP=5))
    assert done.returncode == 1, done.stderr[-3000:]
    message = last_line(done.stderr)
    assert message.startswith("error: out of memory (CPU) at epoch 1, step 5 with optim.batch_size=2 per process: "
                              "an allocation of 1.00 PiB failed. Lower optim.batch_size (optim.accumulate_steps=2 "
                              "with half the batch keeps the effective batch of 2)"), message
    assert "data.train_scales" in message and "runtime.resume=auto" in message and "is untouched" in message
    assert "Traceback" not in done.stderr
    assert read_checkpoint(out / "checkpoint_last.pth")["step"] == 3     # epoch 0's, not overwritten


def test_worker_and_memory_messages_from_torchs_texts():
    class OutOfMemoryError(RuntimeError):  # the name torch.OutOfMemoryError is recognised by
        pass

    cuda = OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total capacity)")
    assert loader_faults.is_out_of_memory(cuda) and loader_faults.is_out_of_memory(torch.OutOfMemoryError("x"))
    text = loader_faults.describe_out_of_memory(cuda, batch_size=4, accumulate_steps=1, where="epoch 2, step 7")
    assert text.startswith("out of memory (GPU) at epoch 2, step 7 with optim.batch_size=4 per process: an "
                           "allocation of 20.00 MiB failed. Lower optim.batch_size (optim.accumulate_steps=2")
    watch = loader_faults.WorkerWatch([], "training")
    watch.pids = [11, 12]
    bus = RuntimeError("DataLoader worker (pid 12) is killed by signal: Bus error. It is possible that ...")
    assert loader_faults.describe_worker_death(bus, watch).startswith(
        "DataLoader worker 1 of 2 (pid 12) (training data) was killed by signal SIGBUS; the machine's shared memory")
    exited = RuntimeError("DataLoader worker (pid 11) exited unexpectedly with exit code 1. Details are lost")
    assert "worker 0 of 2 (pid 11) (training data) exited unexpectedly with exit code 1" in \
        loader_faults.describe_worker_death(exited, watch)
    assert loader_faults.describe_worker_death(RuntimeError("mat1 and mat2 shapes"), watch) is None
    assert not loader_faults.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_worker_timeout_is_validated():
    from detr_deform.cli.compose import compose_config
    from detr_deform.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.worker_timeout_s=-1 is out of range"):
        compose_config(["data.worker_timeout_s=-1"])
    # Under DDP the stall must be noticed before the other ranks' collective times out: at most half
    # of runtime.dist_timeout_s there (a refusal would break every short runtime.dist_timeout_s).
    from detr_deform.engine.loaders import worker_timeout

    cfg = compose_config(["data.worker_timeout_s=2000", "data.num_workers=2"])
    assert worker_timeout(cfg, 1) == 2000 and worker_timeout(cfg, 2) == 900
    assert worker_timeout(compose_config(["data.num_workers=0"]), 2) == 0
    assert compose_config([]).data.worker_timeout_s == 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((item[5:].decode() for item in environ if item.startswith(b"RANK=")), None)


def test_a_stalled_worker_on_one_rank_stops_every_rank_together(tiny_demo_root, tmp_path):
    """DDP, 2 ranks: the worker of rank 1 is stopped; both ranks stop at the same step boundary, rank 0
    writes the checkpoint, and the launcher exits 3."""
    out = tmp_path / "run"
    args = tiny_train_args(tiny_demo_root, out, *QUICK, "data.num_workers=1", "data.worker_timeout_s=3",
                           "optim.epochs=1", "runtime.max_steps_per_epoch=null", "runtime.dist_timeout_s=120",
                           batch_size=1)
    cmd = [PYTHON, "-m", "detr_deform.launch", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", FAULTS, *args]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env(FAULT_SLEEP_S=0.1))
    stopped: list[int] = []

    def rank1_workers():
        ranks = [pid for pid in children(process.pid) if _rank_of(pid) == "1"]
        return forked_workers(ranks[0]) if ranks else []

    try:
        wait_until(lambda: train_records(out / "log.jsonl") >= 1, process)
        stopped = wait_until(rank1_workers, process)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        _release(stopped)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 3, stdout[-2000:] + stderr[-3000:]
    # Rank 0 learns of the stall from rank 1 and says so; rank 1's own line may be cut short when the
    # agent SIGTERMs it once rank 0 has exited (the launcher's 3 covers both endings).
    assert "stopped by a stalled DataLoader worker on another rank" in stderr         # rank 0
    state = read_checkpoint(out / "checkpoint_last.pth")
    assert state["epoch"] == 0 and state["batches_done"] == state["step"] >= 1
