"""Behaviour when the compiled operator cannot be built: clear error for
impl="cpp", one warning and the reference path for impl="auto"."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import warnings, torch
    from detr_deform.ops import OpsBuildError, ms_deform_attn
    shapes = torch.tensor([[3, 4]]); starts = torch.tensor([0])
    value = torch.randn(1, 12, 2, 4); loc = torch.rand(1, 5, 2, 1, 2, 2); w = torch.rand(1, 5, 2, 1, 2)
    try:
        ms_deform_attn(value, shapes, starts, loc, w, impl="cpp")
        print("NO ERROR")
    except OpsBuildError as error:
        print("CPP ERROR:", error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = ms_deform_attn(value, shapes, starts, loc, w, impl="auto")
        b = ms_deform_attn(value, shapes, starts, loc, w, impl="auto")
    ref = ms_deform_attn(value, shapes, starts, loc, w, impl="pytorch")
    print("WARNINGS:", [str(c.message)[:120] for c in caught if issubclass(c.category, RuntimeWarning)])
    print("AUTO EQUALS REFERENCE:", torch.equal(a, ref) and torch.equal(b, ref))
""")


def test_missing_compiler_gives_clear_error_and_single_warning(tmp_path):
    env = dict(os.environ, CXX="/nonexistent/c++", DETR_DEFORM_BUILD_DIR=str(tmp_path), DETR_DEFORM_WITH_CUDA="0")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "CPP ERROR: no C++ compiler ('/nonexistent/c++') on PATH" in out
    assert "impl='pytorch'" in out
    warning_line = next(line for line in out.splitlines() if line.startswith("WARNINGS:"))
    assert warning_line.count("slow pure-PyTorch MSDeformAttn") == 1
    assert "AUTO EQUALS REFERENCE: True" in out


def test_emulation_harness_without_compiler_gives_the_same_clear_error(tmp_path):
    script = textwrap.dedent("""
        from detr_deform.ops import emulation
        try:
            emulation.load_emulation()
            print("NO ERROR")
        except emulation.OpsBuildError as error:
            print("EMULATION ERROR:", error)
    """)
    env = dict(os.environ, CXX="/nonexistent/c++", DETR_DEFORM_BUILD_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "EMULATION ERROR: no C++ compiler ('/nonexistent/c++') on PATH" in done.stdout


# ------------------------------------------------- CUDA architectures and build errors --

def test_cuda_arch_list_default_and_user_lists(monkeypatch):
    """No GPU, no TORCH_CUDA_ARCH_LIST: A100 / H100 / B200 code and PTX of the highest; a user list
    gets +PTX on its highest entry (whatever order it is written in); an unreadable entry is named."""
    import torch

    from detr_deform.ops import _build

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert _build.cuda_arch_list() == ["8.0", "9.0", "10.0+PTX"]
    assert _build.cuda_arch_flags(["8.0", "10.0+PTX"]) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_100,code=sm_100",
        "-gencode=arch=compute_100,code=compute_100"]
    for text, expected in (("9.0", ["9.0+PTX"]), ("9.0;8.6", ["8.6", "9.0+PTX"]), ("8.0 9.0+PTX", ["8.0", "9.0+PTX"]),
                           ("8.0+PTX;9.0", ["8.0+PTX", "9.0+PTX"]), ("9.0a;9.0", ["9.0", "9.0a+PTX"])):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", text)
        assert _build.cuda_arch_list() == expected, text
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0;hopper")
    with pytest.raises(_build.OpsBuildError, match=r"TORCH_CUDA_ARCH_LIST='9.0;hopper': cannot read 'hopper'"):
        _build.cuda_arch_list()


