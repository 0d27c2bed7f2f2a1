"""The cost model: when a call runs dense instead of sparse, and where its numbers come from."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import flexsample as fs
from flexsample import calibration, costs
from flexsample.backends import resolve_backend
from flexsample.layout import window_pairs
from flexsample.probe import probe_rows
from flexsample.synthetic import planted_qkv
from flexsample.tuning import PLAN_SHARE_AFTER_SELECT

# Made-up rates with the shape of a real device: dense and sparse cost the same per pair,
# planning a few milliseconds.
MODEL = costs.CostModel(
    device="test device",
    kind="cpu",
    dtype="float32",
    dense_fixed_s=1e-3,
    dense_pair_s=2e-11,
    plan_fixed_s=5e-3,
    plan_token_s=0.0,
    plan_pair_s=5e-11,
    sparse_fixed_s=5e-3,
    sparse_pair_s=2e-11,
    source="test",
)


@pytest.fixture
def model(monkeypatch):
    """Make plan_prefill use a given cost model; returns a setter."""

    def use(m: costs.CostModel) -> None:
        monkeypatch.setattr("flexsample.plan.cost_model", lambda device, dtype, backend="triton": m)

    use(MODEL)
    return use


def test_fit_recovers_rates_and_stays_non_negative():
    assert calibration.fit_rates([((0.0,), 2.0), ((1.0,), 5.0), ((3.0,), 11.0)]) == pytest.approx(
        (2, 3)
    )
    fixed, rate = calibration.fit_rates(
        [((1.0,), 5.0), ((2.0,), 4.0)]
    )  # noise: time falls with work
    # The fixed cost alone, fitted in relative terms: sum(1/y) / sum(1/y^2).
    assert rate == 0.0 and fixed == pytest.approx(0.45 / 0.1025)
    # A small fixed cost that decides the short lengths survives a long length's weight
    # (an absolute fit loses it: 1e-3 against 1e-1 of seconds).
    points = [((w,), 4e-4 + 1e-9 * w) for w in (1e5, 1e6, 1e8)]
    assert calibration.fit_rates(points) == pytest.approx((4e-4, 1e-9), rel=1e-6)
    # Two terms over many decades, as planning's keys and (row, key) products.
    points = [((s, s * s * 1e3), 1e-3 + 2e-8 * s + 3e-14 * s * s * 1e3) for s in (2e3, 8e3, 3e4)]
    assert calibration.fit_rates(points) == pytest.approx((1e-3, 2e-8, 3e-14), rel=1e-6)


def test_short_sequences_run_dense_without_planning(model):
    q, k, v = planted_qkv(1, 4, 2, 1024, 32, stripes=4, stripe_width=1)
    out, stats = fs.flex_sample_attention(q, k, v, return_stats=True)
    assert stats.path == "dense" and stats.reason.startswith("seq_len 1024: planning")
    assert "test device" in stats.reason
    assert set(stats.times) == {"attention"}  # nothing was sampled
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(out, ref, atol=1e-6)


def test_a_dense_length_is_decided_once_per_shape_and_cost_model(model):
    q, k, _ = planted_qkv(1, 4, 2, 1024, 32, stripes=4, stripe_width=1)
    first = fs.plan_prefill(q, k)
    assert first.path == "dense"
    assert fs.plan_prefill(q, k) is first  # the same shape: the same plan, made once
    assert fs.plan_prefill(q, k, scale=0.1) is not first  # another scale is another plan
    assert fs.plan_prefill(q[:, :, :1000], k[:, :, :1000]) is not first
    # Other kv heads are another probe's cost, so another decision.
    assert fs.plan_prefill(q, k.repeat_interleave(2, dim=1)) is not first
    # A new cost model (a calibration) decides again: here sparse pays.
    model(dataclasses.replace(MODEL, dense_pair_s=2e-9))
    assert fs.plan_prefill(q, k).path == "sparse"


def test_long_enough_sequences_are_planned(model):
    # Dense ten times dearer per pair: sparse pays from short lengths on.
    model(dataclasses.replace(MODEL, dense_pair_s=2e-10))
    q, k, v = planted_qkv(1, 4, 2, 2048, 32, stripes=4, stripe_width=1)
    _, stats = fs.flex_sample_attention(q, k, v, return_stats=True)
    assert stats.path == "sparse", stats.reason


def test_a_length_where_the_probe_costs_too_much_of_dense_runs_dense(model):
    # Sparse pays (dense ten times dearer per pair), but the probe would cost 10 ms of dense
    # attention's ~54 ms: more than the PROBE_SHARE a diffuse input may lose to it.
    model(dataclasses.replace(MODEL, dense_pair_s=2e-10, probe_fixed_s=1e-2, probe_pair_s=0.0))
    q, k, v = planted_qkv(1, 4, 2, 2048, 32, stripes=4, stripe_width=1)
    _, stats = fs.flex_sample_attention(q, k, v, return_stats=True)
    assert stats.path == "dense", stats.reason
    assert stats.reason.startswith("seq_len 2048: the probe ~10 ms is 18% of dense ~54.")
    assert set(stats.times) == {"attention"}  # not even the probe ran
    # Without the probe (max_density=1.0) its cost does not count.
    assert fs.plan_prefill(q, k, fs.SampleConfig(max_density=1.0)).path == "sparse"
    # A probe within its share is planned.
    model(dataclasses.replace(MODEL, dense_pair_s=2e-10, probe_fixed_s=1e-3, probe_pair_s=0.0))
    assert fs.plan_prefill(q, k).path == "sparse"


def test_diffuse_attention_runs_dense_at_the_probe(model):
    model(dataclasses.replace(MODEL, dense_pair_s=2e-10, sparse_pair_s=4e-10))
    # Random q/k: diffuse attention; the probed rows need most of their keys.
    q, k, v = (torch.randn(1, h, 2048, 32) for h in (4, 2, 2))
    # A 128-token floor: with the default 512 the sparsest call at 2K would not pay, and the
    # length alone would decide before the probe.
    config = fs.SampleConfig(min_window=128)
    out, stats = fs.flex_sample_attention(q, k, v, config=config, return_stats=True)
    assert stats.path == "dense" and stats.reason.startswith(
        "probe: 8 rows per head put the least density at "
    )
    assert "would not beat dense" in stats.reason
    assert set(stats.times) == {"probe", "attention"}  # nothing was sampled
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(out, ref, atol=1e-6)


def test_too_dense_a_selection_runs_dense_after_planning(model, monkeypatch):
    # Sparse a little dearer per pair than dense: a plan at 0.8 would pay, the selection's
    # density on random q/k (about 1.0) does not.
    model(
        dataclasses.replace(MODEL, dense_pair_s=2e-10, sparse_pair_s=2.2e-10, sparse_fixed_s=1e-3)
    )
    q, k, v = (torch.randn(1, h, 2048, 32) for h in (4, 2, 2))
    # A probe that (wrongly) estimates 0.4 (0.8 as the verdict weighs it, SELECTION_OVER_PROBE
    # times that): the verdict after selection must still catch it.
    monkeypatch.setattr("flexsample.plan.probe_density", lambda *a, **kw: torch.full((1, 4), 0.4))
    out, stats = fs.flex_sample_attention(q, k, v, return_stats=True)
    assert stats.path == "dense" and stats.reason.startswith("density ")
    assert "would not beat dense" in stats.reason
    assert {"probe", "sample", "select", "attention"} <= set(stats.times)  # planning was paid for
    assert stats.mean_density == 1.0
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(out, ref, atol=1e-6)


def test_the_probe_verdict_weighs_the_selection_it_expects(model, monkeypatch):
    # The probe's estimate is a lower bound; the selection comes out about twice as dense on
    # real attention (tuning.SELECTION_OVER_PROBE, 1.7). At 0.6 a plan would pay, at 1.0 not.
    model(
        dataclasses.replace(
            MODEL, dense_pair_s=2e-10, sparse_pair_s=3e-10, sparse_fixed_s=1e-4,
            plan_fixed_s=1e-4, plan_pair_s=0.0,
        )
    )  # fmt: skip
    monkeypatch.setattr("flexsample.plan.probe_density", lambda *a, **kw: torch.full((1, 4), 0.6))
    q, k, _ = planted_qkv(1, 4, 2, 2048, 32, stripes=4, stripe_width=1)
    plan = fs.plan_prefill(q, k)
    assert plan.path == "dense"
    assert "a call at 1.7x that density" in plan.reason and "would not beat dense" in plan.reason
    monkeypatch.setattr("flexsample.plan.SELECTION_OVER_PROBE", 1.0)  # the estimate as it is
    assert fs.plan_prefill(q, k).path == "sparse"


def test_explicit_limits_override_the_cost_model(model):
    model(dataclasses.replace(MODEL, plan_fixed_s=10.0))  # planning never pays
    q, k, _ = planted_qkv(1, 4, 2, 2048, 32, stripes=4, stripe_width=1)
    plan = fs.plan_prefill(q, k, fs.SampleConfig(min_seq_len=1024, max_density=1.0))
    assert plan.path == "sparse"
    plan = fs.plan_prefill(q, k, fs.SampleConfig(min_seq_len=1024, max_density=0.001))
    # Caught by the probe already: the probed rows need more than 0.1% of their keys.
    assert plan.path == "dense" and plan.reason.startswith("probe: ")
    assert "> max_density 0.001" in plan.reason


@pytest.fixture
def fresh_costs(monkeypatch):
    """The cost models read anew in the test, and again after it (its files are gone); no
    forced table (``make test-foreign`` sets one for the rest of the suite)."""
    monkeypatch.delenv(costs.FORCED_TABLE_ENV, raising=False)
    costs.clear_cache()
    yield
    costs.clear_cache()


def test_lookup_prefers_calibration_then_builtin_then_generic(tmp_path, monkeypatch, fresh_costs):
    monkeypatch.setenv("FLEXSAMPLE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(costs, "device_name", lambda device: "a device nobody measured")
    costs.clear_cache()
    generic = costs.cost_model(torch.device("cpu"), torch.float32)
    assert generic.kind == "cpu" and "not on a device nobody measured" in generic.source
    mine = dataclasses.replace(MODEL, device="a device nobody measured")
    path = costs.save(mine)
    assert path == tmp_path / "costs.json"
    found = costs.cost_model(torch.device("cpu"), torch.float32)
    assert found.dense_pair_s == MODEL.dense_pair_s and found.source.startswith("calibrated")
    # Saving again replaces the entry instead of adding a second one.
    costs.save(dataclasses.replace(mine, dense_pair_s=1.0))
    assert len(json.loads(path.read_text())["models"]) == 1
    assert costs.cost_model(torch.device("cpu"), torch.float32).dense_pair_s == 1.0
    costs.clear_cache()


def test_builtin_table_covers_cpu_and_cuda():
    entries = json.loads(costs.BUILTIN.read_text())["models"]
    have = {(e["kind"], e["dtype"]) for e in entries}
    wanted = {("cpu", d) for d in ("float32", "bfloat16", "float16")}
    wanted |= {("cuda", d) for d in ("bfloat16", "float16")}  # float32 on CUDA: unmeasured
    assert wanted <= have
    for e in entries:  # every shipped model can price a call: dense and sparse work cost time
        assert e["dense_pair_s"] > 0 and e["sparse_pair_s"] > 0 and e["source"]


def _verdict_ratios(m: costs.CostModel, heads: int, S: int, density: float) -> tuple[float, float]:
    """The two decisions the cost model makes for a prompt of ``heads`` query heads (a
    quarter as many kv heads), D 64, as costs over dense attention (sparse below 1): the
    length verdict's (planning, the probe and the sparsest call) and the density verdict's
    after selection (the sparse call at ``density`` and the rest of planning)."""
    layout = fs.SampleLayout.create(S, fs.SampleConfig())
    rows = layout.num_segments * layout.rows_per_segment
    dense = m.dense_s(heads, S, 64)
    floor = float(window_pairs(layout, layout.min_window_blocks)) * heads
    plan = m.plan_s(heads, S, 64, rows)
    probe = m.probe_s(heads // 4, S, 64, probe_rows(layout).numel()) or 0.0
    length = (plan + probe + m.sparse_s(floor, 64)) / dense
    pairs = density * heads * layout.causal_pairs
    after_select = (m.sparse_s(pairs, 64) + PLAN_SHARE_AFTER_SELECT * plan) / dense
    return length, after_select


@pytest.mark.slow
@pytest.mark.alone  # two calibrations compared: another test beside them skews one of them
def test_a_foreign_table_is_replaced_by_a_first_use_calibration(
    tmp_path, monkeypatch, fresh_costs, caplog
):
    """On a device the tables do not know, the first planned call measures its cost model
    (once, announced, saved) and decides as this machine's own full calibration does."""
    cpu = torch.device("cpu")
    # This machine's own calibration at the full lengths (three rounds, not five: the test
    # runs beside others): the reference.
    own = calibration.calibrate(cpu, torch.float32, repeats=3)
    # Another CPU's table: one where the sparse call and planning cost a third of this one's.
    foreign = dataclasses.replace(
        own,
        device="cpu another x2",
        sparse_pair_s=own.sparse_pair_s / 3,
        plan_token_s=own.plan_token_s / 3,
        plan_pair_s=own.plan_pair_s / 3,
    )
    monkeypatch.setattr(costs, "BUILTIN", tmp_path / "builtin.json")  # the only table
    costs.BUILTIN.write_text(json.dumps({"models": [foreign.to_json()]}))
    monkeypatch.setenv("FLEXSAMPLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(costs.AUTO_CALIBRATE_ENV, "1")
    borrowed = costs._lookup(
        costs.device_name(cpu), "cpu", "float32", "triton", str(costs.user_cache()), None
    )[0]
    assert "not on" in borrowed.source

    q, k, _ = planted_qkv(1, 8, 2, 2048, 64, seed=0)
    with caplog.at_level("WARNING", logger="flexsample"):
        fs.plan_prefill(q, k)  # the defaults: the cost model decides
        fs.plan_prefill(q, k)
    notices = [r for r in caplog.records if "measuring one now" in r.getMessage()]
    assert len(notices) == 1  # once per process
    backend = resolve_backend("auto", cpu, torch.float32, 64)  # what the defaults ran
    first_use = costs.cost_model(cpu, torch.float32, backend)
    assert first_use.automatic and first_use.version == fs.__version__
    assert "first-use calibration" in first_use.source
    assert (tmp_path / "cache/costs.json").is_file()  # later processes read it
    costs.clear_cache()
    assert costs.cost_model(cpu, torch.float32, backend).source == first_use.source
    # Each cost grows with its work (a fit of noise alone would leave a fixed cost only).
    assert first_use.dense_s(8, 2048, 64) > 1.5 * first_use.dense_s(8, 1024, 64)
    assert first_use.sparse_s(1e7, 64) > first_use.sparse_s(1e6, 64)
    assert first_use.plan_s(8, 2048, 64, 32) > first_use.plan_s(8, 1024, 64, 32)

    # The first-use calibration decides as this machine's full one does wherever that is
    # not within 20% of a tie (there either decision costs little); the foreign table did not.
    grid = [
        (heads, S, density)
        for heads in (8, 9)
        for S in (1024, 2048, 4096, 8192, 16384)
        for density in (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8)
    ]
    clear = [g for g in grid if all(abs(r - 1) > 0.2 for r in _verdict_ratios(own, *g))]
    # Not vacuous: clear points on both sides (how many are clear depends on this machine's
    # rates and load: 32 to 50 of these 70 were seen).
    assert len({all(r < 1 for r in _verdict_ratios(own, *g)) for g in clear}) == 2

    def decisions(m):
        return [all(r < 1 for r in _verdict_ratios(m, *g)) for g in clear]

    differ = [
        (g, _verdict_ratios(own, *g), _verdict_ratios(first_use, *g))
        for g, a, b in zip(clear, decisions(own), decisions(first_use), strict=True)
        if a != b
    ]
    assert not differ, f"(heads, S, density), own and first-use ratios: {differ}"
    assert decisions(borrowed) != decisions(own)


def test_dense_kernel_is_the_faster_one_measured():
    """FlexAttention's dense call (measured only on the FlashAttention-4 backend) is chosen
    for whole prompts where it is cheaper than SDPA; chunks and unmeasured models use SDPA."""
    flash = dataclasses.replace(
        MODEL, backend="flash", flex_dense_fixed_s=4e-3, flex_dense_pair_s=1e-11
    )
    # Fixed 1 ms + 2e-11 per pair-element for SDPA, 4 ms + 1e-11 for flex: flex wins above
    # 3 ms / 1e-11 = 3e8 pair-elements.
    short, long = 1024, 8192  # 16 heads, D=64: 5.4e8 and 3.4e10 pair-elements
    assert flash.dense_kernel(16, long, 64)[0] == "flex"
    assert flash.dense_s(16, long, 64) == pytest.approx(flash.flex_dense_s(16, long, 64))
    assert flash.dense_kernel(2, short, 16)[0] == "sdpa"  # 1.7e7: the fixed cost decides
    chunk = long * 100  # a chunk's pairs: SDPA, whatever the rates
    assert flash.dense_kernel(16, long, 64, causal_pairs=chunk)[0] == "sdpa"
    assert MODEL.dense_kernel(16, long, 64)[0] == "sdpa"  # flex dense unmeasured
    assert MODEL.flex_dense_s(16, long, 64) is None


def test_lookup_is_per_backend_and_reads_older_files(tmp_path, monkeypatch, fresh_costs):
    monkeypatch.setenv("FLEXSAMPLE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(costs, "device_name", lambda device: "my device")
    costs.clear_cache()
    triton = dataclasses.replace(MODEL, device="my device", sparse_pair_s=3e-11)
    # A file written before the backend fields existed.
    old = {k: v for k, v in triton.to_json().items() if k not in costs._OPTIONAL}
    (tmp_path / "costs.json").write_text(json.dumps({"models": [old]}))
    cpu = torch.device("cpu")
    found = costs.cost_model(cpu, torch.float32, "triton")
    assert found.backend == "triton" and found.sparse_pair_s == 3e-11
    assert found.flex_dense_pair_s is None
    # No flash entry yet: the triton one serves, saying so.
    fallback = costs.cost_model(cpu, torch.float32, "flash")
    assert fallback.sparse_pair_s == 3e-11 and "triton backend" in fallback.source
    flash = dataclasses.replace(
        triton, backend="flash", sparse_pair_s=2e-11, flex_dense_pair_s=1e-11
    )
    costs.save(flash)
    assert len(json.loads((tmp_path / "costs.json").read_text())["models"]) == 2
    assert costs.cost_model(cpu, torch.float32, "flash").sparse_pair_s == 2e-11
    assert costs.cost_model(cpu, torch.float32, "triton").sparse_pair_s == 3e-11
    costs.clear_cache()


DATA = Path(__file__).with_name("data")


def test_a_forced_table_replaces_every_other_and_says_so(monkeypatch, fresh_costs):
    """``$FLEXSAMPLE_COST_TABLE``: the suite run as a machine with other costs would run it.
    The same call decides by the table it is given, dense on one, sparse on the other."""
    q, k, _ = planted_qkv(1, 8, 2, 8192, 64, stripes=8, stripe_width=1)
    decisions = {}
    for name in ("dear", "cheap"):
        monkeypatch.setenv(costs.FORCED_TABLE_ENV, str(DATA / f"costs_sparse_{name}_cpu.json"))
        costs.clear_cache()
        model = costs.cost_model(torch.device("cpu"), torch.float32)
        assert model.source.startswith(f"$FLEXSAMPLE_COST_TABLE (costs_sparse_{name}_cpu.json")
        assert model.device == f"cpu foreign (sparse {name}) x2"
        decisions[name] = fs.plan_prefill(q, k).path
    assert decisions == {"dear": "dense", "cheap": "sparse"}
    monkeypatch.setenv(costs.FORCED_TABLE_ENV, str(DATA / "no_such_table.json"))
    costs.clear_cache()
    with pytest.raises(LookupError, match="FLEXSAMPLE_COST_TABLE: no such file"):
        costs.cost_model(torch.device("cpu"), torch.float32)
    with pytest.raises(LookupError, match="has no cost model for cuda bfloat16"):
        costs._forced(DATA / "costs_sparse_dear_cpu.json", "cuda", "bfloat16", "triton")
