"""Would columns that apply to fewer queries pay? Two variants measured on real attention.

A selected column is read by every query past its window: the union of all segments'
covers (and the row cover's additions) serves every later row. Two narrower scopes, scored
against exact float64 attention on every row of SmolLM2-135M's layers at 8K (the frontier
benchmark's passkey prompt, planned always sparse at the defaults):

* from its segment on: a column applies from the first row of the first segment whose cover
  took it (the rows before that segment's did not need it), the row cover's additions to all;
* own segment only: each query reads only its own segment's cover (and, with ``--next``,
  the next segment's), the row cover's additions to all.

Each segment's cover is recomputed as ``select_columns`` makes it for the head's chosen
window: the heaviest sampled columns before the window until the segment keeps ``alpha``.

    PYTHONPATH=. python3 bench/segment_columns.py                  # layers 2 15 27
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from report import write_rows
from sampled_rows import add_layer_arguments, start_layer_run

import flexsample as fs
from flexsample.oracle import evaluate_mask, evaluate_plan
from flexsample.selection import row_keep


def segment_covers(plan: fs.PrefillPlan) -> torch.Tensor:
    """``(Hq, G, S)`` bool: each segment's own cover of batch row 0, at each head's window."""
    layout, sel = plan.layout, plan.pattern
    S, bs, G = layout.seq_len, layout.block_size, layout.num_segments
    alpha = plan.config.alpha
    scores = plan.scores[0].double()  # (Hq, G, S)
    last_rows = layout.sampled_rows()[:, -1]
    pos = torch.arange(S)
    covers = torch.zeros(scores.shape[0], G, S, dtype=torch.bool)
    for h in range(scores.shape[0]):
        w = int(sel.window_blocks[0, h])
        for g in range(G):
            start = int(last_rows[g]) - w * bs + 1  # what the window reaches from every row
            mass = scores[h, g]
            need = alpha * mass.sum() - mass[pos >= start].sum()
            eligible = torch.where((pos < start) & sel.columns[0, h], mass, 0.0)
            ordered, order = eligible.sort(descending=True)
            take = ((ordered.cumsum(0) - ordered) < need) & (ordered > 0)
            covers[h, g, order[take]] = True
    return covers


def scoped_keep(plan: fs.PrefillPlan, covers: torch.Tensor, scope: str):
    """``keep_rows(b, h, pos)`` for :func:`~flexsample.oracle.evaluate_mask`: the plan's mask
    of batch row 0 with its columns read by the rows ``scope`` names."""
    layout, sel = plan.layout, plan.pattern
    everyone = sel.columns[0] & ~covers.any(dim=1)  # the row cover's additions
    ends = torch.tensor(layout.segment_ends())
    last = len(ends) - 1
    first = torch.where(covers.any(dim=1), covers.int().argmax(dim=1), 0)  # (Hq, S)
    seg_start = torch.tensor([layout.query_start, *layout.segment_ends()[:-1]])[first]

    def keep_rows(b: int, h: int, pos: torch.Tensor) -> torch.Tensor:
        seg = torch.searchsorted(ends, pos, right=True).clamp(max=last)
        if scope == "from its segment on":
            cols = sel.columns[0, h] & (pos[:, None] >= seg_start[h][None, :])
        else:
            cols = covers[h, seg]
            if scope == "own and next segment":
                cols = cols | covers[h, (seg + 1).clamp(max=last)]
        return row_keep(pos, sel.window_blocks[0, h], cols | everyone[h], layout)

    return keep_rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_layer_arguments(p)
    args = p.parse_args(argv)
    meta, captured = start_layer_run(args)
    config = fs.SampleConfig.always_sparse()
    print("| layer | columns read by | density | output error | kept mass p1 |")
    print("|---|---|---|---|---|")
    rows = []
    for layer, (q, k, v) in captured.items():
        plan = fs.plan_prefill(q, k, config)
        q, k, v = q.double(), k.double(), v.double()
        covers = segment_covers(plan)
        results = {"every later query (the defaults)": evaluate_plan(q, k, v, plan)}
        for scope in ("from its segment on", "own segment only", "own and next segment"):
            keep_rows = scoped_keep(plan, covers, scope)
            results[scope] = evaluate_mask(q, k, v, keep_rows, scale=plan.scale)
        for scope, quality in results.items():
            rows.append({"layer": layer, "scope": scope, **dataclasses.asdict(quality)})
            print(
                f"| {layer} | {scope} | {quality.density:.3f} | {quality.output_error:.2e} "
                f"| {quality.kept_mass_p1:.3f} |",
                flush=True,
            )
    if args.json:
        write_rows(args.json, meta, rows)


if __name__ == "__main__":
    main()
