"""What a run makes of a DataLoader worker that stalls or dies, and of running out
of memory: one line each, instead of torch's multi-line tracebacks.

- A worker that delivers no batch within ``data.worker_timeout_s`` (stopped with
  SIGSTOP, stuck on a dead network mount) raises ``WorkerStalled``; the loop turns
  it into a resumable stop (checkpoint of the position, exit 3).
- A worker killed by a signal (SIGKILL from the kernel's OOM killer, most often)
  or exiting on its own: ``describe_worker_death`` names the worker, the signal and
  the likely cause.
- ``describe_out_of_memory`` names the allocation that failed and what to lower.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from collections.abc import Iterable, Iterator

_TIMED_OUT = re.compile(r"DataLoader timed out after (\S+) seconds")
_KILLED = re.compile(r"DataLoader worker \(pid (\d+)\) is killed by signal: ([^.\n]+)")
_EXITED = re.compile(r"DataLoader worker \(pid (\d+)\) exited unexpectedly with exit code (-?\d+)")
_EXITED_SOME = re.compile(r"DataLoader worker \(pid\(s\) ([\d, ]+)\) exited unexpectedly")
_CPU_ALLOC = re.compile(r"you tried to allocate (\d+) bytes")
_CUDA_ALLOC = re.compile(r"Tried to allocate ([\d.]+ [KMGT]i?B)")


class WorkerStalled(RuntimeError):
    """No batch from the DataLoader's workers within its timeout (``data.worker_timeout_s``)."""


class _Alarm(Exception):
    """SIGALRM of the watchdog: no batch within the timeout."""


class WorkerWatch:
    """Iterates a DataLoader (``split`` names it in messages) and keeps the pids of
    its worker processes, so that a failure can name the worker. No batch within the
    loader's ``timeout`` (``data.worker_timeout_s``) becomes ``WorkerStalled`` after
    the workers are shut down — a stopped worker is killed, else the interpreter
    would wait for it forever at exit.

    The DataLoader's own timeout only covers the wait on its queue: a batch whose
    tensors come as file descriptors is received from the worker itself, and a
    stopped worker blocks that forever. So in the main thread a SIGALRM watchdog
    (``signal.setitimer``) bounds the whole fetch; the loader's timeout remains for
    other threads."""

    def __init__(self, loader: Iterable, split: str) -> None:
        self.loader = loader
        self.split = split
        self.pids: list[int] = []
        workers = getattr(loader, "num_workers", 0) or 0
        self.timeout_s = float(getattr(loader, "timeout", 0) or 0) if workers > 0 else 0.0

    def __iter__(self) -> Iterator:
        iterator = iter(self.loader)
        workers = list(getattr(iterator, "_workers", []))  # multiprocessing.Process objects (torch internals)
        self.pids = [w.pid for w in workers]
        while True:
            try:
                with _watchdog(self.timeout_s):
                    batch = next(iterator)
            except StopIteration:
                return
            except (RuntimeError, _Alarm) as error:
                if isinstance(error, WorkerStalled) or not (isinstance(error, _Alarm) or _TIMED_OUT.search(str(error))):
                    raise
                _shut_down(iterator, workers)
                raise WorkerStalled(f"a stalled DataLoader worker ({self.split} data, worker pid(s) "
                                    f"{', '.join(map(str, self.pids))}: no batch within data.worker_timeout_s="
                                    f"{self.timeout_s:g} s; a stopped process or one stuck in I/O, e.g. on a "
                                    f"network mount)") from None
            yield batch

    def worker_of(self, pid: int) -> str:
        """'worker 1 of 2 (pid 123)' for a pid of this loader's workers, else 'a worker (pid 123)'."""
        if pid in self.pids:
            return f"worker {self.pids.index(pid)} of {len(self.pids)} (pid {pid})"
        return f"a worker (pid {pid})"


@contextlib.contextmanager
def _watchdog(seconds: float) -> Iterator[None]:
    """Raises _Alarm in the main thread after ``seconds`` (0, or another thread: nothing)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    def ring(signum, frame):
        raise _Alarm()
    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _shut_down(iterator, workers: list) -> None:
    """torch's own shutdown (which stops watching the workers' exit), then SIGKILL for
    any worker still there: a SIGSTOPped process never acts on the SIGTERM it got."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:
        if worker.is_alive():
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            worker.join(timeout=10)


