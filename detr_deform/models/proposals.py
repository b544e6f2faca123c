"""The two-stage rule: the encoder must give at least ``num_queries`` tokens.

Two-stage Deformable DETR takes the top ``num_queries`` encoder positions (all
feature levels together) as the decoder's queries. An input too small to give that
many positions makes ``torch.topk`` fail with "selected index k out of range" —
in the official code and in Hugging Face's ``DeformableDetr`` alike (neither clamps
k). We keep the official model and refuse instead of padding the proposals: a
model whose decoder sees fewer queries than it was trained with would silently
differ from the official one. Training refuses before the first step (the data
sizes give the smallest input: ``smallest_tokens``); evaluation and inference get
``TooFewTokensError``, one line naming the input size and what to change.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from detr_deform.data.transforms import official_resize_size
from detr_deform.errors import DetrDeformError


class TooFewTokensError(DetrDeformError, ValueError):
    """Two-stage: the input gives fewer encoder tokens than there are queries."""


def encoder_tokens(height: int, width: int, strides: Sequence[int], num_feature_levels: int) -> int:
    """Encoder tokens of a (height, width) input: each backbone level has
    ceil(side / stride) positions (stride-2 convolutions with padding round up),
    each extra level half the last one's, rounded up."""
    total, h, w = 0, height, width
    for level in range(num_feature_levels):
        if level < len(strides):
            h, w = math.ceil(height / strides[level]), math.ceil(width / strides[level])
        else:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        total += h * w
    return total


def check_tokens(num_queries: int, tokens: int, input_size: tuple[int, int], what: str = "two-stage model") -> None:
    """TooFewTokensError unless an input of ``input_size`` (height, width) giving
    ``tokens`` encoder tokens has at least ``num_queries``. ``what``: the model, in the message."""
    if tokens < num_queries:
        height, width = input_size
        raise TooFewTokensError(
            f"{what} with num_queries={num_queries}, but a {width}x{height} (width x height) network "
            f"input gives only {tokens} encoder tokens to choose the proposals from; use larger images (val_size / "
            f"data.train_scales) or a model with num_queries <= {tokens}")


def smallest_tokens(sizes: Iterable[tuple[int, int]], scale: int, max_size: int, strides: Sequence[int],
                    num_feature_levels: int) -> tuple[int, tuple[int, int]]:
    """(fewest tokens, that network input's (height, width)) over images of the given
    (height, width) sizes resized with shorter side ``scale`` (longer <= ``max_size``),
    and a square of side ``scale`` (what the random-crop branch can give)."""
    square = min(scale, max_size)
    best = (encoder_tokens(square, square, strides, num_feature_levels), (square, square))
    for height, width in sizes:
        resized = official_resize_size(height, width, scale, max_size)
        tokens = encoder_tokens(*resized, strides, num_feature_levels)
        if tokens < best[0]:
            best = (tokens, resized)
    return best


def smallest_square_side(num_queries: int, strides: Sequence[int], num_feature_levels: int) -> int:
    """The smallest square input side whose encoder tokens reach ``num_queries``."""
    side = 1
    while encoder_tokens(side, side, strides, num_feature_levels) < num_queries:
        side += 1
    return side


def refuse_too_few_tokens(num_queries: int, strides: Sequence[int], num_feature_levels: int,
                          splits: dict[str, tuple[Iterable[tuple[int, int]], int]], max_size: int,
                          what: str = "model.two_stage") -> None:
    """Before training a two-stage model: TooFewTokensError (one line) unless the
    smallest input of every split — ``splits``: name -> ((height, width) of its images,
    shorter side it is resized to) — gives at least ``num_queries`` encoder tokens. ``what``: the
    key that makes the model select its queries, in the message."""
    for name, (sizes, scale) in splits.items():
        tokens, (height, width) = smallest_tokens(sizes, scale, max_size, strides, num_feature_levels)
        if tokens < num_queries:
            side = smallest_square_side(num_queries, strides, num_feature_levels)
            key = "data.train_scales" if name == "training" else "data.val_size"
            raise TooFewTokensError(
                f"{what} with model.num_queries={num_queries}, but the smallest {name} input ({width}x"
                f"{height} px at {key} {scale}, data.max_size={max_size}) gives only {tokens} encoder tokens "
                f"to take the proposals from (the top-k would fail); set model.num_queries<={tokens}, or {key} "
                f"to at least {side} (a {side}x{side} input gives {num_queries} tokens)")
