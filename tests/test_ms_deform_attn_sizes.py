"""Degenerate sizes never reach a kernel: zero points / levels / heads / channels and
empty, negative or overflowing levels raise a Python error naming the argument, on
every path (compiled op through ms_deform_attn and through torch.ops directly,
forward and backward, the reference, and the CUDA kernels' emulation); zero
queries and batch 0 are legitimate empty calls. Everything runs in a subprocess,
so that a signal (zero points used to kill the process with SIGFPE) is a failed
test, not a dead pytest."""
import json
import re
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from detr_deform.ops import load_compiled_op, ms_deform_attn
    from detr_deform.ops import emulation

    load_compiled_op()
    emulation.load_emulation()
    g = torch.Generator().manual_seed(0)
    SHAPES = [[4, 3], [2, 2]]

    def inputs(batch=2, heads=3, channels=5, queries=7, points=4, shapes=SHAPES, starts=None, positions=None):
        levels = len(shapes)
        shapes_t = torch.tensor(shapes, dtype=torch.int64).reshape(levels, 2)
        if starts is None:
            areas = [h * w for h, w in shapes]
            starts = [sum(areas[:i]) for i in range(levels)]
        positions = sum(h * w for h, w in shapes) if positions is None else positions
        value = torch.randn(batch, positions, heads, channels, generator=g, dtype=torch.float64)
        loc = torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=torch.float64)
        w = torch.rand(batch, queries, heads, levels, points, generator=g, dtype=torch.float64)
        return value, shapes_t, torch.tensor(starts, dtype=torch.int64), loc, w

    CASES = {
        "zero_points": inputs(points=0),
        "zero_levels": inputs(shapes=[], positions=0),
        "zero_heads": inputs(heads=0),
        "zero_channels": inputs(channels=0),
        "empty_level": inputs(shapes=[[4, 3], [0, 2]]),
        "negative_level": inputs(shapes=[[4, 3], [-2, 2]], positions=12),
        "negative_start": inputs(starts=[-1, 12]),
        "overflowing_level": inputs(shapes=[[2, 2], [2**32, 2**32]], starts=[0, 4], positions=4),
        "zero_queries": inputs(queries=0),
        "zero_batch": inputs(batch=0),
    }

    def grad_output(value, loc):
        return torch.ones(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=value.dtype)

    PATHS = {
        "cpp": lambda v, s, st, loc, w: ms_deform_attn(v, s, st, loc, w, impl="cpp"),
        "cpp_backward": lambda v, s, st, loc, w: torch.autograd.grad(
            ms_deform_attn(v.requires_grad_(), s, st, loc, w, impl="cpp").sum(), v),
        "pytorch": lambda v, s, st, loc, w: ms_deform_attn(v, s, st, loc, w, impl="pytorch"),
        "ops_forward": lambda v, s, st, loc, w: torch.ops.detr_deform.ms_deform_attn_forward(v, s, st, loc, w),
        "ops_backward": lambda v, s, st, loc, w: torch.ops.detr_deform.ms_deform_attn_backward(
            grad_output(v, loc), v, s, st, loc, w, True),
        "emulated_forward": lambda v, s, st, loc, w: emulation.emulated_forward(v, s, st, loc, w),
        "emulated_backward": lambda v, s, st, loc, w: emulation.emulated_backward(
            grad_output(v, loc), v, s, st, loc, w, deterministic=True),
    }

    for case, args in CASES.items():
        for path, fn in PATHS.items():
            try:
                result = fn(*(t.clone() for t in args))
                shapes = [list(t.shape) for t in (result if isinstance(result, tuple) else (result,))]
                print(json.dumps({"case": case, "path": path, "ok": shapes}), flush=True)
            except Exception as error:
                print(json.dumps({"case": case, "path": path, "error": type(error).__name__,
                                  "message": str(error).splitlines()[0]}), flush=True)
""")

PATHS = ["cpp", "cpp_backward", "pytorch", "ops_forward", "ops_backward", "emulated_forward", "emulated_backward"]
ERRORS = {
    "zero_points": r"ms_deform_attn: sampling_locations has P = 0 points per level \(shape \(2, 7, 3, 2, 0, 2\)\); "
                   "need at least one point",
    "zero_levels": "ms_deform_attn: spatial_shapes has L = 0 levels; need at least one level",
    "zero_heads": r"ms_deform_attn: value has M = 0 heads \(shape \(2, 16, 0, 5\)\); need at least one head",
    "zero_channels": r"ms_deform_attn: value has D = 0 channels per head \(shape \(2, 16, 3, 0\)\); "
                     "need at least one channel",
    "empty_level": r"ms_deform_attn: level 1 has non-positive spatial shape \(0, 2\)",
    "negative_level": r"ms_deform_attn: level 1 has non-positive spatial shape \(-2, 2\)",
    "negative_start": r"ms_deform_attn: level_start_index\[0\] = -1 but the levels before it hold 0 positions",
    "overflowing_level": r"ms_deform_attn: spatial_shapes sum to (more than )?\d+ positions \(sum of H\*W\) but value "
                         "has S = 4",
}
LAYOUT = {"empty_level", "negative_level", "negative_start", "overflowing_level"}


@pytest.fixture(scope="module")
def outcomes():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the operator died (exit code {done.returncode}):\n{done.stderr[-3000:]}"
    return {(r["case"], r["path"]): r for r in map(json.loads, done.stdout.splitlines())}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", sorted(ERRORS))
def test_degenerate_sizes_raise_clear_errors(outcomes, case, path):
    outcome = outcomes[(case, path)]
    assert "error" in outcome, f"{case} on {path} did not raise: {outcome}"
    # Metadata errors are ValueError everywhere; level-layout errors are ValueError from Python and,
    # as they always were, RuntimeError from the C++ entry points.
    allowed = {"ValueError", "RuntimeError"} if case in LAYOUT and path != "pytorch" else {"ValueError"}
    assert outcome["error"] in allowed, outcome
    assert re.fullmatch(ERRORS[case], outcome["message"]), outcome["message"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["zero_queries", "zero_batch"])
def test_empty_calls_work(outcomes, case, path):
    outcome = outcomes[(case, path)]
    assert "ok" in outcome, outcome
    batch, queries = (2, 0) if case == "zero_queries" else (0, 7)
    if path in ("cpp", "pytorch", "ops_forward", "emulated_forward"):
        assert outcome["ok"] == [[batch, queries, 15]]
    elif path == "cpp_backward":
        assert outcome["ok"] == [[batch, 16, 3, 5]]
    else:
        assert outcome["ok"] == [[batch, 16, 3, 5], [batch, queries, 3, 2, 4, 2], [batch, queries, 3, 2, 4]]
