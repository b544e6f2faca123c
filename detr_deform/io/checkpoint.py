"""Checkpoint files: safe reading, atomic writing. Knows nothing about models
(:mod:`detr_deform.loading.model` builds models from what is read here).

Every file is read with ``torch.load(weights_only=True)``; the only non-tensor
classes allowed are ``argparse.Namespace`` (the ``args`` of official Deformable
DETR files) and ``yacs.config.CfgNode`` (the ``config`` of official DAT files),
which is read as an OrderedDict without importing yacs. A
file that pickles anything else is refused and no code from it runs.

Formats:
- ours: ``{"format": "detr_deform", "version": 1, "model": state_dict, "config": {"model": {...}, ...}, ...}``
- official: ``{"model": state_dict, "args": argparse.Namespace, ...}``
"""
from __future__ import annotations

import argparse
import collections
import errno
import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from detr_deform.errors import EXIT_FAILED, DetrDeformError
from detr_deform.utils.files import OutputError, atomic_path

FORMAT = "detr_deform"
VERSION = 1

# yacs.config.CfgNode (the ``config`` of official DAT files) is read as an
# OrderedDict: the weights-only unpickler can fill it and its attributes, and no
# yacs code runs (nor needs to be installed).
SAFE_GLOBALS = [argparse.Namespace, (collections.OrderedDict, "yacs.config.CfgNode")]


class CheckpointError(DetrDeformError, RuntimeError):
    """A checkpoint file cannot be used; the message names the file and the fix."""


ZIP_MAGIC = b"PK\x03\x04"   # torch.save's default format (a zip archive)
PICKLE_MAGIC = b"\x80"        # the legacy torch.save format starts with a pickle protocol marker


