"""Multi-scale deformable attention operator.

``ms_deform_attn`` (:mod:`detr_deform.ops.functional`) dispatches to the compiled
C++/CUDA kernels (``torch.ops.detr_deform.ms_deform_attn_forward``, loaded and
registered with fake kernels and an autograd formula in
:mod:`detr_deform.ops._library`, so that ``torch.compile(fullgraph=True)``
traces through it) or to the pure-PyTorch reference in
:mod:`detr_deform.ops.reference`. Input checks: :mod:`detr_deform.ops._checks`
(Python paths) and ``ops/ms_deform_attn/ms_deform_attn_checks.cpp`` (compiled
path). The CPU emulation of the CUDA kernels used by the tests is
:mod:`detr_deform.ops.emulation`.
"""
from detr_deform.ops._build import OpsBuildError
from detr_deform.ops._library import compiled_op_available, load_compiled_op
from detr_deform.ops.functional import Impl, ms_deform_attn
from detr_deform.ops.reference import ms_deform_attn_pytorch

__all__ = ["Impl", "ms_deform_attn", "ms_deform_attn_pytorch", "compiled_op_available", "load_compiled_op",
           "OpsBuildError"]
