"""Pictures of what SampleAttention chose: tile coverage, sampled column scores, density heat maps.

Needs matplotlib (``pip install flexsample[viz]``); it is imported when a function runs.
Every function draws from tensors the library returns (:class:`~flexsample.SampleStats`
fields), so a picture shows a real run, returns the matplotlib ``Figure``, and with ``path``
saves it there (PNG).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # matplotlib is optional and imported only when a picture is drawn
    from matplotlib.figure import Figure

    from .stats import SampleStats


def _check_matrix(x: torch.Tensor, name: str, axes: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be {axes}, got {tuple(x.shape)}")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("flexsample's pictures need matplotlib: pip install matplotlib") from e
    return plt


def plot_tile_layouts(
    layouts: Sequence[torch.Tensor],
    titles: Sequence[str],
    *,
    columns: int = 4,
    path: str | Path | None = None,
) -> Figure:
    """A grid of tile layouts: how much of each ``(query block, key block)`` tile is computed.

    Args:
        layouts: ``(N, N)`` tensors in ``[0, 1]`` (bool or float), e.g.
            ``stats.tile_coverage()[b, h]``: 1 for window tiles, the share of gathered
            columns for tiles before the window.
        titles: one per layout (say which layer, head and density).
        columns: pictures per row.

    Raises:
        ValueError: ``layouts`` and ``titles`` differ in length, or a layout is not square.
    """
    if len(layouts) != len(titles) or not layouts:
        raise ValueError(f"need one title per layout, got {len(layouts)} and {len(titles)}")
    plt = _pyplot()
    rows = -(-len(layouts) // columns)
    cols = min(columns, len(layouts))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, layout, title in zip(axes.flat, layouts, titles, strict=False):
        if layout.dim() != 2 or layout.shape[0] != layout.shape[1]:
            raise ValueError(f"a tile layout must be (N, N), got {tuple(layout.shape)}")
        ax.imshow(layout.cpu().float(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)


def plot_layer_masks(
    stats_by_layer: dict[int, SampleStats],
    *,
    heads: int = 3,
    path: str | Path | None = None,
) -> Figure:
    """The tile layouts of the first ``heads`` heads of some layers, one row per layer.

    Args:
        stats_by_layer: ``{layer: stats}`` of sparse calls (batch row 0 is drawn).
        heads: heads per layer.

    Raises:
        ValueError: no layers, or a stats object of a dense call (it has no tile layout).
    """
    layouts, titles = [], []
    for layer, stats in stats_by_layer.items():
        tiles = stats.tile_coverage()
        if tiles is None or stats.density is None:
            raise ValueError(f"layer {layer} ran dense: it has no tile layout to draw")
        for head in range(min(heads, tiles.shape[1])):
            layouts.append(tiles[0, head])
            titles.append(f"layer {layer} head {head}: density {float(stats.density[0, head]):.2f}")
    if not layouts:
        raise ValueError("stats_by_layer is empty: nothing to draw")
    return plot_tile_layouts(layouts, titles, columns=heads, path=path)


def plot_column_scores(
    scores: torch.Tensor,
    title: str = "",
    *,
    bins: int = 512,
    path: str | Path | None = None,
) -> Figure:
    """Sampled mass per key for each query segment of one head (stage 1 output).

    Keys are max-pooled into at most ``bins`` bins so that single heavy tokens stay visible;
    colours are logarithmic.

    Args:
        scores: ``(num_segments, S)``, e.g. ``stats.scores[b, h]``.
        title: figure title.
        bins: most key bins drawn.

    Raises:
        ValueError: ``scores`` is not 2-D.
    """
    _check_matrix(scores, "scores", "(num_segments, S)")
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    S = scores.shape[1]
    width = -(-S // bins)
    pooled = torch.nn.functional.max_pool1d(scores.float().cpu()[None], width, ceil_mode=True)[0]
    floor = max(float(pooled.max()) * 1e-4, 1e-12)
    fig, ax = plt.subplots(figsize=(8, 3))
    image = ax.imshow(
        pooled.clamp_min(floor),
        aspect="auto",
        cmap="magma",
        interpolation="nearest",
        norm=LogNorm(vmin=floor, vmax=max(float(pooled.max()), floor * 10)),
        extent=(0, S, scores.shape[0], 0),
    )
    ax.set_xlabel(f"key position (max over {width} tokens per pixel column)")
    ax.set_ylabel("query segment")
    ax.set_title(title or "sampled attention mass per key", fontsize=10)
    fig.colorbar(image, ax=ax, label="mass")
    fig.tight_layout()
    return _save(fig, path)


def plot_density_heatmap(
    density: torch.Tensor, title: str = "", *, path: str | Path | None = None
) -> Figure:
    """Density (share of causal (query, key) pairs computed) per layer and head.

    Args:
        density: ``(layers, heads)`` in ``[0, 1]``.
        title: figure title.

    Raises:
        ValueError: ``density`` is not 2-D.
    """
    _check_matrix(density, "density", "(layers, heads)")
    plt = _pyplot()
    layers, heads = density.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * heads + 2), max(3, 0.22 * layers + 1)))
    image = ax.imshow(density.cpu().float(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_title(title or "density per layer and head")
    fig.colorbar(image, ax=ax, label="share of causal pairs computed")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig
