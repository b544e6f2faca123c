"""The CUDA kernels' own code, run on the CPU: the per-thread bodies and host
driver of ms_deform_attn_cuda.cu, compiled with the normal C++ compiler and
run for every (block, thread) of the real launch configuration
(detr_deform.ops.emulation), against the reference and against themselves
under shuffled thread orders. The checks and their tolerances live in
detr_deform.ops.kernel_checks, which tools/gpu_check.py runs too."""
import re
import subprocess
import sys

import pytest
import torch

from detr_deform.ops import kernel_checks
from detr_deform.ops._build import source_dir

# A 32-bit index bug in this one reads or writes far outside the tensors and may
# segfault: run it in a subprocess so that a crash is a failed test, not a dead pytest.
IN_SUBPROCESS = {"large_offsets"}


@pytest.mark.parametrize("name", [name for name in kernel_checks.CHECKS if name not in IN_SUBPROCESS])
def test_emulated_cuda_kernels(name):
    kernel_checks.CHECKS[name]()


def test_large_offsets_in_subprocess():
    code = "from detr_deform.ops.kernel_checks import check_large_offsets; print(check_large_offsets())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit code {done.returncode}\n{done.stderr[-3000:]}"
    assert "matches the cropped reference" in done.stdout


def test_cuda_source_uses_the_shared_bodies_and_launch_config():
    """What the harness runs is what the GPU runs only if the .cu keeps to the shared code:
    every __global__ kernel is one call of a *_thread body from cuda_kernels.h, every launch
    uses the configuration the shared driver computed, and the driver computes it with
    launch_config for every launch."""
    cuda = (source_dir() / "ms_deform_attn_cuda.cu").read_text()
    bodies = re.findall(r"__global__ void (\w+)\([^{]*\)\s*\{(.*?)\n\}", cuda, re.S)
    assert [name for name, _ in bodies] == ["forward_kernel", "backward_kernel", "gather_kernel"]
    for name, body in bodies:
        body = " ".join(body.split())
        assert re.fullmatch(r"\w+_thread\( ?blockIdx\.x, threadIdx\.x, blockDim\.x, gridDim\.x, [^;]*\);", body), \
            f"{name} does more than call its shared body: {body}"
    launches = re.findall(r"<<<([^>]*)>>>", cuda)
    assert len(launches) == 3 and all(launch.replace(" ", "") == "c.blocks,c.threads,0,stream" for launch in launches)
    driver = " ".join((source_dir() / "cuda_driver.h").read_text().split())
    calls = re.findall(r"launcher\.(?:forward|backward|gather)\( ?([^,]*)", driver)
    assert len(calls) == 4 and all(call.startswith("launch_config(") for call in calls), calls


class _RecordBackwardCalls(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() == "detr_deform::ms_deform_attn_backward":
            self.flags.append(args[6] if len(args) > 6 else (kwargs or {}).get("deterministic", False))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("deterministic", [None, False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_deterministic_flag_reaches_the_backward(deterministic, compiled):
    """ms_deform_attn(..., deterministic=) is handed by autograd to the backward op, in eager mode
    and through torch.compile(fullgraph=True) (the CPU kernels ignore it; CUDA selects its path)."""
    from detr_deform.ops import load_compiled_op, ms_deform_attn

    load_compiled_op()
    value, shapes, starts, locations, weights, _ = kernel_checks.make_inputs(kernel_checks.CASES["single_level"])
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]

    def fn(v, loc, w):
        return ms_deform_attn(v, shapes, starts, loc, w, impl="cpp", deterministic=deterministic).sum()

    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = fn(*leaves)
    with _RecordBackwardCalls() as recorder:
        loss.backward()
    assert recorder.flags == [bool(deterministic)]
