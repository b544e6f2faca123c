"""ONNX export of a Deformable DETR through the pure-PyTorch attention path
(grid_sample, ONNX GridSample), and its check with onnxruntime.

The graph takes one normalised image of a fixed size and returns the raw
``pred_logits`` (1, Q, C) and ``pred_boxes`` (1, Q, 4, normalised cx, cy, w, h);
post-processing (sigmoid, top-k over query x class, boxes to pixels) is left to
the caller, as in ``detr_deform.models.postprocess.PostProcess``.

Why a fixed size: like the official code, the model turns each level's feature
shape into Python integers (per-level loops, splits and reference grids), which
the ONNX tracer records as constants; a graph exported at H x W is only valid at
H x W. torch.export (the dynamo exporter) cannot trace those data-dependent
shapes either.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from detr_deform.layers.ms_deform_attn import MSDeformAttn
from detr_deform.utils.nested_tensor import NestedTensor

INPUT_NAME = "images"
OUTPUT_NAMES = ("pred_logits", "pred_boxes")


class ExportWrapper(nn.Module):
    """(1, 3, H, W) normalised image -> (pred_logits, pred_boxes); no padding mask
    is needed for a single unpadded image."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.zeros_like(images[:, 0], dtype=torch.bool)
        outputs = self.model(NestedTensor(images, mask))
        return outputs["pred_logits"], outputs["pred_boxes"]


def use_pytorch_attention(model: nn.Module) -> None:
    """Switches every MSDeformAttn to the grid_sample implementation (the
    compiled operator has no ONNX counterpart); same results to ~1e-6."""
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.impl = "pytorch"


def export_onnx(model: nn.Module, path: str | Path, height: int, width: int, opset: int = 17) -> Path:
    """Writes ``model`` (eval mode is set) as ONNX for (1, 3, height, width) input."""
    try:  # torch's exporter needs onnx to write the file; without it, it fails deep inside (OnnxExporterError)
        import onnx  # noqa: F401
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("exporting needs onnx: pip install 'detr_deform[tools]'", name="onnx") from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    use_pytorch_attention(model)
    wrapper = ExportWrapper(model).eval()
    example = torch.zeros(1, 3, height, width)
    with warnings.catch_warnings():
        # The tracer warns about every Python int taken from a shape; that is the documented fixed-size limit.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.no_grad():
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES))
    model.eval()
    return path


def compare_with_onnxruntime(model: nn.Module, path: str | Path, images: list[torch.Tensor]) -> dict[str, float]:
    """Runs PyTorch and onnxruntime on each (3, H, W) image; returns the largest
    absolute difference of each output over all images."""
    import onnxruntime  # optional extra (tools): imported only when a check is asked for

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = ExportWrapper(model).eval()
    worst = {name: 0.0 for name in OUTPUT_NAMES}
    for image in images:
        batch = image[None].float()
        with torch.no_grad():
            expected = wrapper(batch)
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch.numpy()})
        for name, reference, value in zip(OUTPUT_NAMES, expected, got):
            difference = (torch.from_numpy(value) - reference).abs().max().item()
            worst[name] = max(worst[name], difference)
    return worst
