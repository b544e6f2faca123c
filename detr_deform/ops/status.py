"""Which builds of the operator exist and work (``python -m detr_deform.ops info``).

Nothing is compiled here: each build flavour's cached library is looked for, and
the one this machine would use is loaded and run once on a tiny input against
the pure-PyTorch reference; so is the CUDA-emulation harness (its own namespace).
The other operator flavour is only listed: the CPU and CUDA libraries register
the same ``torch.ops.detr_deform`` namespace, so one process can load only one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from detr_deform.ops import _build
from detr_deform.ops.reference import ms_deform_attn_pytorch

# A smoke test of a loaded build, not a precision test (tests/test_ms_deform_attn_op.py is): each float32
# output sums L*P = 4 bilinear samples of 4 taps of values < 1, rounding error ~ 16 * 2**-24; 1e-4 leaves
# a wide margin while any wrong index or weight shows up as an error of order 0.1.
SMOKE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class BuildStatus:
    name: str            # cpu | cuXYZ | cuda-emulation
    library: Path
    state: str           # one line: not built / out of date / works / fails ... / built (not checked ...)


def _smoke_inputs(device: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[3, 4], [2, 2]], dtype=torch.int64)
    starts = torch.tensor([0, 12], dtype=torch.int64)
    value = torch.rand(1, 16, 2, 4, generator=generator)
    locations = torch.rand(1, 5, 2, 2, 2, 2, generator=generator)
    weights = torch.rand(1, 5, 2, 2, 2, generator=generator)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return tuple(t.to(device) for t in (value, shapes, starts, locations, weights))


def _smoke_check(run, device: str) -> str:
    value, shapes, starts, locations, weights = _smoke_inputs(device)
    try:
        output = run(value, shapes, starts, locations, weights)
    except Exception as error:  # noqa: BLE001  (a broken build can fail in any way)
        return f"fails: loads, but a forward pass raised {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    difference = float((output.cpu() - ms_deform_attn_pytorch(value.cpu(), shapes, locations.cpu(),
                                                               weights.cpu())).abs().max())
    if not difference <= SMOKE_TOLERANCE:
        return f"fails: loads, but differs from the PyTorch reference by {difference:.3g} (rebuild it)"
    return f"works (loads; a forward pass on {device} matches the PyTorch reference to {difference:.1e})"


def _stale(library: Path, sources: tuple[str, ...]) -> bool:
    try:
        root = _build.source_dir()
    except _build.OpsBuildError:
        return False
    newest = max((root / name).stat().st_mtime for name in sources if (root / name).is_file())
    return newest > library.stat().st_mtime


def _operator_status(with_cuda: bool, in_use: bool) -> BuildStatus:
    if with_cuda and torch.version.cuda is None:
        return BuildStatus("cuda", Path("-"), "not possible: this torch build has no CUDA support (CPU wheels)")
    name = "detr_deform_ops_cuda" if with_cuda else "detr_deform_ops_cpu"
    directory = _build.build_dir(with_cuda)
    library = directory / f"{name}.so"
    flavour = directory.name.split("-")[2]
    sources = _build.SOURCE_FILES + (_build.CUDA_SOURCE_FILES if with_cuda else ())
    if not library.is_file():
        return BuildStatus(flavour, library, "not built (python -m detr_deform.ops build"
                           + (" --cuda)" if with_cuda else " --cpu)"))
    if _stale(library, sources):
        return BuildStatus(flavour, library, "built, but older than the sources: rebuilt on next use")
    if not in_use:
        return BuildStatus(flavour, library, "built (not loaded: this machine uses the other flavour)")
    if with_cuda and not torch.cuda.is_available():
        return BuildStatus(flavour, library, "built (not checked: no GPU visible)")
    try:
        torch.ops.load_library(str(library))
    except Exception as error:  # noqa: BLE001  (the loader's errors come in several types)
        return BuildStatus(flavour, library, f"fails: does not load ({type(error).__name__}: "
                                             f"{str(error).splitlines()[0][:200]}); rebuild it")
    return BuildStatus(flavour, library, _smoke_check(
        lambda *args: torch.ops.detr_deform.ms_deform_attn_forward(*args, False), "cuda" if with_cuda else "cpu"))


def _emulation_status() -> BuildStatus:
    library = _build.build_dir(False, flavour="cuda-emulation") / f"{_build.EMULATION_LIBRARY}.so"
    if not library.is_file():
        return BuildStatus("cuda-emulation", library, "not built (python -m detr_deform.ops build --emulation; "
                                                      "the tests build it when they need it)")
    if _stale(library, _build.EMULATION_SOURCE_FILES):
        return BuildStatus("cuda-emulation", library, "built, but older than the sources: rebuilt on next use")
    try:
        torch.ops.load_library(str(library))
    except Exception as error:  # noqa: BLE001  (the loader's errors come in several types)
        return BuildStatus("cuda-emulation", library, f"fails: does not load ({type(error).__name__}: "
                                                      f"{str(error).splitlines()[0][:200]}); rebuild it")
    return BuildStatus("cuda-emulation", library, _smoke_check(
        lambda *args: torch.ops.detr_deform_emulation.forward(*args, 0, 0), "cpu"))


def build_statuses() -> list[BuildStatus]:
    """The CPU and CUDA operator builds and the CUDA-emulation harness, each with what was found."""
    cuda = _build.cuda_requested()
    return [_operator_status(False, in_use=not cuda), _operator_status(True, in_use=cuda), _emulation_status()]


def format_statuses(statuses: list[BuildStatus]) -> str:
    width = max(len(s.name) for s in statuses)
    return "\n".join(f"  {s.name:<{width}}  {s.state}\n  {'':<{width}}  {s.library}" for s in statuses)


def operator_build_pending() -> Path | None:
    """The operator library this machine would use when it has yet to be compiled
    (missing, or older than its sources): the first forward pass then compiles it,
    for a minute or so without output. None when it is ready."""
    with_cuda = _build.cuda_requested()
    if with_cuda and torch.version.cuda is None:
        return None  # the build would fail at once, with its own message
    name = "detr_deform_ops_cuda" if with_cuda else "detr_deform_ops_cpu"
    library = _build.build_dir(with_cuda) / f"{name}.so"
    sources = _build.SOURCE_FILES + (_build.CUDA_SOURCE_FILES if with_cuda else ())
    return library if not library.is_file() or _stale(library, sources) else None
