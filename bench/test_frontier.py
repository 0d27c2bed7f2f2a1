"""Selection frontier: density vs output error vs per-row kept mass, against a per-row oracle.

For each input, every selection (flexsample at its defaults, an alpha sweep, the 0.1-style
selection and the pieces in between) is scored on exact float64 attention
(``flexsample.oracle.evaluate_plan`` on the pairs the call computes), next to the per-row
oracle at several alphas: every query row keeps its fewest keys (``oracle tokens``) or key
tiles (``oracle tiles``) reaching alpha of its mass, and the oracle a tile kernel can reach
(``oracle query tiles``): the rows of each 128-row query tile share the fewest keys that give
every one of them alpha. Density counts computed (query, key) pairs over causal pairs.

Inputs: planted structures (``STRUCTURES``), q/k/v captured from SmolLM2 on a passkey
prompt, and from Gemma-3-270M's global-attention layers on needle prompts of 16K and 32K
tokens (scored on 1024 query rows spread over the prompt: the whole S x S in float64 would
take hours on 2 cores; skipped where the model is not installed, and in smoke runs). The
timed call is the whole ``flex_sample_attention`` (for the oracle rows, the oracle
computation itself); the numbers that matter are in ``extra_info``.
"""

from __future__ import annotations

import math

import pytest
import torch

import flexsample as fs
from conftest import run
from flexsample.oracle import evaluate_plan, oracle_frontier
from flexsample.presets import preset
from flexsample.synthetic import planted_qkv

#: Planted structures: keyword arguments of ``planted_qkv`` (signal set per length below).
STRUCTURES = {
    "single-token stripes": {"stripes": (16, 32), "stripe_width": 1},
    "contiguous stripes": {"stripes": (2, 4), "stripe_width": 96},
    "strong locality": {"stripes": (4, 8), "stripe_width": 1, "locality": 12.0, "local_span": 64},
    "weak locality": {"stripes": (4, 8), "stripe_width": 1, "locality": 3.0, "local_span": 1024},
    "diffuse background": {"stripes": (4, 8), "stripe_width": 1, "signal": 3.0, "locality": 2.0},
    # Each column read by one 256-row query region after it (what one column set per head
    # misses): locality as in "weak locality".
    "regional stripes": {
        "stripes": (32, 64),
        "stripe_width": 1,
        "stripe_scope": 256,
        "locality": 3.0,
        "local_span": 1024,
    },
}

#: flexsample configurations on the frontier: the defaults, 0.2's selection (no per-row
#: cover), an alpha sweep, and each of the two changes from 0.1 alone. 0.1's own rows (and
#: the oracles, which depend only on the inputs) are in bench/results/cpu_selection_0.1.json,
#: made by this suite at 0.1. Every selection is scored as a sparse call (the cost model's
#: dense fallback off); ``path`` in the results says what the config itself would run.
METHODS = {
    "flexsample defaults": fs.SampleConfig(),
    "per-segment cover (0.2)": preset("0.2"),
    "alpha 0.9": fs.SampleConfig(alpha=0.9),
    "alpha 0.98": fs.SampleConfig(alpha=0.98),
    "window 8%, token columns": fs.SampleConfig().replace(window_ratio=0.08),
    "adaptive window, block columns": fs.SampleConfig().replace(column_unit="block"),
    # Query-aware: each query tile's own keys (up to 256) on top of the defaults' pattern.
    "tile keys": fs.SampleConfig().replace(tile_keys=256, backend="gather"),
    "tile keys, no row cover": fs.SampleConfig().replace(
        tile_keys=256, backend="gather", row_guarantee=False
    ),
    # Columns at 0.9, each tile topped up to 0.98 by keys of its own, a 128-token window floor.
    "query-aware preset (tile keys)": preset("query-aware").replace(backend="gather"),
}
ORACLE_ALPHAS = (0.8, 0.9, 0.95, 0.98, 0.99)
#: The oracles: ``(unit, query_tile)`` of ``oracle_frontier`` by name.
ORACLES = {"tokens": ("token", None), "tiles": ("tile", None), "query tiles": ("token", 128)}
SMOLLM2_LAYERS = (2, 15, 27)
#: Gemma-3-270M's global-attention layers, the prompt lengths captured, and the query rows
#: scored there (evenly spread, the last one included).
GEMMA_LAYERS = (5, 11, 17)
GEMMA_LENGTHS = (16384, 32768)
GEMMA_ROWS = 1024


