"""flexsample: SampleAttention (adaptive structured sparse attention) on PyTorch FlexAttention.

The pipeline, each stage usable on its own::

    q, k ─► sample_block_scores ─► select_blocks ─► block_layout ─► block_mask_from_layout
        └──────────────────────── plan_prefill ─────────────────────────────────┘
    plan, q, k, v ─► run_plan (compiled FlexAttention, or dense SDPA)

:func:`flex_sample_attention` is ``plan_prefill`` then ``run_plan``, with statistics.
"""

from .api import flex_sample_attention
from .attention import dense_causal_attention, sparse_attention, sparse_attention_reference
from .config import SampleConfig
from .layout import SampleLayout
from .masks import block_layout, block_mask_from_layout, build_block_mask, density
from .plan import PrefillPlan, plan_prefill, run_plan
from .sampling import (
    sample_block_scores,
    sample_block_scores_reference,
    sample_block_scores_torch,
)
from .selection import kept_sampled_mass, select_blocks
from .stats import SampleStats, StageTimer

__version__ = "0.1.0"

__all__ = [
    "PrefillPlan",
    "SampleConfig",
    "SampleLayout",
    "SampleStats",
    "StageTimer",
    "__version__",
    "block_layout",
    "block_mask_from_layout",
    "build_block_mask",
    "dense_causal_attention",
    "density",
    "flex_sample_attention",
    "kept_sampled_mass",
    "plan_prefill",
    "run_plan",
    "sample_block_scores",
    "sample_block_scores_reference",
    "sample_block_scores_torch",
    "select_blocks",
    "sparse_attention",
    "sparse_attention_reference",
]
