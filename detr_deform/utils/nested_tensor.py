"""A padded batch of images with its padding mask."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class NestedTensor:
    """tensors (B, C, H, W) padded bottom/right with zeros; mask (B, H, W), True at padding."""

    tensors: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> NestedTensor:
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking),
                            self.mask.to(device, non_blocking=non_blocking))


def nested_tensor_from_tensor_list(images: list[torch.Tensor]) -> NestedTensor:
    """Pads a list of (C, H_i, W_i) images to (B, C, max H, max W) and builds the mask."""
    if not images:
        raise ValueError("expected at least one image, got an empty list")
    for index, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image {index}: expected a (C, H, W) tensor, got {shape}")
        if image.shape[0] != images[0].shape[0]:
            raise ValueError(
                f"image {index} has {image.shape[0]} channels but image 0 has {images[0].shape[0]}"
            )
    channels = images[0].shape[0]
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    first = images[0]
    tensors = torch.zeros((len(images), channels, height, width), dtype=first.dtype, device=first.device)
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for image, padded, padded_mask in zip(images, tensors, mask):
        padded[:, : image.shape[1], : image.shape[2]].copy_(image)
        padded_mask[: image.shape[1], : image.shape[2]] = False
    return NestedTensor(tensors, mask)


def mask_to_feature(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool image mask -> (B, h, w) by nearest interpolation (official)."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]
