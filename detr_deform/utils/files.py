"""Writing the run's own files (logs, configs, reports, results): atomically
where a file is replaced, and every failure as one ``OutputError`` that names
the path and what the OS said (e.g. ``[Errno 28] No space left on device``)."""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator
from detr_deform.errors import EXIT_FAILED, DetrDeformError


class OutputError(DetrDeformError, OSError):
    """A file could not be written; the message names the path and the OS error.
    Files written before are left as they were. A failed run (exit status 1)."""

    exit_code = EXIT_FAILED


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """The one way the package replaces a file: yields a temporary path beside ``path`` to write;
    when the block ends normally the temporary gets the usual permissions (0666 minus the umask:
    0644 under the common 022, not the private 0600 of a temporary file), is flushed to disk
    (fsync), renamed over ``path`` in one step and the folder's entry is flushed too. If the block
    or any of these steps fails (a full disk, a kill, Ctrl-C), the temporary is removed and
    ``path`` keeps its previous content. OS errors become one OutputError naming ``path`` and the
    errno."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with writing(path):
            yield tmp
            os.chmod(tmp, 0o666 & ~current_umask())
            _fsync(tmp, os.O_RDONLY)
            os.replace(tmp, path)
            _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``open(path, mode)`` through ``atomic_path``: the file appears complete or not at all."""
    encoding = None if "b" in mode else "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as handle:
        yield handle


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replaces ``path`` with ``text`` atomically (``atomic_open``)."""
    with atomic_open(path) as handle:
        handle.write(text)
    return Path(path)


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as error:  # some file systems cannot fsync a folder; the rename is done
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)
