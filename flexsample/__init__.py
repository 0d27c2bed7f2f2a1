"""flexsample: SampleAttention (adaptive structured sparse attention) on PyTorch FlexAttention.

The pipeline, each stage usable on its own::

    q, k ─► sample_column_scores ─► select_columns ─► cover_rows ─► pattern.compile
        └─────────────────────────── plan_prefill ──────────────────────────────┘
    plan, q, k, v ─► run_plan (compiled FlexAttention over the pattern's mask, the pattern's
                               gathered products on the CPU, or dense)

Selection returns a pattern (:class:`WindowColumns`: a window and key columns per head;
with ``Selection.tile_keys``, :class:`TileKeys`: and each query tile's own keys), the one
object that knows the mask's shape (:mod:`flexsample.patterns`).

``plan_prefill`` also decides, from the device's cost model (:mod:`flexsample.costs`), when
a call runs dense because sparse would not pay.

:func:`flex_sample_attention` is ``plan_prefill`` then ``run_plan``, with statistics.
"""

from . import calibration  # noqa: F401 - installs the first-use calibration
from .api import flex_sample_attention
from .attention import (
    dense_causal_attention,
    flex_dense_attention,
    sparse_attention,
    sparse_attention_reference,
)
from .backends import flash_unavailable
from .config import SampleConfig, Selection
from .cover import RowCover, cover_rows
from .layout import SampleLayout, bucket_length
from .patterns import GatheredColumns, MaskedCall, Pattern, TileKeys, WindowColumns
from .plan import PrefillPlan, dense_before_sampling, plan_prefill, run_plan
from .sampling import (
    sample_column_scores,
    sample_column_scores_reference,
    sample_column_scores_torch,
)
from .selection import select_columns
from .stats import PLAN_STAGES, STAGES, SampleStats
from .timing import StageTimer
from .version import __version__

__all__ = [
    "PLAN_STAGES",
    "STAGES",
    "GatheredColumns",
    "MaskedCall",
    "Pattern",
    "PrefillPlan",
    "RowCover",
    "SampleConfig",
    "SampleLayout",
    "SampleStats",
    "Selection",
    "StageTimer",
    "TileKeys",
    "WindowColumns",
    "__version__",
    "bucket_length",
    "cover_rows",
    "dense_before_sampling",
    "dense_causal_attention",
    "flash_unavailable",
    "flex_dense_attention",
    "flex_sample_attention",
    "plan_prefill",
    "run_plan",
    "sample_column_scores",
    "sample_column_scores_reference",
    "sample_column_scores_torch",
    "select_columns",
    "sparse_attention",
    "sparse_attention_reference",
]
