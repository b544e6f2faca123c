"""Writing the run's own files (logs, configs, reports, results): atomically
where a file is replaced, and every failure as one ``OutputError`` that names
the path and what the OS said (e.g. ``[Errno 28] No space left on device``)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


class OutputError(OSError):
    """A file could not be written; the message names the path and the OS error.
    Files written before are left as they were."""


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turns an OSError raised inside the block into an OutputError naming ``path``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as error:
        # "[Errno 28] No space left on device", without the file name the OS error repeats
        reason = f"[Errno {error.errno}] {error.strerror}" if error.strerror else str(error)
        raise OutputError(f"could not write {path}: {reason}") from error


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replaces ``path`` with ``text`` atomically (a temporary file, then rename), so
    a full disk or a kill leaves the previous content; usual permissions."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            mask = os.umask(0o022)
            os.umask(mask)
            os.fchmod(fd, 0o666 & ~mask)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


LATEST = "latest"


def update_latest_link(run_dir: str | os.PathLike) -> Path:
    """Points ``<run_dir>/../latest`` at ``run_dir`` (a relative symlink), atomically:
    a symlink under a temporary name, then ``os.replace`` over the old one, so that
    ``runs/<experiment>/latest`` always names a run directory that exists, never a
    half-made link. Returns the link; OutputError when it cannot be made."""
    run_dir = Path(run_dir)
    link = run_dir.parent / LATEST
    with writing(link):
        tmp = run_dir.parent / f".{LATEST}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)  # left by a process of the same id killed in between
        os.symlink(run_dir.name, tmp, target_is_directory=True)
        try:
            os.replace(tmp, link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return link
