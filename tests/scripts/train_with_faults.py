"""tools/train.py with faults injected from environment variables (tests only):

FAULT_NAN_AT_STEPS=3,4   the criterion's loss_giou is NaN at these (1-based) criterion calls
                         (= steps without accumulation)
FAULT_CRASH_AT_STEP=5    the process dies (exit 1) at this step ...
FAULT_CRASH_RANK=1       ... on this rank only (default: every rank)
FAULT_CRASH_ONCE=1       ... only in the first attempt (not after a torchrun restart)
FAULT_SLEEP_S=0.2        sleep after every step (time to send a signal)
FAULT_ANNOUNCE_SLEEP=1   ... printing "fault: sleeping after step N" first (an event a test can wait on)
FAULT_OOM_AT_STEP=5      a real allocation of 1 PiB at this step (the CPU allocator's out-of-memory error)
FAULT_EVAL_FAIL=1        the evaluation raises (after the first epoch's training)
FAULT_LOG_FULL_AT_RECORD=5  writing the 5th log.jsonl record fails with ENOSPC (disk full)
FAULT_DISK_FULL_AT_START=1  the first file the run writes fails with ENOSPC

Arguments are passed to tools/train.py unchanged.
"""
import errno
import os
import runpy
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import detr_deform.engine.loop as loop  # noqa: E402
import detr_deform.engine.run_logger as run_logger  # noqa: E402
import detr_deform.engine.trainer as trainer  # noqa: E402


def _steps(name: str) -> set[int]:
    return {int(s) for s in os.environ.get(name, "").split(",") if s}


NAN_STEPS = _steps("FAULT_NAN_AT_STEPS")
CRASH_STEP = int(os.environ.get("FAULT_CRASH_AT_STEP", "0"))
CRASH_RANK = os.environ.get("FAULT_CRASH_RANK")
CRASH_ONCE = os.environ.get("FAULT_CRASH_ONCE") == "1"
SLEEP_S = float(os.environ.get("FAULT_SLEEP_S", "0"))
calls = {"criterion": 0, "step": 0}
build_criterion = trainer.build_criterion
train_step = loop.accumulated_step


def faulty_criterion(model_cfg):
    criterion = build_criterion(model_cfg)
    forward = criterion.forward

    def corrupted(outputs, targets, **kwargs):
        losses = forward(outputs, targets, **kwargs)
        calls["criterion"] += 1
        if calls["criterion"] in NAN_STEPS:
            losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses

    criterion.forward = corrupted
    return criterion


def faulty_step(*args, **kwargs):
    if calls["step"] + 1 == int(os.environ.get("FAULT_OOM_AT_STEP", "0")):
        torch.empty(1 << 50, dtype=torch.uint8)  # fails in the allocator, as a too large batch would
    result = train_step(*args, **kwargs)
    calls["step"] += 1
    rank_matches = CRASH_RANK is None or os.environ.get("RANK", "0") == CRASH_RANK
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if calls["step"] == CRASH_STEP and rank_matches and (first_attempt or not CRASH_ONCE):
        print(f"injected crash at step {CRASH_STEP} on rank {os.environ.get('RANK', '0')}", flush=True)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a pre-empted node: no cleanup at all
    if SLEEP_S:
        if os.environ.get("FAULT_ANNOUNCE_SLEEP") == "1":
            print(f"fault: sleeping after step {calls['step']}", flush=True)
        time.sleep(SLEEP_S)
    return result


def failing_evaluate(*args, **kwargs):
    raise RuntimeError("injected evaluation failure")


def full_disk_log(open_logs):
    def wrapped(self, *args, **kwargs):
        open_logs(self, *args, **kwargs)
        real_file, writes = self.log_file, {"n": 0}

        class FullAfter:
            def write(self, text):
                writes["n"] += 1
                if writes["n"] >= int(os.environ["FAULT_LOG_FULL_AT_RECORD"]):
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_file.write(text)

            def __getattr__(self, name):
                return getattr(real_file, name)

        self.log_file = FullAfter()
    return wrapped


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


if os.environ.get("FAULT_EVAL_FAIL"):
    trainer.evaluate = failing_evaluate
if os.environ.get("FAULT_LOG_FULL_AT_RECORD"):
    run_logger.RunLogger.open = full_disk_log(run_logger.RunLogger.open)
if os.environ.get("FAULT_DISK_FULL_AT_START"):
    tempfile.mkstemp = no_space
trainer.build_criterion = faulty_criterion
loop.accumulated_step = faulty_step
torch.manual_seed(0)
sys.argv = [str(ROOT / "tools" / "train.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "tools" / "train.py"), run_name="__main__")
