"""Mask shapes: what each query of each head reads, as one object per shape.

:class:`Pattern` is the interface the rest of flexsample uses; :class:`WindowColumns` (a
window and key columns per head) is SampleAttention's shape.
"""

from .base import MaskedCall, Pattern
from .window_columns import GatheredColumns, WindowColumns

__all__ = ["GatheredColumns", "MaskedCall", "Pattern", "WindowColumns"]
