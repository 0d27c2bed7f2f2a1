"""flexsample: SampleAttention (adaptive structured sparse attention) on PyTorch FlexAttention.

The pipeline, each stage usable on its own::

    q, k ─► sample_column_scores ─► select_columns ─► cover_rows ─► .gathered ─► build_block_mask
        └──────────────────────────────── plan_prefill ───────────────────────────────────┘
    plan, q, k, v ─► run_plan (gather columns, compiled FlexAttention; or dense SDPA)

``plan_prefill`` also decides, from the device's cost model (:mod:`flexsample.costs`), when
a call runs dense because sparse would not pay.

:func:`flex_sample_attention` is ``plan_prefill`` then ``run_plan``, with statistics.
"""

from .api import flex_sample_attention
from .attention import (
    dense_causal_attention,
    flash_unavailable,
    flex_dense_attention,
    sparse_attention,
    sparse_attention_reference,
)
from .config import SampleConfig
from .cover import RowCover, cover_rows
from .layout import SampleLayout
from .masks import bucket_length, build_block_mask, gather_keys, pair_density, tile_coverage
from .plan import PrefillPlan, dense_before_sampling, plan_prefill, run_plan
from .sampling import (
    sample_column_scores,
    sample_column_scores_reference,
    sample_column_scores_torch,
)
from .selection import (
    ColumnSelection,
    GatheredColumns,
    keep_mask,
    kept_sampled_mass,
    select_columns,
)
from .stats import PLAN_STAGES, STAGES, SampleStats, StageTimer

__version__ = "0.4.1"

__all__ = [
    "PLAN_STAGES",
    "STAGES",
    "ColumnSelection",
    "GatheredColumns",
    "PrefillPlan",
    "RowCover",
    "SampleConfig",
    "SampleLayout",
    "SampleStats",
    "StageTimer",
    "__version__",
    "bucket_length",
    "build_block_mask",
    "cover_rows",
    "dense_before_sampling",
    "dense_causal_attention",
    "flash_unavailable",
    "flex_dense_attention",
    "flex_sample_attention",
    "gather_keys",
    "keep_mask",
    "kept_sampled_mass",
    "pair_density",
    "plan_prefill",
    "run_plan",
    "sample_column_scores",
    "sample_column_scores_reference",
    "sample_column_scores_torch",
    "select_columns",
    "sparse_attention",
    "sparse_attention_reference",
    "tile_coverage",
]
