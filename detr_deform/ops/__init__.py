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
from typing import TYPE_CHECKING

from detr_deform.utils.lazy import lazy_exports

if TYPE_CHECKING:
    from detr_deform.ops._build import OpsBuildError
    from detr_deform.ops._library import compiled_op_available, load_compiled_op
    from detr_deform.ops.functional import Impl, ms_deform_attn
    from detr_deform.ops.reference import ms_deform_attn_pytorch

# Imported on first use (utils/lazy.py): `python -m detr_deform.ops --help` answers before torch loads.
__getattr__, __dir__ = lazy_exports(__name__, {
    "OpsBuildError": "detr_deform.ops._build",
    "compiled_op_available": "detr_deform.ops._library", "load_compiled_op": "detr_deform.ops._library",
    "Impl": "detr_deform.ops.functional", "ms_deform_attn": "detr_deform.ops.functional",
    "ms_deform_attn_pytorch": "detr_deform.ops.reference",
})

__all__ = ["Impl", "ms_deform_attn", "ms_deform_attn_pytorch", "compiled_op_available", "load_compiled_op",
           "OpsBuildError"]
