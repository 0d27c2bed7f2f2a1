"""Behaviour pinned: plans and outputs of a fixed matrix of inputs, against a committed file.

A restructuring must not change what flexsample decides or computes. ``tests/data/golden.pt``
holds, for each case below, the plan's path and reason, every head's window and selected
columns, the gathered positions, densities and sampled rows' kept mass, and 48 output rows
per head, as flexsample 0.4.0 computed them on the CPU (torch sampler). Selections and
decisions must be reproduced exactly; densities and kept mass within 1e-6, outputs within
float rounding (fp32: 1e-5, bf16: 1e-2 absolute).

Write the file again only for an intended change of behaviour, saying so in the commit:
``pytest tests/test_golden.py --write-golden``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import flexsample as fs
from flexsample.presets import preset
from flexsample.synthetic import planted_qkv

GOLDEN = Path(__file__).with_name("data") / "golden.pt"
OUTPUT_ROWS = 48

F32, BF16 = torch.float32, torch.bfloat16
SPARSE = fs.SampleConfig.always_sparse
#: name: (B, Hq, Hkv, S, L, D, dtype, input, config)
CASES = {
    "planted-B1-GQA8x2-S1100-fp32": (1, 8, 2, 1100, 1100, 32, F32, "planted", SPARSE()),
    "planted-B1-GQA8x2-S1100-floor128": (
        1, 8, 2, 1100, 1100, 32, F32, "planted", SPARSE(min_window=128),
    ),
    "planted-B2-GQA4x2-S777-block-unit": (
        2, 4, 2, 777, 777, 32, F32, "planted",
        SPARSE(min_window=64, block_size=64, column_unit="block"),
    ),
    "planted-B2-MHA4-S640-B64": (2, 4, 4, 640, 640, 16, F32, "planted", SPARSE(block_size=64)),
    "planted-B1-GQA8x2-S1300-bf16": (
        1, 8, 2, 1300, 1300, 32, BF16, "planted", SPARSE(min_window=128),
    ),
    "random-B1-GQA4x2-S900-fp32": (1, 4, 2, 900, 900, 32, F32, "random", SPARSE(min_window=128)),
    "chunk-B1-GQA8x2-L300-of-S1200": (
        1, 8, 2, 1200, 300, 32, F32, "planted", SPARSE(min_window=128),
    ),
    "chunk-B2-GQA4x2-L333-of-S1000-bf16": (
        2, 4, 2, 1000, 333, 32, BF16, "planted", SPARSE(min_window=128),
    ),
    "0.2-selection-S1100": (
        1, 8, 2, 1100, 1100, 32, F32, "planted",
        preset("0.2").replace(min_seq_len=0, max_density=1.0),
    ),
    "fixed-window-S1100": (1, 8, 2, 1100, 1100, 32, F32, "planted", SPARSE(window_ratio=0.08)),
    # What the project CPU's cost model decides at the defaults (the table is fixed).
    "defaults-decision-S4096": (1, 8, 2, 4096, 4096, 64, F32, "planted", fs.SampleConfig()),
    "defaults-decision-S300": (1, 4, 2, 300, 300, 32, F32, "random", fs.SampleConfig()),
}  # fmt: skip


def _inputs(B, Hq, Hkv, S, D, dtype, kind, seed):
    if kind == "planted":
        return planted_qkv(B, Hq, Hkv, S, D, stripes=(3, 8), stripe_width=1, seed=seed, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, S, D, generator=generator).to(dtype) for h in (Hq, Hkv, Hkv))


def _record(name: str) -> dict:
    B, Hq, Hkv, S, L, D, dtype, kind, config = CASES[name]
    q, k, v = _inputs(B, Hq, Hkv, S, D, dtype, kind, seed=len(name))
    q = q[:, :, S - L :].contiguous()
    # FlexAttention's kernel, as 0.4.0 ran on the CPU (the gathered products that "auto"
    # runs there since 0.6 round differently; tests/test_attention.py holds them to the
    # float64 reference).
    plan = fs.plan_prefill(q, k, config.replace(backend="triton"))
    out = fs.run_plan(plan, q, k, v)
    rows = torch.linspace(0, L - 1, OUTPUT_ROWS).long().unique()
    record = {
        "path": plan.path,
        "reason": plan.reason,
        "output_rows": out[:, :, rows].float(),
    }
    if plan.path == "sparse":
        record.update(
            window_blocks=plan.pattern.window_blocks,
            columns=plan.pattern.columns,
            positions=plan.pattern.gathered(Hq // Hkv).positions,
            density=plan.density.double(),
            row_mass=None if plan.row_mass is None else plan.row_mass.double(),
        )
    return record


@pytest.fixture(scope="module")
def golden(request):
    if request.config.getoption("--write-golden"):
        from flexsample import costs

        with pytest.MonkeyPatch.context() as patch:  # the project CPU's table, as the tests
            patch.setenv(costs.FORCED_TABLE_ENV, str(costs.BUILTIN))
            costs.clear_cache()
            torch.save({name: _record(name) for name in CASES}, GOLDEN)
        costs.clear_cache()
    return torch.load(GOLDEN)


@pytest.mark.parametrize("name", list(CASES))
def test_plans_and_outputs_equal_the_golden_file(name, golden, project_costs):
    want, got = golden[name], _record(name)
    assert set(got) == set(want)
    assert (got["path"], got["reason"]) == (want["path"], want["reason"])
    for key in ("window_blocks", "columns", "positions"):
        if key in want:
            assert torch.equal(got[key], want[key]), key
    for key in ("density", "row_mass"):
        if want.get(key) is not None:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)
    atol = 1e-2 if CASES[name][6] == BF16 else 1e-5
    torch.testing.assert_close(got["output_rows"], want["output_rows"], atol=atol, rtol=0)
