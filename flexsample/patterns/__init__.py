"""Mask shapes: what each query of each head reads, as one object per shape.

:class:`Pattern` is the interface the rest of flexsample uses; :class:`WindowColumns` (a
window and key columns per head) is SampleAttention's shape; :class:`TileKeys` adds, per
query tile, the keys that tile's rows need beyond it (query-aware selection).
"""

from .base import MaskedCall, Pattern
from .tile_keys import TileKeys
from .window_columns import GatheredColumns, WindowColumns

__all__ = ["GatheredColumns", "MaskedCall", "Pattern", "TileKeys", "WindowColumns"]
