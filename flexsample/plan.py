"""Plan a prefill, then run it: the whole pipeline as two calls.

:func:`plan_prefill` decides *what* to compute (layout → sampled scores → selected stripes →
tile layout → ``BlockMask``, or the dense path and why); :func:`run_plan` computes it.
:func:`~flexsample.flex_sample_attention` is these two calls plus statistics, and the
benchmarks time exactly these functions, so the numbers they report are the shipped code's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask

from .attention import dense_causal_attention, sparse_attention
from .config import SampleConfig
from .layout import SampleLayout
from .masks import block_layout, block_mask_from_layout, density
from .sampling import resolve_sampler, run_sampler
from .selection import kept_sampled_mass, select_blocks
from .stats import Path, StageTimer
from .validation import check_qk, resolve_scale

logger = logging.getLogger("flexsample")
_DEFAULT_CONFIG = SampleConfig()
_logged_kinds: set[str] = set()


@dataclass(frozen=True, eq=False)
class PrefillPlan:
    """What SampleAttention decided for one causal prefill (the result of :func:`plan_prefill`).

    Attributes:
        path: ``"sparse"`` (run the block mask) or ``"dense"`` (run dense causal SDPA).
        reason: why the dense path was chosen; None on the sparse path.
        seq_len, batch_size, num_heads: ``S``, ``B`` and ``Hq`` of the planned call.
        scale: the softmax scale the plan was made with (and :func:`run_plan` uses).
        config: the settings the plan was made with.
        notes: what about this length and config limits sparsity (see
            :meth:`SampleLayout.notes`); empty when nothing does.
        layout: block geometry (None on the dense path).
        sampler: stage-1 implementation that ran (None on the dense path).
        scores: ``(B, Hq, num_segments, num_blocks)`` sampled block scores.
        stripes: ``(B, Hq, num_blocks)`` bool, the selected column stripes.
        tiles: ``(B, Hq, num_blocks, num_blocks)`` bool, the tiles computed.
        block_mask: the FlexAttention ``BlockMask`` built from ``tiles``.
    """

    path: Path
    seq_len: int
    batch_size: int
    num_heads: int
    scale: float
    config: SampleConfig
    reason: str | None = None
    notes: tuple[str, ...] = ()
    layout: SampleLayout | None = None
    sampler: str | None = None
    scores: torch.Tensor | None = None
    stripes: torch.Tensor | None = None
    tiles: torch.Tensor | None = None
    block_mask: BlockMask | None = None

    @property
    def density(self) -> torch.Tensor | None:
        """``(B, Hq)`` fraction of causal tiles computed; None on the dense path."""
        return None if self.tiles is None else density(self.tiles)

    def kept_sampled_mass(self) -> torch.Tensor | None:
        """``(B, Hq)`` smallest, over segments, sampled mass the mask keeps (None if dense)."""
        if self.scores is None or self.stripes is None:
            return None
        return kept_sampled_mass(self.scores, self.stripes).amin(dim=-1)


def plan_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SampleConfig | None = None,
    *,
    scale: float | None = None,
    timer: StageTimer | None = None,
) -> PrefillPlan:
    """Decide how to compute causal attention for one prefill: sparse (and which tiles) or dense.

    Runs stages 1–2 and builds the mask: sample the attention of a few query rows, select per
    head the key blocks holding ``config.alpha`` of their mass, add the local window and the
    sink, and build the ``BlockMask``. Sequences shorter than ``config.min_seq_len`` get a
    dense plan (with its reason) and cost nothing.

    Args:
        q: ``(B, Hq, S, D)`` queries.
        k: ``(B, Hkv, S, D)`` keys, ``Hq % Hkv == 0``.
        config: method settings; ``SampleConfig()`` if None.
        scale: softmax scale; ``1/sqrt(D)`` if None.
        timer: records the seconds of the ``sample``, ``select`` and ``mask`` stages.

    Returns:
        A frozen :class:`PrefillPlan`; pass it to :func:`run_plan` with the same q, k and v.

    Raises:
        TypeError, ValueError: bad inputs or config (see :func:`flexsample.flex_sample_attention`).
    """
    config = _DEFAULT_CONFIG if config is None else config
    if not torch.compiler.is_compiling():
        if not isinstance(config, SampleConfig):
            raise TypeError(f"config must be a SampleConfig, got {type(config).__name__}")
        check_qk(q, k)
    scale = resolve_scale(q, scale)
    timer = timer or StageTimer(q.device, enabled=False)
    B, Hq, S, _ = q.shape
    common = {"seq_len": S, "batch_size": B, "num_heads": Hq, "scale": scale, "config": config}

    if S < config.min_seq_len:
        reason = f"seq_len {S} < min_seq_len {config.min_seq_len}"
        _log_once("min_seq_len", logging.INFO, "flexsample: dense attention (%s)", reason)
        return PrefillPlan(path="dense", reason=reason, **common)

    layout = SampleLayout.create(S, config)
    notes = layout.notes()
    for field, note in notes.items():
        _log_once(field, logging.WARNING, "flexsample: %s", note)
    sampler = resolve_sampler(config.sampler, q.device)
    with timer.stage("sample"):
        scores = run_sampler(sampler, q, k, layout, scale)
    with timer.stage("select"):
        stripes = select_blocks(scores, config.alpha)
    with timer.stage("mask"):
        tiles = block_layout(stripes, layout)
        block_mask = block_mask_from_layout(tiles, S, layout.block_size, check=False)
    return PrefillPlan(
        path="sparse",
        notes=tuple(notes.values()),
        layout=layout,
        sampler=sampler,
        scores=scores,
        stripes=stripes,
        tiles=tiles,
        block_mask=block_mask,
        **common,
    )


def run_plan(plan: PrefillPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Compute the attention a plan decided: compiled block-sparse FlexAttention, or dense SDPA.

    Args:
        plan: from :func:`plan_prefill` on these ``q`` and ``k``.
        q: ``(B, Hq, S, D)``.
        k: ``(B, Hkv, S, D)``.
        v: ``(B, Hkv, S, D)``.

    Returns:
        ``(B, Hq, S, D)`` in q's dtype.

    Raises:
        ValueError: ``q`` does not have the batch size, heads and length the plan was made for.
    """
    if not torch.compiler.is_compiling():
        B, Hq, S, _ = q.shape
        if (B, Hq, S) != (plan.batch_size, plan.num_heads, plan.seq_len):
            raise ValueError(
                f"the plan is for (B, Hq, S) = ({plan.batch_size}, {plan.num_heads}, "
                f"{plan.seq_len}), got q of shape {tuple(q.shape)}"
            )
    if plan.path == "dense":
        return dense_causal_attention(q, k, v, plan.scale)
    return sparse_attention(q, k, v, plan.block_mask, plan.scale)


def _log_once(kind: str, level: int, message: str, *args: object) -> None:
    """Log ``message`` the first time something of this ``kind`` happens in the process."""
    if kind not in _logged_kinds:
        _logged_kinds.add(kind)
        logger.log(level, message, *args)
