"""Just-in-time build and loading of the compiled MSDeformAttn operator.

The C++/CUDA sources live in ``ops/ms_deform_attn`` of the repository (or in
``detr_deform/_csrc`` of an installed wheel). They are compiled with
``torch.utils.cpp_extension`` + ninja on first use, cached per torch version
and build flavour, and re-linked only when a source changes. Loading the
shared library registers ``torch.ops.detr_deform.*`` through ``TORCH_LIBRARY``.

Environment variables:
    DETR_DEFORM_WITH_CUDA   1 to build the CUDA kernels too, 0 for CPU only
                            (default: 1 when torch sees a GPU).
    DETR_DEFORM_BUILD_DIR   where builds are cached
                            (default: ~/.cache/detr_deform/ops).
    DETR_DEFORM_MARCH       CPU target passed as -march= (default: native, i.e.
                            the building machine; the cache path carries a hash
                            of the CPU's feature flags so a home directory shared
                            by different machines never loads a foreign build).
                            Set e.g. x86-64-v2 for a portable build.
    TORCH_CUDA_ARCH_LIST    GPU architectures to compile for, e.g. "8.0;9.0". Unset: the
                            visible GPUs' (clamped to what this torch supports), or
                            8.0;9.0;10.0 without a GPU (A100, H100/H200, B200). The
                            highest entry always gets +PTX, so newer GPUs can JIT the
                            kernels; the build cache is keyed on the resulting list.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import shutil
import sys
from pathlib import Path

import torch

from detr_deform.errors import EXIT_FAILED, DetrDeformError

SOURCE_FILES = ("ms_deform_attn_ops.cpp", "ms_deform_attn_checks.cpp", "ms_deform_attn_cpu.cpp")
CUDA_SOURCE_FILES = ("ms_deform_attn_cuda.cu",)
# The CPU emulation of the CUDA kernels (tests only): the harness plus the input checks it shares with the op.
EMULATION_SOURCE_FILES = ("cuda_emulation.cpp", "ms_deform_attn_checks.cpp")
EMULATION_LIBRARY = "detr_deform_cuda_emulation"
# Without TORCH_CUDA_ARCH_LIST and without a visible GPU: Ampere (A100), Hopper (H100/H200) and
# Blackwell (B200) SASS, plus PTX of the highest so that later GPUs can JIT-compile the kernels.
DEFAULT_CUDA_ARCHS = ("8.0", "9.0", "10.0")
_ARCH_PATTERN = re.compile(r"(\d+)\.(\d+)(a?)(\+PTX)?")


class OpsBuildError(DetrDeformError, RuntimeError):
    """The compiled operator could not be built or loaded (a failed run: exit status 1)."""

    exit_code = EXIT_FAILED


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found,
    using CUDA_HOME=..." warning on GPU-less machines (we resolve CUDA_HOME ourselves)."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def source_dir() -> Path:
    package_root = Path(__file__).resolve().parent.parent
    for candidate in (package_root / "_csrc", package_root.parent / "ops" / "ms_deform_attn"):
        if (candidate / SOURCE_FILES[0]).is_file():
            return candidate
    raise OpsBuildError(
        f"cannot find the operator sources (looked in {package_root / '_csrc'} and "
        f"{package_root.parent / 'ops' / 'ms_deform_attn'}). Install detr_deform from a checkout "
        "with `pip install -e .`, or use impl='pytorch'."
    )


def cuda_requested() -> bool:
    flag = os.environ.get("DETR_DEFORM_WITH_CUDA")
    if flag is not None:
        return flag.strip().lower() in ("1", "true", "yes", "on")
    return torch.cuda.is_available()


def cpu_target() -> str:
    return os.environ.get("DETR_DEFORM_MARCH", "native").strip() or "native"


def _cpu_tag() -> str:
    """Identifies what -march=native means on this machine."""
    features = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    features += " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        features += platform.processor()
    target = cpu_target()
    digest = hashlib.sha1(features.encode()).hexdigest()[:8] if target == "native" else target
    return f"{target}-{digest}" if target == "native" else target


def _visible_gpu_archs() -> list[str]:
    """The visible GPUs' compute capabilities, clamped to the highest this torch was built for."""
    if not torch.cuda.is_available():
        return []
    built = [int(a.split("_")[1].rstrip("a")) for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
    ceiling = max(((sm // 10, sm % 10) for sm in built), default=(99, 9))
    archs = {min(torch.cuda.get_device_capability(i), ceiling) for i in range(torch.cuda.device_count())}
    return [f"{major}.{minor}" for major, minor in sorted(archs)]


def cuda_arch_list() -> list[str]:
    """The GPU architectures the CUDA flavour is compiled for, e.g. ["8.0", "9.0", "10.0+PTX"].

    From TORCH_CUDA_ARCH_LIST (";" or space separated, "+PTX" allowed on any entry), else the visible
    GPUs', else DEFAULT_CUDA_ARCHS; the highest entry always carries +PTX. Raises OpsBuildError naming
    the variable and the entry it cannot read.
    """
    text = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if text and text != "native":
        entries = [entry for entry in re.split(r"[;\s]+", text) if entry]
        for entry in entries:
            if not _ARCH_PATTERN.fullmatch(entry):
                raise OpsBuildError(
                    f"TORCH_CUDA_ARCH_LIST={text!r}: cannot read {entry!r}; give compute capabilities such as "
                    "'8.0;9.0;10.0' (a trailing '+PTX' is allowed), or unset it for the default 8.0;9.0;10.0+PTX")
    else:
        entries = _visible_gpu_archs() or list(DEFAULT_CUDA_ARCHS)

    def key(entry: str) -> tuple[int, int, str]:
        major, minor, suffix, _ = _ARCH_PATTERN.fullmatch(entry).groups()
        return int(major), int(minor), suffix

    archs: dict[tuple[int, int, str], bool] = {}  # (major, minor, "a"?) -> with PTX
    for entry in entries:
        archs[key(entry)] = archs.get(key(entry), False) or entry.endswith("+PTX")
    highest = max(archs)
    archs[highest] = True
    return [f"{major}.{minor}{suffix}{'+PTX' if ptx else ''}" for (major, minor, suffix), ptx in sorted(archs.items())]


def cuda_arch_flags(archs: list[str]) -> list[str]:
    """nvcc -gencode flags: SASS for every entry, PTX for the +PTX ones."""
    flags = []
    for entry in archs:
        major, minor, suffix, ptx = _ARCH_PATTERN.fullmatch(entry).groups()
        number = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def _arch_tag(archs: list[str]) -> str:
    """Short, path-safe name of an architecture list: sm80.90.100+ptx100."""
    numbers = [entry.split("+")[0].replace(".", "") for entry in archs]
    ptx = [entry.split("+")[0].replace(".", "") for entry in archs if entry.endswith("+PTX")]
    return "sm" + ".".join(numbers) + ("-ptx" + ".".join(ptx) if ptx else "")


def build_dir(with_cuda: bool, flavour: str | None = None) -> Path:
    """Cache directory of one build flavour: cuXYZ-<architectures>, cpu, or another name (e.g. the
    emulation harness). The CUDA flavour is keyed on the architecture list, so changing
    TORCH_CUDA_ARCH_LIST (or the GPU) never loads a library built for other GPUs."""
    root = Path(os.environ.get("DETR_DEFORM_BUILD_DIR", Path.home() / ".cache" / "detr_deform" / "ops"))
    if flavour is None:
        flavour = (f"cu{torch.version.cuda.replace('.', '')}-{_arch_tag(cuda_arch_list())}" if with_cuda
                   else "cpu")
    tag = (f"torch{torch.__version__.split('+')[0]}-py{sys.version_info.major}{sys.version_info.minor}-{flavour}"
           f"-{_cpu_tag()}")
    return root / tag


def _cuda_include_dirs() -> list[str]:
    """Headers torch's CUDA headers include (cuBLAS, cuSPARSE, ...) ship in the
    nvidia wheels rather than in the CUDA toolkit of a pip-only install."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for location in spec.submodule_search_locations:
        for include in sorted(Path(location).glob("*/include")):
            dirs.append(str(include))
    return dirs


def _resolve_cuda_home() -> str | None:
    """torch guesses CUDA_HOME from the nvcc on PATH; when that nvcc is a copy
    outside the toolkit (e.g. /usr/local/bin/nvcc) the guess has no
    lib64/libcudart.so and linking fails, so prefer a directory that has it."""
    cpp_extension = _cpp_extension()
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "lib64" / "libcudart.so").exists():
            return candidate
    return cpp_extension.CUDA_HOME


def _check_toolchain(with_cuda: bool) -> None:
    cpp_extension = _cpp_extension()

    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        raise OpsBuildError("ninja is not installed: run `pip install ninja`, or use impl='pytorch'.")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise OpsBuildError(
            f"no C++ compiler ({compiler!r}) on PATH: install g++ (e.g. `apt-get install g++`) or set CXX, "
            "or use impl='pytorch'."
        )
    if with_cuda:
        if torch.version.cuda is None:
            raise OpsBuildError(
                "DETR_DEFORM_WITH_CUDA=1 but this torch build has no CUDA support; install a CUDA build of torch "
                "or set DETR_DEFORM_WITH_CUDA=0."
            )
        cpp_extension.CUDA_HOME = _resolve_cuda_home()
        if cpp_extension.CUDA_HOME is None:
            raise OpsBuildError(
                "building the CUDA kernels needs nvcc, but CUDA_HOME is not set and nvcc is not on PATH; "
                "install the CUDA toolkit matching torch.version.cuda="
                f"{torch.version.cuda} or set DETR_DEFORM_WITH_CUDA=0 for a CPU-only build."
            )


def _first_error_line(text: str) -> str:
    """The compiler's first error line (``file.cu(42): error: ...``, ``file.cpp:3:1: error: ...``),
    else the last line that is not ninja's summary."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"(^|[\s:)])(fatal )?error( #?\w+-?\w*)?:", line, re.IGNORECASE):
            return line[:300]
    rest = [line for line in lines if not line.startswith(("ninja:", "FAILED:"))]
    return (rest or lines or ["no compiler output"])[-1][:300]


def _compiler_name(with_cuda: bool) -> str:
    """What a failed build names: nvcc (path, version) and the architectures, or the C++ compiler."""
    if not with_cuda:
        return os.environ.get("CXX", "c++")
    home = _cpp_extension().CUDA_HOME or "?"
    return f"nvcc ({Path(home) / 'bin' / 'nvcc'}, CUDA {torch.version.cuda}) for {';'.join(cuda_arch_list())}"


def _compile_and_load(name: str, sources: list[str], directory: Path, with_cuda: bool, cflags: list[str],
                      ldflags: list[str], verbose: bool, what: str = "the compiled MSDeformAttn operator",
                      rebuild: str = "python -m detr_deform.ops build --verbose",
                      fallback: str = "; or pass impl='pytorch' (model.attn_impl=pytorch) to use the pure-PyTorch "
                                      "path", cuda_cflags: list[str] | None = None) -> Path:
    """cpp_extension.load into ``directory``; every failure becomes a one-line OpsBuildError naming the
    compiler (for CUDA: nvcc and the architectures), its first error, the full log (build.log in the
    build directory) and the fix."""
    cpp_extension = _cpp_extension()
    sources_root = source_dir()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            # A host function called from device code compiles (with a warning) to a kernel that does
            # nothing: an error instead.
            extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "--Werror=cross-execution-space-call",
                               *(cuda_cflags or [])],
            extra_include_paths=[str(sources_root)] + (_cuda_include_dirs() if with_cuda else []),
            build_directory=str(directory),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as error:  # compiler and loader failures come in many types
        text = f"{type(error).__name__}: {error}"
        log = directory / "build.log"
        try:
            log.write_text(text + "\n")
            where = f"full log: {log}"
        except OSError as log_error:
            where = f"(the log could not be written to {log}: {log_error.strerror})"
        raise OpsBuildError(
            f"building/loading {what} with {_compiler_name(with_cuda)} failed: {_first_error_line(text)}; "
            f"{where}; rebuild with `{rebuild}` (delete {directory} if a previous build was interrupted){fallback}"
        ) from error
    return directory / f"{name}.so"


def build_and_load(with_cuda: bool | None = None, verbose: bool = False) -> Path:
    """Compiles (if needed) and loads the operator library; returns its path.

    Raises OpsBuildError with the reason and the fix when anything fails.
    """
    with_cuda = cuda_requested() if with_cuda is None else with_cuda
    _check_toolchain(with_cuda)
    sources_root = source_dir()
    sources = [str(sources_root / name) for name in SOURCE_FILES]
    if with_cuda:
        sources += [str(sources_root / name) for name in CUDA_SOURCE_FILES]
    name = "detr_deform_ops_cuda" if with_cuda else "detr_deform_ops_cpu"
    return _compile_and_load(name, sources, build_dir(with_cuda), with_cuda,
                             ["-O3", "-fopenmp", f"-march={cpu_target()}"], ["-fopenmp"], verbose,
                             cuda_cflags=cuda_arch_flags(cuda_arch_list()) if with_cuda else None)


def build_and_load_emulation(verbose: bool = False, trace: bool = False) -> Path:
    """Compiles (if needed) and loads the CPU emulation of the CUDA kernels
    (torch.ops.detr_deform_emulation.*) with the normal C++ compiler; no nvcc.

    -O2 on the baseline target, without -ffast-math and without contracting a*b+c
    into FMAs (-ffp-contract=off): plain IEEE arithmetic, the same on every host.
    nvcc does contract, so emulated and GPU results agree to rounding, not bitwise.
    ``trace``: the flavour with the global-memory trace of tools/kernel_report.py (-DDD_TRACE_MEMORY;
    its own library and cache directory; never load both flavours in one process).
    """
    _check_toolchain(with_cuda=False)
    sources_root = source_dir()
    sources = [str(sources_root / name) for name in EMULATION_SOURCE_FILES]
    name, flavour = (EMULATION_LIBRARY + "_trace", "cuda-emulation-trace") if trace else (EMULATION_LIBRARY,
                                                                                          "cuda-emulation")
    flags = ["-O2", "-ffp-contract=off"] + (["-DDD_TRACE_MEMORY"] if trace else [])
    return _compile_and_load(name, sources, build_dir(False, flavour=flavour), False, flags, [], verbose,
                             what="the CPU emulation of the CUDA kernels",
                             rebuild="python -m detr_deform.ops build --emulation --verbose", fallback="")
