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


def append_line(path: str | os.PathLike, line: str) -> Path:
    """Appends one line to ``path`` (created if missing), flushed to the OS at once."""
    path = Path(path)
    with writing(path), open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
    return path


class OutputIsInputError(ValueError):
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
