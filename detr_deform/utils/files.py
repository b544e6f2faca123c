"""Writing the run's own files (logs, configs, reports, results): atomically
where a file is replaced, and every failure as one ``OutputError`` that names
the path and what the OS said (e.g. ``[Errno 28] No space left on device``)."""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

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


def append_line(path: str | os.PathLike, line: str) -> Path:
    """Appends one line to ``path`` (created if missing), flushed to the OS at once."""
    path = Path(path)
    with writing(path), open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
    return path


class OutputIsInputError(DetrDeformError, ValueError):
    """An output path is one of the command's inputs (the same file under another name:
    a symlink, a hard link, ``./`` or ``..`` aliases); refused before anything is written."""


def refuse_outputs_onto_inputs(outputs: dict[str, str | os.PathLike | None],
                               inputs: dict[str, str | os.PathLike | None]) -> None:
    """The one guard every tool uses: raises OutputIsInputError when an output (``{what: path}``,
    e.g. ``{"--output": ...}``) resolves to an input (``{what: path}``; a folder stands for the
    files in it, as a Hugging Face checkpoint folder), comparing device and inode (os.path.samefile)."""
    candidates = []
    for what, path in inputs.items():
        if path is None:
            continue
        path = Path(path)
        candidates.append((what, path))
        if path.is_dir():
            candidates.extend((f"a file of {what}", child) for child in sorted(path.iterdir()) if child.is_file())
    for out_what, out in outputs.items():
        if out is None or not Path(out).exists():
            continue  # a file still to be created cannot be an input
        for in_what, path in candidates:
            if same_file(out, path):
                alias = "" if os.path.abspath(out) == os.path.abspath(path) else f" (the same file as {path})"
                raise OutputIsInputError(
                    f"{out_what} {out} is {in_what}{alias}, an input of this command: writing it would destroy "
                    f"the input; choose another output path (nothing was written)")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are one file (device and inode: symlinks, hard links and
    path aliases count); False when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


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
