"""Small configurations shared by the model tests."""
import torch

from detr_deform import ModelConfig

TINY = dict(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=64,
            num_queries=12, num_classes=5, dropout=0.0)

VARIANTS = {
    "multi_scale": {},
    "single_scale": {"num_feature_levels": 1},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
}


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides}).validate()


def random_targets(batch_sizes, num_classes=5, generator=None):
    g = generator or torch.Generator().manual_seed(0)
    targets = []
    for count in batch_sizes:
        centres = torch.rand(count, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (count,), generator=g),
                        "boxes": torch.cat([centres, sizes], -1)})
    return targets
