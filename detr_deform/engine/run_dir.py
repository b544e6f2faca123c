"""One live run per run directory.

A run directory is owned by the run that holds ``run.lock`` in it: an OS lock
(``fcntl.flock``) taken by rank 0, which the kernel releases when the process
ends in any way (a SIGKILL or a lost node never leaves a stale lock). Under the
lock, and only under it, the owner creates the directory's files, removes the
temporaries that killed writes left, and decides whether the directory may take
a new run. New directories are created with an exclusive ``mkdir`` (a suffix on
collision), so two runs started in the same second never share one.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from detr_deform.config import ConfigError
from detr_deform.utils.files import writing

LOCK_NAME = "run.lock"
# Files that only a run writes: a directory holding one of them (or any checkpoint) holds a run.
RUN_FILES = ("config.yaml", "log.jsonl", "resumes.jsonl", "metrics.json")

_HELD: dict[int, RunLock] = {}  # fd -> lock, for the fork hook below


def _close_in_child() -> None:
    # A forked child (a DataLoader worker) must not keep the lock alive after the run
    # itself has died: flock belongs to the open file, which the child shares.
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunDirectoryBusy(ConfigError):
    """Another live run holds the run directory's lock (exit status 2, nothing touched)."""


class RunLock:
    """The lock of ``run_dir`` while this process holds it. ``created_dir`` /
    ``created_file``: whether taking it created the directory / the lock file
    (``release(abandon=True)`` then removes them again when no run file was written)."""

    def __init__(self, run_dir: Path, fd: int, created_dir: bool, created_file: bool) -> None:
        self.run_dir = run_dir
        self.fd: int | None = fd
        self.created_dir = created_dir
        self.created_file = created_file
        _HELD[fd] = self

    @property
    def held(self) -> bool:
        return self.fd is not None

    def remove_stale_temporaries(self) -> list[Path]:
        """The hidden ``.<name>.<random>.tmp`` files that killed atomic writes (checkpoints,
        config, results) left behind. Only the lock's holder may do this: a live run's
        temporary is the checkpoint it is writing right now."""
        if not self.held:
            raise RuntimeError(f"remove_stale_temporaries needs the lock of {self.run_dir}")
        stale = sorted(p for p in self.run_dir.glob(".*.tmp") if p.is_file())
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def release(self, abandon: bool = False) -> None:
        """Releases the lock. ``abandon``: the run ended before writing any file here;
        the lock file (and the directory, if taking the lock created it) is removed."""
        if self.fd is None:
            return
        if abandon and not run_files(self.run_dir):
            if self.created_file:
                (self.run_dir / LOCK_NAME).unlink(missing_ok=True)
            if self.created_dir:
                try:
                    self.run_dir.rmdir()
                except OSError:  # something else appeared in it: leave it
                    pass
        _HELD.pop(self.fd, None)
        os.close(self.fd)
        self.fd = None


def run_files(run_dir: Path) -> list[str]:
    """The names of the run files in ``run_dir`` (config, logs, metrics, any checkpoint)."""
    if not run_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    return found + sorted(p.name for p in run_dir.glob("*.pth"))


def lock_run_dir(run_dir: Path, what: str, created_dir: bool = False) -> RunLock:
    """Takes the lock of the existing directory ``run_dir`` without waiting; RunDirectoryBusy
    naming the live run (PID, host, start time) when another process holds it. ``what``
    names the directory in messages (e.g. ``runtime.output_dir=/x``)."""
    path = run_dir / LOCK_NAME
    while True:
        fd, created = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            raise RunDirectoryBusy(
                f"{what} is in use by a live run ({_holder(path)}): two runs in one directory would mix their logs "
                f"and overwrite each other's checkpoints. Wait for that run to end (or stop it), or choose another "
                f"runtime.output_dir; nothing was touched") from None
        # The holder before us may have removed the file (an abandoned new directory):
        # then the lock is on a deleted file and protects nothing; take a fresh one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    with writing(path):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_identity()).encode(), 0)
    return RunLock(run_dir, fd, created_dir, created)


def _open_lock_file(path: Path) -> tuple[int, bool]:
    with writing(path):
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), True
        except FileExistsError:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC), False


def _identity() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()), "command": sys.argv}


def _holder(path: Path) -> str:
    try:
        who = json.loads(path.read_text(encoding="utf-8"))
        return f"PID {who['pid']} on host {who['host']}, started {who['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # it is writing them at this very moment
        return f"its details are not yet written to {path}"


def create_run_dir(base: Path, name: str, attempts: int = 1000) -> Path:
    """``base/name`` created by this process alone (an exclusive mkdir); when another run
    took that name (started in the same second), ``name-2``, ``name-3``, ..."""
    with writing(base):
        base.mkdir(parents=True, exist_ok=True)
        for index in range(1, attempts + 1):
            candidate = base / (name if index == 1 else f"{name}-{index}")
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
    raise ConfigError(f"{base}: {attempts} run directories named {name}*: set runtime.output_dir")