def test_cuda_build_cache_is_keyed_on_the_arch_list(monkeypatch):
    import torch

    from detr_deform.ops import _build

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    default = _build.build_dir(True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    hopper = _build.build_dir(True)
    assert default != hopper and "sm80.90.100-ptx100" in default.name and "sm90-ptx90" in hopper.name
    assert _build.build_dir(False) == _build.build_dir(False)  # the CPU flavour does not depend on it


FAKE_NVCC_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from detr_deform.ops import _build
    _build._check_toolchain(with_cuda=True)
    try:
        _build._compile_and_load("probe", [str(_build.source_dir() / "ms_deform_attn_cuda.cu")], Path(sys.argv[1]),
                                 True, [], [], False, cuda_cflags=_build.cuda_arch_flags(_build.cuda_arch_list()))
        print("NO ERROR")
    except _build.OpsBuildError as error:
        print("BUILD ERROR:", error)
""")


def test_failed_cuda_build_is_one_line_naming_nvcc_the_architectures_and_the_log(tmp_path):
    """No GPU and no TORCH_CUDA_ARCH_LIST (torch's own flags would raise IndexError here): the build runs
    nvcc for the default architectures, and its failure is one line with the compiler's first error."""
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "lib64").mkdir()
    (toolkit / "include").mkdir()
    (toolkit / "lib64" / "libcudart.so").write_bytes(b"")
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\n"
                    "echo 'ms_deform_attn_cuda.cu(42): error: simulated nvcc failure' >&2\nexit 1\n")
    nvcc.chmod(0o755)
    env = dict(os.environ, CUDA_HOME=str(toolkit), PATH=f"{toolkit / 'bin'}:{os.environ['PATH']}")
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    env["CUDA_VISIBLE_DEVICES"] = ""
    build = tmp_path / "build"
    done = subprocess.run([sys.executable, "-c", FAKE_NVCC_SCRIPT, str(build)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("BUILD ERROR:"))
    assert done.stdout.strip() == line  # one line
    assert f"nvcc ({nvcc}" in line and "for 8.0;9.0;10.0+PTX failed" in line
    assert "ms_deform_attn_cuda.cu(42): error: simulated nvcc failure" in line
    assert f"full log: {build / 'build.log'}" in line and "model.attn_impl=pytorch" in line
    assert "simulated nvcc failure" in (build / "build.log").read_text()
    args = (toolkit / "bin" / "args").read_text()
    for flag in ("arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_100,code=sm_100",
                 "arch=compute_100,code=compute_100"):
        assert flag in args, (flag, args)


AUTO_ON_CUDA_SCRIPT = textwrap.dedent("""
    import torch
    from detr_deform.ops import OpsBuildError, ms_deform_attn

    class LooksLikeCuda(torch.Tensor):  # no GPU here: a CPU tensor that answers is_cuda = True
        @property
        def is_cuda(self):
            return True

    shapes = torch.tensor([[3, 4]]); starts = torch.tensor([0])
    value = torch.randn(1, 12, 2, 4).as_subclass(LooksLikeCuda)
    loc = torch.rand(1, 5, 2, 1, 2, 2); w = torch.rand(1, 5, 2, 1, 2)
    try:
        ms_deform_attn(value, shapes, starts, loc, w, impl="auto")
        print("NO ERROR")
    except OpsBuildError as error:
        print("AUTO ERROR:", error)
    ms_deform_attn(value.as_subclass(torch.Tensor), shapes, starts, loc, w, impl="pytorch")
    ms_deform_attn(value.as_subclass(torch.Tensor), shapes, starts, loc, w, impl="pytorch")
""")


def test_auto_on_cuda_with_a_failed_build_is_an_error_naming_the_explicit_choice(tmp_path):
    env = dict(os.environ, CXX="/nonexistent/c++", DETR_DEFORM_BUILD_DIR=str(tmp_path), DETR_DEFORM_WITH_CUDA="0")
    done = subprocess.run([sys.executable, "-c", AUTO_ON_CUDA_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("AUTO ERROR:"))
    assert "attn_impl='auto' on a CUDA device needs the compiled CUDA kernels" in line
    assert "no C++ compiler ('/nonexistent/c++')" in line and "model.attn_impl=pytorch" in line
    # The implementation in use is logged once (per implementation and device type) when it first runs.
    announced = [line for line in done.stderr.splitlines() if "MSDeformAttn on" in line]
    assert announced == ["detr_deform: MSDeformAttn on cpu uses the pure-PyTorch grid_sample path (slow)"]


def test_the_compiled_implementation_is_announced_once():
    script = textwrap.dedent("""
        import torch
        from detr_deform.ops import ms_deform_attn
        shapes = torch.tensor([[3, 4]]); starts = torch.tensor([0])
        value = torch.randn(1, 12, 2, 4); loc = torch.rand(1, 5, 2, 1, 2, 2); w = torch.rand(1, 5, 2, 1, 2)
        for _ in range(3):
            ms_deform_attn(value, shapes, starts, loc, w, impl="cpp")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, DETR_DEFORM_WITH_CUDA="0"))
    assert done.returncode == 0, done.stderr
    announced = [line for line in done.stderr.splitlines() if "MSDeformAttn on" in line]
    assert len(announced) == 1 and announced[0].startswith(
        "detr_deform: MSDeformAttn on cpu uses the compiled CPU kernels ("), announced


def test_gpu_inputs_with_a_cpu_only_build_are_one_line():
    """A CPU-only build (DETR_DEFORM_WITH_CUDA=0) given GPU inputs: our error with the fix, for auto and
    cpp alike, instead of the dispatcher's 'Could not run ... CUDA backend' from deep inside torch."""
    script = AUTO_ON_CUDA_SCRIPT.split("try:")[0] + textwrap.dedent("""
        for impl in ("auto", "cpp"):
            try:
                ms_deform_attn(value, shapes, starts, loc, w, impl=impl)
                print("NO ERROR")
            except OpsBuildError as error:
                print(f"{impl} ERROR:", error)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, DETR_DEFORM_WITH_CUDA="0"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["auto ERROR", "cpp ERROR"]
    assert all("built without CUDA kernels" in line and "model.attn_impl=pytorch" in line for line in lines)
