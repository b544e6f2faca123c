"""Behaviour when the compiled operator cannot be built: clear error for
impl="cpp", one warning and the reference path for impl="auto"."""
import os
import subprocess
import sys
import textwrap

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
