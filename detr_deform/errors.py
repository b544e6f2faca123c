"""One error family and one exit-code table for every tool.

Every error the package raises on purpose derives from ``DetrDeformError``; its message is the one
line a user sees (it names the file / key / value and the fix). Each class keeps a builtin base
(``ConfigError`` is still a ``ValueError``, ``OutputError`` an ``OSError``, ...) so that code
catching those keeps working. ``run_tool`` is the one ``main()`` wrapper: it turns what a tool's
body raised into one ``error: ...`` line on stderr and the table's exit status, so no tool has an
``except`` ladder of its own.

This module imports nothing of the package: it is the bottom layer, below ``utils/``.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

# The exit-code table (docs/tools.md, every tool's --help).
EXIT_DONE = 0
EXIT_FAILED = 1  # the run failed while running (disk full, an I/O error, a lost rank, out of memory,
#                  a killed worker); for the checking tools: the check found problems
EXIT_BAD_INPUT = 2  # bad input, configuration or usage (one line says which); nothing was lost
EXIT_STOPPED = 3  # stopped early without a signal, resumable (e.g. a stalled data worker; a cut GPU check)
EXIT_CTRL_C = 130  # 128 + SIGINT: Ctrl-C (128 + N in general: stopped by signal N, e.g. 143 for SIGTERM)

EXIT_STATUS_HELP = """exit status (the same for every detr_deform tool):
  0    done
  1    the run failed while running (disk full, I/O error, lost rank, out of memory, killed worker;
       checking tools: problems found); files written before are intact
  2    bad input, configuration or usage: one line names the file/key/value and the fix; nothing lost
  3    stopped early, resumable (a stalled data worker; an incomplete GPU check)
  128+N  stopped by signal N after saving what it had: 143 SIGTERM (resumable), 130 Ctrl-C"""


class DetrDeformError(Exception):
    """Base of every error the package raises on purpose. ``exit_code`` is the table's status for
    it (a class default, which one instance may override, e.g. a checkpoint that could not be
    *written* is a failed run, not bad input)."""

    exit_code: int = EXIT_BAD_INPUT
    prefix: str = "error: "

    def __init__(self, *args: object, exit_code: int | None = None) -> None:
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code


class MissingExtraError(DetrDeformError, ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra to install. Met while
    running, it is a failed run (status 1: install the extra, run again); the options that need
    an extra are checked before a training run starts, as a ConfigError (status 2)."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name  # ModuleNotFoundError's attribute: which module is missing


def optional_import(module: str, extra: str, feature: str):
    """``import module`` for an optional feature, or a MissingExtraError naming the extra:
    ``pip install "detr_deform[extra]"``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module.split(".")[0] and error.name != module:
            raise  # a broken installation of something else: the traceback is the useful answer
        raise MissingExtraError(f'{feature} needs {module}, which is not installed: pip install '
                                f'"detr_deform[{extra}]"', name=module) from error


def exit_code_for(error: BaseException) -> int | None:
    """The table's status for an exception a tool may end on, or None for a bug (traceback)."""
    if isinstance(error, DetrDeformError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return EXIT_CTRL_C
    if isinstance(error, OSError):  # below the checks: an input mount gone, an I/O error while running
        return EXIT_FAILED
    return None


def error_line(error: BaseException) -> str:
    """The one line printed for ``error``."""
    if isinstance(error, DetrDeformError):
        return f"{error.prefix}{error}"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"error: {type(error).__name__}: {error}"


def run_tool(body: Callable[[], int | None], *, failure_note: str = "", interrupt_note: str = "",
             report: Callable[[str], None] | None = None) -> int:
    """Runs a tool's body and returns its exit status by the table: 0 (or what the body returns)
    when it ends normally; for an error of the family, a KeyboardInterrupt or an OSError, one line
    on stderr (``failure_note`` appended to failures of the run, status 1; ``interrupt_note`` to
    Ctrl-C) and the table's status. ``report`` prints the line (default: to stderr). Any other
    exception is a bug and keeps its traceback."""
    try:
        status = body()
    except (DetrDeformError, KeyboardInterrupt, OSError) as error:
        code = exit_code_for(error)
        line = error_line(error)
        if code == EXIT_FAILED and failure_note:
            line += f"; {failure_note}"
        if code == EXIT_CTRL_C and interrupt_note:
            line += f": {interrupt_note}"
        if report is None:
            print(line, file=sys.stderr, flush=True)
        else:
            report(line)
        return code
    return EXIT_DONE if status is None else status
