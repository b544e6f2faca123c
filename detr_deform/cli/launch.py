"""``python -m detr_deform.launch``: torchrun (same arguments) with the shell's
exit status when the job is stopped by a signal.

torchrun exits 1 both when a worker fails and when the job was stopped by
SIGTERM/SIGINT after the workers wrote their checkpoints (pre-emption), so a
scheduler cannot tell the two apart. This wrapper exits 128 + the signal number
(143 for SIGTERM, 130 for Ctrl-C) in the second case, as ``tools/train.py`` does
on its own, 3 when the ranks stopped for a stalled DataLoader worker (data.worker_timeout_s),
and keeps torchrun's status otherwise::

    python -m detr_deform.launch --nproc_per_node=8 tools/train.py experiment=two_stage data.root=/data/coco
"""
from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

STOPPED = {128 + signal.SIGTERM, 128 + signal.SIGINT}  # a worker that wrote its checkpoint and exited
STALLED = 3  # stopped by a stalled DataLoader worker after writing a checkpoint (resumable)


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun_main(argv)
    except SignalException as stop:
        name = signal.Signals(stop.sigval).name
        print(f"launch: stopped by {name}; the workers were asked to write their checkpoints (resume with "
              f"runtime.resume=auto)", file=sys.stderr)
        return 128 + int(stop.sigval)
    except ChildFailedError as failed:
        codes = {failure.exitcode for failure in failed.failures.values()}
        # Ranks stopped together for a stalled worker: the agent may SIGTERM the others meanwhile, which
        # then end with 143 (their handler ran) or -15 (killed before it could).
        if codes <= STOPPED | {STALLED, -signal.SIGTERM} and codes & (STOPPED | {STALLED}):
            return STALLED if STALLED in codes else max(codes)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
