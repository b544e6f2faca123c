"""Loading of the compiled operator and its torch.library registration.

Loading the shared library defines ``torch.ops.detr_deform.ms_deform_attn_forward``
/ ``_backward`` (C++ ``TORCH_LIBRARY``) with CPU and, when built, CUDA kernels.
This module adds, once per process, what Python provides: fake kernels (shape
propagation for torch.compile and meta tensors, which also run the metadata
checks there) and the autograd formula.
"""
from __future__ import annotations

import threading
import warnings

import torch

from detr_deform.ops._build import OpsBuildError, build_and_load
from detr_deform.ops._checks import check_metadata

_lock = threading.Lock()
_loaded = False
_library_path = None
_load_error: OpsBuildError | None = None
_warned_unavailable = False


def load_compiled_op() -> None:
    """Builds/loads the compiled operator once per process; raises OpsBuildError on failure."""
    global _loaded, _load_error, _library_path
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        if _load_error is not None:
            raise _load_error
        try:
            _library_path = build_and_load()
        except OpsBuildError as error:
            _load_error = error
            raise
        _register_python_parts()
        _loaded = True


def compiled_op_has_cuda() -> bool:
    """Whether the loaded operator library is the CUDA flavour (False before loading)."""
    return _library_path is not None and _library_path.name == "detr_deform_ops_cuda.so"


def compiled_op_description() -> str:
    """What the loaded operator is: its library and, for the CUDA flavour, the architectures it holds."""
    if _library_path is None:
        return "the compiled kernels (not loaded yet)"
    flavour = "CUDA and CPU" if _library_path.name == "detr_deform_ops_cuda.so" else "CPU"
    archs = ""
    if flavour != "CPU":
        from detr_deform.ops._build import cuda_arch_list

        archs = f" for {';'.join(cuda_arch_list())}"
    return f"the compiled {flavour} kernels ({_library_path}{archs})"


def compiled_op_available() -> bool:
    """True when the compiled operator is (or can be) loaded; warns once otherwise."""
    global _warned_unavailable
    try:
        load_compiled_op()
    except OpsBuildError as error:
        if not _warned_unavailable:
            _warned_unavailable = True
            warnings.warn(
                f"detr_deform: using the slow pure-PyTorch MSDeformAttn because the compiled operator is "
                f"unavailable: {error}",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    return True


def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  deterministic=False):
    check_metadata(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * channels))


def _backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   deterministic=False):
    # Contiguous, in each input's dtype, like the real kernels (empty_like would copy a strided input's strides).
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output) -> None:
    *tensors, deterministic = inputs
    ctx.save_for_backward(*tensors)
    ctx.deterministic = deterministic


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.detr_deform.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        ctx.deterministic,
    )
    return grad_value, None, None, grad_locations, grad_weights, None


def _register_python_parts() -> None:
    torch.library.register_fake("detr_deform::ms_deform_attn_forward")(_forward_fake)
    torch.library.register_fake("detr_deform::ms_deform_attn_backward")(_backward_fake)
    torch.library.register_autograd("detr_deform::ms_deform_attn_forward", _backward, setup_context=_setup_context)
