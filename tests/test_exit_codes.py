"""One error family and one exit-code table: every class's status, the one wrapper, and each tool
ending on each class with the table's status and one line (in-process: the tools' bodies are
replaced by one that raises)."""
import errno
import signal
import sys

import pytest

from detr_deform.config import ConfigError
from detr_deform.data.errors import DatasetError
from detr_deform.engine.faults import NonFiniteLossError, TrainingInterrupted
from detr_deform.errors import (
    EXIT_BAD_INPUT,
    EXIT_CTRL_C,
    EXIT_FAILED,
    EXIT_STATUS_HELP,
    DetrDeformError,
    MissingExtraError,
    exit_code_for,
    optional_import,
    run_tool,
)
from detr_deform.inference.inputs import InputError, InputTypeError, MissingInputError
from detr_deform.inference.video import VideoError
from detr_deform.io.checkpoint import CheckpointError
from detr_deform.ops._build import OpsBuildError
from detr_deform.utils.device import DeviceError
from detr_deform.utils.files import OutputError

from test_tools import tool_module

# (error, its builtin base kept for compatibility, the table's status)
CASES = [
    (ConfigError("optim.lr: must be > 0"), ValueError, EXIT_BAD_INPUT),
    (CheckpointError("x.pth: not a checkpoint"), RuntimeError, EXIT_BAD_INPUT),
    (CheckpointError("could not write checkpoint x.pth", exit_code=EXIT_FAILED), RuntimeError, EXIT_FAILED),
    (DatasetError("train.json: not valid JSON"), ValueError, EXIT_BAD_INPUT),
    (OutputError("could not write out.json: [Errno 28] No space left on device"), OSError, EXIT_FAILED),
    (DeviceError("--device=cuda but no GPU is visible"), ValueError, EXIT_BAD_INPUT),
    (VideoError("clip.mp4: cannot be read"), ValueError, EXIT_BAD_INPUT),
    (InputError("inputs[0]: the image is empty"), ValueError, EXIT_BAD_INPUT),
    (InputTypeError("inputs[0]: unsupported input"), TypeError, EXIT_BAD_INPUT),
    (MissingInputError("no such image file or folder: a.jpg"), FileNotFoundError, EXIT_BAD_INPUT),
    (OpsBuildError("the operator could not be built"), RuntimeError, EXIT_FAILED),
    (NonFiniteLossError("step 5: loss_giou=nan"), FloatingPointError, EXIT_BAD_INPUT),
    (MissingExtraError("needs av", name="av"), ModuleNotFoundError, EXIT_FAILED),
    (TrainingInterrupted("stopped by SIGTERM", 128 + signal.SIGTERM), Exception, 128 + signal.SIGTERM),
]


@pytest.mark.parametrize("error, base, status", CASES, ids=lambda c: type(c).__name__ if isinstance(c, Exception)
                         else None)
def test_every_error_class_is_in_the_family_keeps_its_base_and_has_its_status(error, base, status):
    assert isinstance(error, DetrDeformError) and isinstance(error, base)
    assert exit_code_for(error) == status


def test_outside_the_family_ctrl_c_and_os_errors_have_statuses_and_bugs_keep_their_traceback(capsys):
    assert exit_code_for(KeyboardInterrupt()) == EXIT_CTRL_C
    assert exit_code_for(OSError(errno.EIO, "Input/output error")) == EXIT_FAILED
    assert exit_code_for(ValueError("a bug")) is None
    with pytest.raises(ZeroDivisionError):
        run_tool(lambda: 1 / 0)


def test_run_tool_prints_one_line_with_the_notes_and_returns_the_status(capsys):
    def raising(error):
        def body():
            raise error
        return body

    assert run_tool(lambda: None) == 0 and run_tool(lambda: 1) == 1
    assert run_tool(raising(OutputError("could not write a.json: [Errno 28] No space left on device")),
                    failure_note="earlier files are intact") == EXIT_FAILED
    assert capsys.readouterr().err == ("error: could not write a.json: [Errno 28] No space left on device; "
                                       "earlier files are intact\n")
    assert run_tool(raising(ConfigError("optim.lr: must be > 0")), failure_note="not for bad input") == 2
    assert capsys.readouterr().err == "error: optim.lr: must be > 0\n"
    assert run_tool(raising(KeyboardInterrupt()), interrupt_note="results so far in out/") == 130
    assert capsys.readouterr().err == "interrupted: results so far in out/\n"
    assert run_tool(raising(TrainingInterrupted("SIGTERM: stopped after step 3", 143))) == 143
    assert capsys.readouterr().err == "SIGTERM: stopped after step 3\n"


def test_optional_import_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # as if the extra were not installed
    with pytest.raises(MissingExtraError, match=r'reading videos needs av, which is not installed: pip install '
                                                r'"detr_deform\[video\]"'):
        optional_import("av", "video", "reading videos")


# Each tool: its argv (parsed for real) and the name of the function its main() runs.
TOOLS = {
    "eval": (["ck.pth"], "evaluate_checkpoint"),
    "infer": (["ck.pth", "a.jpg"], "run"),
    "export": (["ck.pth"], "export"),
    "convert": (["src.pth", "dst", "--to", "hf"], "convert"),
    "check_dataset": (["--coco-path", "data"], "check"),
    "convert_dataset": (["voc/", "voc.json"], "convert"),
    "visualize": (["dataset", "--demo"], "visualize"),
    "plot_logs": (["runs/x"], "plot_runs"),
}
TOOL_CASES = [(error, status) for error, _, status in CASES] + [
    (KeyboardInterrupt(), EXIT_CTRL_C), (OSError(errno.EIO, "Input/output error"), EXIT_FAILED)]


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_every_tool_ends_on_every_error_class_with_the_tables_status(name, monkeypatch, capsys):
    module = tool_module(name)
    argv, body = TOOLS[name]
    assert "exit status (the same for every detr_deform tool)" in module.parse_args.__globals__["EXIT_STATUS_HELP"]
    for error, status in TOOL_CASES:
        def raising(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(module, body, raising)
        assert module.main(argv) == status, (name, error)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, (name, error, lines)


def test_every_tool_shows_the_table_in_its_help(capsys):
    for name in [*TOOLS, "benchmark", "benchmark_coco_eval", "benchmark_ms_deform_attn"]:
        module = tool_module(name)
        with pytest.raises(SystemExit) as stop:
            (module.parse_args if hasattr(module, "parse_args") else module.main)(["--help"])
        assert stop.value.code == 0
        assert EXIT_STATUS_HELP.splitlines()[1] in capsys.readouterr().out, name


def test_train_ends_on_every_error_class_with_the_tables_status(monkeypatch, capsys):
    train_tool = tool_module("train")
    monkeypatch.setattr(train_tool.sys, "argv", ["tools/train.py", "experiment=demo"])
    for error, status in TOOL_CASES:
        def raising(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(train_tool, "start", raising)
        with pytest.raises(SystemExit) as stop:
            train_tool.main()
        assert stop.value.code == status, error
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, (error, lines)