def _smoke(config) -> bool:
    return bool(config.getoption("--smoke"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    smoke = _smoke(metafunc.config)
    if "structure" in metafunc.fixturenames:
        names = list(STRUCTURES)[:1] if smoke else list(STRUCTURES)
        metafunc.parametrize("structure", names)
    if "method" in metafunc.fixturenames:
        names = list(METHODS)[:1] if smoke else list(METHODS)
        metafunc.parametrize("method", names)
    if "oracle" in metafunc.fixturenames:
        metafunc.parametrize("oracle", list(ORACLES))
    if "layer" in metafunc.fixturenames:
        layers = SMOLLM2_LAYERS[1:2] if smoke else SMOLLM2_LAYERS
        metafunc.parametrize("layer", layers, ids=lambda i: f"L{i}")
    if "gemma_layer" in metafunc.fixturenames:
        metafunc.parametrize("gemma_layer", GEMMA_LAYERS, ids=lambda i: f"L{i}")
    if "gemma_len" in metafunc.fixturenames:
        metafunc.parametrize("gemma_len", GEMMA_LENGTHS, ids=lambda n: f"S{n}", scope="module")


@pytest.fixture(scope="module")
def seq_len(smoke) -> int:
    return 1100 if smoke else 8192


_PLANTED: dict = {}


def _planted(structure: str, seq_len: int):
    """Planted q/k/v (8 query heads, 2 kv heads, D=64, float32), drawn once per module."""
    if (structure, seq_len) not in _PLANTED:
        kwargs = dict(STRUCTURES[structure])
        # As planted_case: planted keys strong enough that the background holds about 1% of
        # the mass at any length, unless the structure sets its own (weak) signal.
        kwargs.setdefault("signal", max(10.0, math.log(100 * seq_len / 64)))
        _PLANTED[(structure, seq_len)] = planted_qkv(1, 8, 2, seq_len, 64, seed=0, **kwargs)
    return _PLANTED[(structure, seq_len)]


def _info(inputs: str, method: str, quality, **more) -> dict:
    return {
        "suite": "frontier",
        "inputs": inputs,
        "method": method,
        "density": quality.density,
        "output_error": quality.output_error,
        "kept_mass_min": quality.kept_mass_min,
        "kept_mass_p1": quality.kept_mass_p1,
        "kept_mass_mean": quality.kept_mass_mean,
        **more,
    }


def _score_method(benchmark, inputs: str, method: str, q, k, v, device, rounds, rows=None) -> None:
    as_configured = fs.plan_prefill(q, k, METHODS[method])
    config = METHODS[method].replace(min_seq_len=0, max_density=1.0)
    plan = fs.plan_prefill(q, k, config)
    quality = evaluate_plan(q, k, v, plan, rows=rows)
    pattern = plan.pattern
    base = pattern.base if isinstance(pattern, fs.TileKeys) else pattern
    tiles = pattern.counts().float().mean() if isinstance(pattern, fs.TileKeys) else None
    benchmark.group = f"frontier {inputs}"
    run(
        benchmark,
        lambda: fs.flex_sample_attention(q, k, v, config=config),
        device,
        1,
        **_info(
            inputs,
            method,
            quality,
            alpha=config.alpha,
            path=as_configured.path,
            dense_reason=as_configured.reason,
            mean_window=float(base.window_blocks.float().mean()) * plan.layout.block_size,
            mean_columns=float(base.columns.sum(-1).float().mean()),
            mean_tile_keys=None if tiles is None else float(tiles),
        ),
    )


def _score_oracle(benchmark, inputs: str, oracle: str, q, k, v, smoke: bool, rows=None) -> None:
    alphas = ORACLE_ALPHAS[2:3] if smoke else ORACLE_ALPHAS
    unit, query_tile = ORACLES[oracle]
    results: dict = {}

    def compute():
        results.update(
            oracle_frontier(q, k, v, alphas, unit=unit, rows=rows, query_tile=query_tile)
        )

    benchmark.group = f"frontier {inputs}"
    benchmark.pedantic(compute, rounds=1, iterations=1)
    benchmark.extra_info.update(
        {
            "suite": "frontier",
            "inputs": inputs,
            "method": f"oracle {oracle}",
            "points": [
                _info(inputs, f"oracle {oracle}", quality, alpha=a)
                for a, quality in results.items()
            ],
        }
    )


# --- planted inputs -------------------------------------------------------------------------


def test_frontier_planted(benchmark, structure, method, seq_len, device, rounds):
    q, k, v = (t.to(device) for t in _planted(structure, seq_len))
    _score_method(benchmark, f"planted {structure}", method, q, k, v, device, rounds)


def test_oracle_planted(benchmark, structure, oracle, seq_len, device, smoke):
    q, k, v = (t.to(device) for t in _planted(structure, seq_len))
    _score_oracle(benchmark, f"planted {structure}", oracle, q, k, v, smoke)


# --- q/k/v captured from SmolLM2 ------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_frontier_qkv(smollm2, seq_len):
    """``{layer: (q, k, v)}`` of SmolLM2 on one passkey prompt of about ``seq_len`` tokens."""
    from flexsample.integrations.haystack import passkey_prompt
    from flexsample.integrations.transformers import capture_attention_inputs

    model, tokenizer = smollm2
    prompt = passkey_prompt(tokenizer, min(seq_len, 8000), 0.5, seed=seq_len)
    ids = tokenizer(prompt.text, return_tensors="pt").input_ids
    return capture_attention_inputs(model, ids, list(SMOLLM2_LAYERS))


def test_frontier_smollm2(benchmark, smollm2_frontier_qkv, layer, method, device, rounds):
    q, k, v = (t.to(device) for t in smollm2_frontier_qkv[layer])
    inputs = f"SmolLM2 S={q.shape[2]} layer {layer}"
    _score_method(benchmark, inputs, method, q, k, v, device, rounds)


def test_oracle_smollm2(benchmark, smollm2_frontier_qkv, layer, oracle, device, smoke):
    q, k, v = (t.to(device) for t in smollm2_frontier_qkv[layer])
    _score_oracle(benchmark, f"SmolLM2 S={q.shape[2]} layer {layer}", oracle, q, k, v, smoke)


# --- q/k/v captured from Gemma-3-270M's global layers -----------------------------------------


@pytest.fixture(scope="module")
def gemma_frontier_qkv(smoke, gemma_len):
    """``{layer: (q, k, v)}`` of Gemma-3-270M on one needle prompt of about ``gemma_len``
    tokens, and the query rows to score."""
    if smoke:
        pytest.skip("Gemma-3-270M captures are not part of the smoke run")
    from flexsample.integrations.haystack import needle_prompt
    from flexsample.integrations.models import GEMMA3_270M, ModelNotInstalled, load_model
    from flexsample.integrations.transformers import capture_attention_inputs

    try:
        model, tokenizer = load_model(GEMMA3_270M)
    except ModelNotInstalled as error:
        pytest.skip(str(error))
    prompt = needle_prompt(tokenizer, gemma_len - 64, [0.2, 0.5, 0.8], seed=gemma_len)
    ids = tokenizer(prompt.text, return_tensors="pt").input_ids
    qkv = capture_attention_inputs(model, ids, list(GEMMA_LAYERS))
    S = ids.shape[1]
    rows = torch.linspace(0, S - 1, GEMMA_ROWS + 1)[1:].round().long()
    return qkv, rows


def test_frontier_gemma(benchmark, gemma_frontier_qkv, gemma_layer, method, device):
    qkv, rows = gemma_frontier_qkv
    q, k, v = (t.to(device) for t in qkv[gemma_layer])
    inputs = f"Gemma-3-270M S={q.shape[2]} layer {gemma_layer} ({len(rows)} rows)"
    _score_method(benchmark, inputs, method, q, k, v, device, 1, rows=rows.to(device))


def test_oracle_gemma(benchmark, gemma_frontier_qkv, gemma_layer, device, smoke):
    qkv, rows = gemma_frontier_qkv
    q, k, v = (t.to(device) for t in qkv[gemma_layer])
    inputs = f"Gemma-3-270M S={q.shape[2]} layer {gemma_layer} ({len(rows)} rows)"
    _score_oracle(benchmark, inputs, "tokens", q, k, v, smoke, rows=rows.to(device))
