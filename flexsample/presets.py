"""Named configs: the selections of earlier releases, to measure today's against, and the
opt-in query-aware selection.

Each release preset is the release's selection rule (window, columns, cover) as today's code
expresses it; planning around it (the cost model, the probe, the cap on sampled rows) is
today's. Benchmarks and tests take them from here::

    from flexsample.presets import preset
    config = preset("0.3").replace(alpha=0.98)

``flexsample demo --preset 0.3``, lm-eval's ``--model_args preset=0.3`` and vLLM's
``FLEXSAMPLE_VLLM_CONFIG='{"preset": "0.3"}'`` name them too.
"""

from __future__ import annotations

from collections.abc import Mapping

from .config import SampleConfig, Selection

#: name: (config, what it is)
PRESETS: dict[str, tuple[SampleConfig, str]] = {
    "defaults": (SampleConfig(), "today's defaults (0.4 on)"),
    "0.1": (
        SampleConfig(
            min_window=128,
            selection=Selection(
                row_guarantee=False, window_ratio=0.08, column_unit="block", sink_blocks=1
            ),
        ),
        "a fixed window of 8% of the sequence, whole key blocks as columns, one sink block, "
        "alpha kept per segment",
    ),
    "0.2": (
        SampleConfig(min_window=128, selection=Selection(row_guarantee=False, group_union=True)),
        "the adaptive window from 128 tokens, single-key columns shared by each GQA group, "
        "alpha kept per segment",
    ),
    "0.3": (
        SampleConfig(min_window=128, selection=Selection(group_union=True)),
        "0.2 with every sampled row keeping alpha (the row cover)",
    ),
    "query-aware": (
        SampleConfig(alpha=0.98, min_window=128).replace(tile_keys=512, column_alpha=0.9),
        "window from 128 tokens and columns keeping 0.9 of the sampled mass, then up to 512 "
        "keys of each query tile's own until 4 rows of every tile keep 0.98",
    ),
}


def preset(name: str) -> SampleConfig:
    """The config of the preset ``name`` (a key of :data:`PRESETS`).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    try:
        return PRESETS[name][0]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: one of {', '.join(PRESETS)}") from None


#: The names :func:`config_from_fields` takes.
FIELD_NAMES: tuple[str, ...] = ("preset", *SampleConfig.field_names())


def config_from_fields(fields: Mapping[str, object]) -> SampleConfig:
    """A config from plain values, as command lines and environment variables give them:
    ``preset`` (a name in :data:`PRESETS`, the config to start from; the defaults without
    it), SampleConfig's fields and :class:`~flexsample.Selection`'s.

    Raises:
        ValueError: an unknown name (the message lists the known ones) or a bad value.
    """
    fields = dict(fields)
    unknown = sorted(set(fields) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"unknown SampleConfig fields {unknown}; known: {', '.join(FIELD_NAMES)}")
    base = preset(str(fields.pop("preset"))) if "preset" in fields else SampleConfig()
    try:
        return base.replace(**fields)
    except TypeError as error:
        raise ValueError(str(error)) from None