def _signal_name(description: str) -> str:
    """'SIGKILL' for strsignal's 'Killed' (the text torch puts in its message)."""
    for candidate in signal.Signals:
        if signal.strsignal(candidate) == description.strip():
            return candidate.name
    return description.strip()


def describe_worker_death(error: BaseException, watch: WorkerWatch | None) -> str | None:
    """One line for a DataLoader worker that died (None when ``error`` is something else)."""
    text = str(error)
    split = f"{watch.split} data" if watch is not None else "data"
    name = (lambda pid: watch.worker_of(pid)) if watch is not None else (lambda pid: f"a worker (pid {pid})")
    killed = _KILLED.search(text)
    if killed:
        signame = _signal_name(killed.group(2))
        cause = ("most likely the kernel's out-of-memory killer (see `dmesg`): lower data.num_workers, "
                 "optim.batch_size or the image sizes" if signame == "SIGKILL" else
                 "the machine's shared memory (/dev/shm) is probably full: raise it or lower data.num_workers"
                 if signame == "SIGBUS" else "something outside the run sent it")
        return f"DataLoader {name(int(killed.group(1)))} ({split}) was killed by signal {signame}; {cause}"
    exited = _EXITED.search(text)
    if exited:
        return (f"DataLoader {name(int(exited.group(1)))} ({split}) exited unexpectedly with exit code "
                f"{exited.group(2)}; rerun with data.num_workers=0 to see the error in the main process")
    some = _EXITED_SOME.search(text)
    if some:
        pids = [int(p) for p in some.group(1).split(",") if p.strip()]
        return (f"DataLoader {', '.join(name(p) for p in pids)} ({split}) exited unexpectedly (killed, most "
                f"likely for memory: see `dmesg`); lower data.num_workers, optim.batch_size or the image sizes")
    return None


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA/MPS) or the CPU allocator's "can't allocate memory"."""
    text = str(error)
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "out of memory" in text.lower().split("\n")[0])


def failed_allocation(error: BaseException) -> str:
    """'an allocation of 4.00 GiB' from the error text (CPU or CUDA message), or 'an allocation'."""
    text = str(error)
    cpu = _CPU_ALLOC.search(text)
    if cpu:
        return f"an allocation of {_human_bytes(int(cpu.group(1)))}"
    cuda = _CUDA_ALLOC.search(text)
    if cuda:
        return f"an allocation of {cuda.group(1)}"
    return "an allocation"


def describe_out_of_memory(error: BaseException, batch_size: int, accumulate_steps: int,
                           where: str) -> str:
    """One line: where (e.g. 'epoch 0, step 5'), the batch, the failed allocation, what to lower."""
    device = "GPU" if type(error).__name__ == "OutOfMemoryError" else "CPU"
    keep = (f"optim.accumulate_steps={accumulate_steps * 2} with half the batch keeps the effective batch of "
            f"{batch_size * accumulate_steps}" if batch_size > 1 else
            "optim.accumulate_steps does not lower the memory of one micro-batch")
    return (f"out of memory ({device}) at {where} with optim.batch_size={batch_size} per process: "
            f"{failed_allocation(error)} failed. Lower optim.batch_size ({keep}) or the image sizes "
            f"(data.train_scales, data.max_size)")


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.2f} {unit}" if unit != "B" else f"{count} B"
        value /= 1024
    return f"{count} B"


def describe_runtime_failure(error: BaseException) -> tuple[str, int] | None:
    """(one line, exit code) for a dead or stalled worker or an out-of-memory error met
    outside the training steps (e.g. during evaluation); None for anything else."""
    if isinstance(error, WorkerStalled) or _TIMED_OUT.search(str(error)):
        text = str(error) if isinstance(error, WorkerStalled) else f"a stalled DataLoader worker ({error})"
        return f"stopped by {text}; continue with runtime.resume=auto", 3
    died = describe_worker_death(error, None)
    if died is not None:
        return died, 1
    if is_out_of_memory(error):
        return (f"out of memory: {failed_allocation(error)} failed ({str(error).splitlines()[0][:200]}); lower "
                f"optim.batch_size or the image sizes (data.val_size, data.max_size)"), 1
    return None
