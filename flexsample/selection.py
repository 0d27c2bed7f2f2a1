"""Stage 2 — score-based filtering: per head, the fewest key blocks that reach the CRA threshold."""

from __future__ import annotations

import torch


def _check_scores(scores: object) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError("scores must be a floating-point torch.Tensor")
    if scores.dim() != 4:
        raise ValueError(
            f"scores must be (B, H, num_segments, num_blocks), got shape {tuple(scores.shape)}"
        )
    return scores


def select_blocks(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Choose the column stripes (key blocks) each head keeps, beyond window and sink.

    For every segment ``g``, the sampled rows' window and sink already hold
    ``1 - scores[..., g, :].sum()`` of their mass. Blocks are taken in order of decreasing
    sampled mass until the kept mass reaches ``alpha``, i.e. the lightest blocks are dropped
    as long as they hold at most ``1 - alpha`` together. The result is the union over segments.

    Args:
        scores: ``(B, H, num_segments, num_blocks)`` from
            :func:`~flexsample.sampling.sample_block_scores`.
        alpha: CRA threshold in ``(0, 1]``.

    Returns:
        ``(B, H, num_blocks)`` bool: True where the key block is a selected stripe.

    Raises:
        TypeError: ``scores`` is not a floating tensor.
        ValueError: wrong rank, or ``alpha`` outside ``(0, 1]``.
    """
    scores = _check_scores(scores)
    if not (0.0 < alpha <= 1.0):  # also rejects NaN
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    ordered, order = scores.sort(dim=-1, descending=True)
    cumulative = ordered.cumsum(dim=-1)
    before = cumulative - ordered  # mass of the heavier blocks already taken
    needed = cumulative[..., -1:] - (1.0 - alpha)  # uncovered mass that must be kept
    take = (before < needed) & (ordered > 0)
    chosen = torch.zeros_like(take).scatter_(-1, order, take)
    return chosen.any(dim=-2)


def kept_sampled_mass(scores: torch.Tensor, stripes: torch.Tensor) -> torch.Tensor:
    """Fraction of the sampled rows' attention mass that the mask keeps, per segment.

    Args:
        scores: ``(B, H, num_segments, num_blocks)`` sampled uncovered mass.
        stripes: ``(B, H, num_blocks)`` bool from :func:`select_blocks`.

    Returns:
        ``(B, H, num_segments)``: window + sink mass plus the mass of the selected stripes.
        Each value is at least ``alpha`` when ``stripes`` came from ``select_blocks``.
    """
    scores = _check_scores(scores)
    covered = 1.0 - scores.sum(dim=-1)
    return covered + (scores * stripes[..., None, :]).sum(dim=-1)
