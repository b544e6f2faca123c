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


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Noise on every parameter (tied ones once, so ties stay) and frozen-BN statistic, so that
    nothing is trivially zero or one (zero-initialised biases, identity BatchNorm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif b.is_floating_point():
                b.add_(torch.randn(b.shape, generator=g) * 0.1)
