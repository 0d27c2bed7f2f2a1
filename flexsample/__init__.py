"""flexsample: SampleAttention (adaptive structured sparse attention) on PyTorch FlexAttention.

The pipeline, each stage usable on its own::

    q, k ─► sample_block_scores ─► select_blocks ─► build_block_mask ─► flex_attention

:func:`flex_sample_attention` runs all of it.
"""

from .api import flex_sample_attention
from .attention import dense_causal_attention, sparse_attention, sparse_attention_reference
from .config import SampleConfig
from .layout import SampleLayout
from .masks import block_layout, block_mask_from_layout, build_block_mask, density
from .sampling import (
    sample_block_scores,
    sample_block_scores_reference,
    sample_block_scores_torch,
)
from .selection import kept_sampled_mass, select_blocks
from .stats import SampleStats

__version__ = "0.1.0"

__all__ = [
    "SampleConfig",
    "SampleLayout",
    "SampleStats",
    "__version__",
    "block_layout",
    "block_mask_from_layout",
    "build_block_mask",
    "dense_causal_attention",
    "density",
    "flex_sample_attention",
    "kept_sampled_mass",
    "sample_block_scores",
    "sample_block_scores_reference",
    "sample_block_scores_torch",
    "select_blocks",
    "sparse_attention",
    "sparse_attention_reference",
]