def read_checkpoint(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True and the allow-list; one clear CheckpointError
    for anything that is not a readable, intact PyTorch checkpoint (our files' checksums
    are verified, every section; files without one, older or not ours, load as they are)."""
    file = Path(path)
    if file.is_dir():
        raise CheckpointError(f"{file} is a directory, not a checkpoint file: pass the file inside it (e.g. "
                              f"{file / 'checkpoint_best.pth'}), or a Hugging Face folder with its config.json")
    if not file.is_file():
        raise CheckpointError(f"checkpoint not found: {file}")
    _check_format(file)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            content = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower() and "unsupported global" not in str(error).lower():
            raise CheckpointError(f"{file}: not a readable PyTorch checkpoint (truncated or corrupted?): "
                                  f"UnpicklingError: {_first_line(error)}") from error
        raise CheckpointError(
            f"{file}: refused to load: it contains pickled Python objects outside the allow-list "
            f"(tensors, containers, argparse.Namespace, yacs CfgNode). Checkpoints are read with weights_only=True "
            f"so that a "
            f"file cannot run code. If you trust the file, re-save only its state dict. Details: "
            f"{_first_line(error)}"
        ) from error
    except Exception as error:  # a damaged archive or pickle can fail in torch.load in any way
        raise CheckpointError(
            f"{file}: not a readable PyTorch checkpoint (truncated or corrupted?): {type(error).__name__}: "
            f"{_first_line(error)}"
        ) from error
    if not isinstance(content, dict):  # ours, official and state dicts alike are dicts (also: a damaged pickle)
        raise CheckpointError(f"{file}: holds a {type(content).__name__}, not a checkpoint (a dict of sections or "
                              f"a state dict); if it was one, the file was damaged: use a copy of it")
    _verify_checksum(content, file)
    return content


def _check_format(file: Path) -> None:
    try:
        with open(file, "rb") as handle:
            head = handle.read(16)
    except OSError as error:  # no read permission, a device that went away, ...
        raise CheckpointError(f"{file}: cannot be read ({error.strerror or error}); check the file's "
                              f"permissions and that its disk is mounted") from error
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC):
        return
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then JSON
        raise CheckpointError(f"{file}: a safetensors file (Hugging Face): it loads together with the config.json "
                              f"of its folder; pass the folder, or put config.json beside the file")
    kind = "an empty file" if not head else ("a text file" if _is_text(head) else "not a PyTorch checkpoint")
    raise CheckpointError(f"{file}: {kind} (PyTorch checkpoints are zip archives or pickles, this starts with "
                          f"{head[:8]!r}); pass a .pth written by torch.save")


def _is_text(head: bytes) -> bool:
    # The head may end inside a multi-byte character: ignore that one.
    text = head.decode("utf-8", errors="ignore")
    return len(text) >= len(head) // 2 and all(c.isprintable() or c.isspace() for c in text)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def state_dict_of(content: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint's content: ``content["model"]``, or the
    content itself when it is a bare state dict."""
    if isinstance(content, dict) and isinstance(content.get("model"), dict):
        return content["model"]
    if isinstance(content, dict) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return content
    raise CheckpointError(f"{path}: no model weights found (expected a dict with a 'model' state dict)")


def weights_checksum(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: names, dtypes, shapes and bytes, in name order (the
    ``weights_sha256`` of files written before every section was checksummed)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


CHECKSUMS = "checksums"  # the checksum record: a SHA-256 of every other top-level entry of our files
# The record is one string (this prefix + JSON {section: SHA-256}), not a dict: pickle writes a string
# once and refers to it after, so the keys of a dict record would be the very bytes of the section
# names, and one flipped byte in a name would rename the section and its checksum together, unseen.
# In one string the names are stored twice; the prefix also finds a record whose key was damaged.
RECORD_PREFIX = "detr_deform checksums v2 (SHA-256 of each section): "


def content_checksums(content: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of every top-level section of a checkpoint's content (model, optimizer,
    lr_scheduler, scaler, ema, rng, progress, config, ...): one pass over the values,
    each tensor hashed from its own memory (no serialised second copy)."""
    sums = {}
    for key in content:
        if key in (CHECKSUMS, "weights_sha256"):
            continue
        digest = hashlib.sha256()
        _feed(digest, content[key])
        sums[key if isinstance(key, str) else repr(key)] = digest.hexdigest()  # only a damaged file has others
    return dict(sorted(sums.items()))


def _feed(digest: hashlib._Hash, value: Any) -> None:
    """Adds ``value`` to ``digest`` with its type and structure, so that any change to a
    tensor's bytes, dtype or shape, a number, a string or a key changes the digest; the
    same on the object torch.save was given and on what torch.load gives back."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}:".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):  # a tuple may come back as a list: same digest
        digest.update(f"L{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, argparse.Namespace):
        _feed(digest, vars(value))
    else:  # None, bool, int, float, str, bytes: repr round-trips every one exactly
        text = repr(value)
        digest.update(f"S{type(value).__name__}{len(text)}:{text}".encode())


def checksum_record(content: dict[str, Any]) -> str:
    """The ``checksums`` entry written into our files (see RECORD_PREFIX)."""
    return RECORD_PREFIX + json.dumps(content_checksums(content), sort_keys=True)


def _stored_checksums(content: dict[str, Any], file: Path) -> dict[str, str] | None:
    """The {section: SHA-256} stored in ``content``, None for a file written without one."""
    record = content.get(CHECKSUMS)
    if isinstance(record, dict):  # files written before the record became one string (2026-12-03)
        return record
    if record is None:
        renamed = [k for k, v in content.items() if isinstance(v, str) and v.startswith(RECORD_PREFIX)]
        if not renamed:
            return None
        damaged = f"its checksum record is stored under a damaged name ({renamed[0]!r})"
    else:
        try:
            if isinstance(record, str) and record.startswith(RECORD_PREFIX):
                sums = json.loads(record[len(RECORD_PREFIX):])
                if isinstance(sums, dict):
                    return sums
        except ValueError:
            pass
        damaged = "its checksum record is unreadable"
    raise CheckpointError(f"{file}: {damaged}: the file was damaged after it was written (disk, copy or "
                          f"transfer). Use a copy of it, or the run's other checkpoint (checkpoint_last.pth / "
                          f"checkpoint_best.pth)")


def _verify_checksum(content: Any, file: Path) -> None:
    """Every section against the checksum record, whenever there is one (also when the format
    field itself was damaged); older files of ours: the weights against ``weights_sha256``;
    files without either (official, written before checksums existed) load as they are."""
    if not isinstance(content, dict):
        return
    stored = _stored_checksums(content, file)
    if stored is not None:
        actual = content_checksums(content)
        bad = sorted(k for k in actual.keys() | stored.keys() if actual.get(k) != stored.get(k))
    elif content.get("format") == FORMAT and "weights_sha256" in content:
        model = content.get("model")
        bad = [] if isinstance(model, dict) and weights_checksum(model) == content["weights_sha256"] else ["model"]
    else:
        return
    if bad:
        what = "the weights" if bad == ["model"] else f"{len(bad)} section(s) ({', '.join(bad)})"
        raise CheckpointError(f"{file}: {what} do not match the checksum stored when the file was written: the "
                              f"file was damaged afterwards (disk, copy or transfer). Use a copy of it, or the run's "
                              f"other checkpoint (checkpoint_last.pth / checkpoint_best.pth)")


def write_checkpoint(path: str | os.PathLike, content: dict[str, Any]) -> Path:
    """Writes ``content`` through the one atomic writer (``utils.files.atomic_path``: fsync,
    rename), so an interrupted save never replaces a good checkpoint. Our
    format gets a checksum of every section (``checksums``, verified by
    ``read_checkpoint``); the file gets the usual permissions (0666 minus the
    umask), not the private ones of a temporary file."""
    path = Path(path)
    if content.get("format") == FORMAT:
        content = {k: v for k, v in content.items() if k != "weights_sha256"}
        content[CHECKSUMS] = checksum_record(content)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as raw:
            handle = _ErrorRecorder(raw)
            try:
                torch.save(content, handle)
            except RuntimeError as error:
                # torch's zip writer reports a failed write as "enforce fail ... unexpected pos"; say what the OS said.
                if handle.error is not None:
                    raise handle.error from error
                raise
    except (OutputError, RuntimeError) as error:
        # KeyboardInterrupt (a second Ctrl-C) and the like pass: the temporary file is gone, nothing replaced.
        cause = error.__cause__ if isinstance(error, OutputError) and error.__cause__ is not None else error
        previous = "the previous checkpoint there is untouched" if path.exists() else "no file was written"
        full = getattr(cause, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        raise CheckpointError(f"could not write checkpoint {path}: {cause}"
                              f"{' (disk full or quota exceeded?)' if full else ''}; {previous}",
                              exit_code=EXIT_FAILED) from cause
    return path


class _ErrorRecorder:
    """A binary file wrapper that remembers what interrupted a write: the OSError of a
    failed write, or a KeyboardInterrupt (a second Ctrl-C) raised inside it. torch's zip
    writer turns either into "enforce fail ... unexpected pos"; the saver re-raises this."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.error: BaseException | None = None

    def write(self, data) -> int:
        try:
            return self.raw.write(data)
        except BaseException as error:
            self.error = error
            raise

    def flush(self) -> None:
        try:
            self.raw.flush()
        except BaseException as error:
            self.error = error
            raise

    def __getattr__(self, name: str):
        return getattr(self.raw, name)
