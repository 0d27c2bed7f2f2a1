import dataclasses
import math
import re

import pytest

from flexsample import SampleConfig, SampleLayout, Selection
from flexsample.presets import PRESETS, config_from_fields, preset


def test_defaults_follow_the_paper():
    c = SampleConfig()
    assert c.alpha == 0.95 and c.sample_ratio == 0.05 and c.block_size == 128
    assert c.max_sampled_rows == 4096  # binds from about 80K tokens on
    # 0.2 on: the window adapts per head, columns are single tokens, the sink is a column;
    # 0.3 on: every sampled row keeps alpha; 0.4 on: each query head reads its own columns
    assert c.selection == Selection(row_guarantee=True, group_union=False, window_ratio=None)
    assert c.selection.column_unit == "token" and c.selection.sink_blocks == 0


@pytest.mark.parametrize(
    "field, value, error, words",
    [
        ("alpha", 0.0, ValueError, "alpha must lie in (0.0, 1.0]"),
        ("alpha", 1.5, ValueError, "alpha must lie in"),
        ("alpha", -0.1, ValueError, "alpha"),
        ("alpha", math.nan, ValueError, "alpha is NaN"),
        ("alpha", "0.9", TypeError, "alpha must be a real number"),
        ("sample_ratio", 0.0, ValueError, "sample_ratio"),
        ("sample_ratio", math.nan, ValueError, "sample_ratio is NaN"),
        ("window_ratio", 1.01, ValueError, "window_ratio"),
        ("window_ratio", math.inf, ValueError, "window_ratio"),
        ("max_sampled_rows", 0, ValueError, "max_sampled_rows must be >= 1"),
        ("max_sampled_rows", 100.0, TypeError, "max_sampled_rows must be an int"),
        ("num_segments", 0, ValueError, "num_segments must be >= 1"),
        ("num_segments", 2.0, TypeError, "num_segments must be an int"),
        ("num_segments", True, TypeError, "num_segments must be an int"),
        ("min_window", -1, ValueError, "min_window"),
        ("sink_blocks", -1, ValueError, "sink_blocks"),
        ("block_size", 8, ValueError, "block_size must be >= 16"),
        ("block_size", 96, ValueError, "block_size must be a power of two"),
        ("min_seq_len", -5, ValueError, "min_seq_len"),
        ("min_seq_len", 1.5, TypeError, "min_seq_len must be an int"),
        ("max_density", 0.0, ValueError, "max_density must lie in"),
        ("max_density", 1.5, ValueError, "max_density must lie in"),
        ("max_density", "high", TypeError, "max_density must be a real number"),
        ("row_guarantee", "yes", TypeError, "row_guarantee must be a bool"),
        ("group_union", 1, TypeError, "group_union must be a bool"),
        ("sampler", "cuda", ValueError, "sampler must be one of"),
        ("column_unit", "tile", ValueError, "column_unit must be one of"),
    ],
)
def test_bad_config_names_the_field(field, value, error, words):
    selection = field in {f.name for f in dataclasses.fields(Selection)}
    with pytest.raises(error, match=re.escape(words)):
        if selection:
            Selection(**{field: value})
        else:
            SampleConfig(**{field: value})
    with pytest.raises(error, match=re.escape(f"SampleConfig.{'selection.' * selection}{field}")):
        SampleConfig().replace(**{field: value})


def test_config_from_plain_fields_and_presets():
    assert config_from_fields({}) == SampleConfig()
    config = config_from_fields({"preset": "0.3", "alpha": 0.9, "row_guarantee": False})
    assert config == preset("0.3").replace(alpha=0.9, row_guarantee=False)
    assert config.selection.group_union and not config.selection.row_guarantee
    with pytest.raises(
        ValueError, match="unknown SampleConfig fields \\['alhpa'\\]; known: preset"
    ):
        config_from_fields({"alhpa": 0.9})
    with pytest.raises(ValueError, match=re.escape("unknown preset '0.9': one of defaults, 0.1")):
        config_from_fields({"preset": "0.9"})
    with pytest.raises(ValueError, match=re.escape("SampleConfig.selection.window_ratio must")):
        config_from_fields({"window_ratio": 2})
    with pytest.raises(TypeError, match=re.escape("SampleConfig.selection must be a Selection")):
        SampleConfig(selection={"row_guarantee": False})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_distinct_and_documented(name):
    config, text = PRESETS[name]
    assert isinstance(config, SampleConfig) and len(text) > 20
    others = [c for n, (c, _) in PRESETS.items() if n != name]
    assert config not in others


def test_replace_validates():
    with pytest.raises(ValueError, match="alpha"):
        SampleConfig().replace(alpha=2.0)
    assert SampleConfig().replace(alpha=0.9).alpha == 0.9


def test_frozen():
    with pytest.raises(AttributeError):
        SampleConfig().alpha = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("seq_len", [1, 127, 128, 1000, 4096, 32771])
def test_layout_geometry(seq_len):
    c = SampleConfig()
    lay = SampleLayout.create(seq_len, c)
    assert lay.num_blocks == math.ceil(seq_len / c.block_size)
    floor = math.ceil(c.min_window / c.block_size)
    assert lay.fixed_window_blocks is None and lay.min_window_blocks == min(floor, lay.num_blocks)
    fixed = SampleLayout.create(seq_len, c.replace(window_ratio=0.08))
    window = max(c.min_window, math.ceil(0.08 * seq_len))
    assert min(fixed.num_blocks, window / c.block_size) <= fixed.fixed_window_blocks
    rows = lay.sampled_rows()
    assert rows.shape == (lay.num_segments, lay.rows_per_segment)
    assert int(rows.max()) == seq_len - 1  # the last row is always sampled
    assert int(rows.min()) >= 0
    assert bool((rows.diff(dim=1) == 1).all())  # each segment samples a contiguous tail
    assert len(set(rows.flatten().tolist())) == rows.numel()  # no row sampled twice
    ends = lay.segment_ends()
    assert rows[:, -1].tolist() == [e - 1 for e in ends]


@pytest.mark.parametrize("cap", [1, 7, 100, 2048])
def test_max_sampled_rows_caps_the_rows_but_keeps_one_per_segment(cap):
    S = 131072
    free = SampleLayout.create(S, SampleConfig(max_sampled_rows=None))
    capped = SampleLayout.create(S, SampleConfig(max_sampled_rows=cap))
    assert free.num_sampled_rows == 8 * math.ceil(0.05 * S / 8)  # 6560: the ratio alone
    assert capped.num_sampled_rows == 8 * max(1, cap // 8)
    assert int(capped.sampled_rows().max()) == S - 1
    short = SampleLayout.create(1000, SampleConfig(max_sampled_rows=2048))
    assert short.num_sampled_rows == SampleLayout.create(1000, SampleConfig()).num_sampled_rows
