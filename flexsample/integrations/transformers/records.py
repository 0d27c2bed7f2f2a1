"""What the layers did: one record per attention call, and the per-layer report.

Density has one meaning everywhere here, the core's: the share of causal (query, key) pairs
computed, 1 for a call that ran dense. A prefill's density is the mean over its prefill calls
(``q_len > 1``), dense ones included: the share of attention work the prefill really did.
"""

from __future__ import annotations

import io
import re
import statistics
from collections.abc import Sequence

import torch

from flexsample import SampleStats
from flexsample.stats import STAGES

from .state import CallRecord, known_layer_states


def head_densities(calls: Sequence[SampleStats], heads: int, device: torch.device) -> torch.Tensor:
    """``(heads,)`` density per query head over the per-row calls of one layer call.

    Dense calls count as 1. The result is on ``device`` (the attention inputs' device),
    whatever mix of paths the calls took.
    """
    per_call = [
        torch.ones(heads, device=device)
        if s.density is None
        else s.density.to(device=device, dtype=torch.float32).mean(dim=0)
        for s in calls
    ]
    return torch.stack(per_call).mean(dim=0)


def record_calls(
    records: list[CallRecord],
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    calls: Sequence[SampleStats],
) -> None:
    """Append one record for the (possibly per-row) ``flex_sample_attention`` calls of one
    layer call."""
    times: dict[str, float] = {}
    for s in calls:
        for stage, seconds in s.times.items():
            times[stage] = times.get(stage, 0.0) + seconds
    path = "sparse" if any(s.path == "sparse" for s in calls) else "dense"
    reasons = sorted({s.reason for s in calls if s.reason})
    records.append(
        CallRecord(
            layer=getattr(module, "layer_idx", -1),
            path=path,
            reason="; ".join(reasons) or None,
            q_len=query.shape[2],
            kv_len=key.shape[2],
            batch=query.shape[0],
            density=head_densities(calls, query.shape[1], query.device).tolist(),
            times=times,
            details=[s for s in calls if s.path == "sparse"],
        )
    )


def record_dense(
    records: list[CallRecord],
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    reason: str,
    seconds: float,
) -> None:
    """Append the record of a call that transformers' SDPA ran (a routed fallback)."""
    records.append(
        CallRecord(
            layer=getattr(module, "layer_idx", -1),
            path="dense",
            reason=reason,
            q_len=query.shape[2],
            kv_len=key.shape[2],
            batch=query.shape[0],
            density=[1.0] * query.shape[1],
            times={"attention": seconds},
        )
    )


def layer_stats(model: torch.nn.Module) -> list[CallRecord]:
    """Every recorded attention call of the model, in layer order."""
    records = [r for state in known_layer_states(model) for r in state.records]
    return sorted(records, key=lambda r: r.layer)


def mean_prefill_density(records: Sequence[CallRecord]) -> float | None:
    """Mean density of the prefill records (dense ones count 1); None if there are none."""
    prefill = [r.mean_density for r in records if r.is_prefill]
    return sum(prefill) / len(prefill) if prefill else None


def prefill_density(model: torch.nn.Module) -> float | None:
    """Mean density of the model's recorded prefill calls, None if there were none.

    Dense fallbacks count with density 1: this is the share of causal (query, key) pairs the
    prefills actually computed.
    """
    return mean_prefill_density(layer_stats(model))


def reset_stats(model: torch.nn.Module) -> None:
    """Forget the recorded calls (keeps the configs)."""
    for state in known_layer_states(model):
        state.records.clear()


def summarize(model: torch.nn.Module) -> list[dict[str, object]]:
    """Per layer: calls, sparse calls, prefill density, and times per call.

    Each row has ``calls``, ``sparse``, ``density`` (:func:`mean_prefill_density` of the
    layer, None without prefill calls), ``first_call_s`` (all stages of the layer's first
    call; the process's first flexsample call includes compilation), ``<stage>_s`` (median
    seconds per prefill call of each stage, over the layer's prefill calls after its first,
    or the first when it is the only one; 0 without prefill calls), ``decode_s`` (median
    attention seconds of a decode step, None without decode calls) and ``fallbacks``
    (reason → count).
    """
    by_layer: dict[int, list[CallRecord]] = {}
    for r in layer_stats(model):
        by_layer.setdefault(r.layer, []).append(r)
    rows = []
    for layer, records in sorted(by_layer.items()):
        prefill = [r for r in records if r.is_prefill]
        timed = prefill[1:] or prefill
        decode = [r.times.get("attention", 0.0) for r in records if not r.is_prefill]
        fallbacks: dict[str, int] = {}
        for r in records:
            if r.path == "dense":
                fallbacks[str(r.reason)] = fallbacks.get(str(r.reason), 0) + 1
        rows.append(
            {
                "layer": layer,
                "calls": len(records),
                "sparse": sum(r.path == "sparse" for r in records),
                "density": mean_prefill_density(records),
                "first_call_s": sum(records[0].times.values()),
                **{
                    f"{stage}_s": statistics.median(r.times.get(stage, 0.0) for r in timed)
                    if timed
                    else 0.0
                    for stage in STAGES
                },
                "decode_s": statistics.median(decode) if decode else None,
                "fallbacks": fallbacks,
            }
        )
    return rows


#: Width of :func:`stats_table`'s text: a terminal's, a log's, a notebook cell's.
TABLE_WIDTH = 112


def stats_report(model: torch.nn.Module):
    """The per-layer report as one ``rich`` table (times in milliseconds): a summary line
    (layers whose prefill ran sparse, mean prefill density, attention time), one row per
    layer, and the reasons of dense calls, numbered once below the rows (``[1]``).

    :func:`stats_table` renders it as plain text; ``rich.print(stats_report(model))`` in a
    terminal or notebook.
    """
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from .state import is_enabled

    rows = summarize(model)
    records = layer_stats(model)
    # Reasons of dense prefill calls, grouped by kind (the words before the first colon, numbers
    # aside: every layer's probe verdict has its own numbers) and numbered in order of first use;
    # decode steps are dense by design and counted in their own column.
    kinds: dict[str, list[str]] = {}  # kind -> its reasons, the first one shown
    counts: dict[str, int] = {}
    for row in rows:
        for reason in row["fallbacks"]:
            if reason != "decode":
                reasons = kinds.setdefault(reason_kind(reason), [])
                reasons += [] if reason in reasons else [reason]
        for kind, n in _count_kinds(row["fallbacks"]).items():
            counts[kind] = counts.get(kind, 0) + n
    number = {kind: i + 1 for i, kind in enumerate(kinds)}
    prefill_layers = [row for row in rows if row["density"] is not None]
    sparse_layers = sum(row["sparse"] > 0 for row in prefill_layers)  # decode runs dense
    density = mean_prefill_density(records)
    attention_s = sum(r.times.get("attention", 0.0) for r in records)
    if not records:
        summary = "flexsample: no attention calls recorded on this model"
    else:
        summary = (
            f"flexsample: {sparse_layers}/{len(prefill_layers)} layers ran their prefill sparse "
            "(mean prefill density "
            + ("-" if density is None else f"{density:.3f}")
            + f"); {len(records)} calls, {attention_s:.2f} s in attention"
        )
    if records and not is_enabled(model):
        summary += " (flexsample is disabled on this model: its last run)"
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1))
    # The opt-in stage (query-aware tile keys) gets its column only where it ran.
    stages = [s for s in STAGES if s != "tiles" or any(row["tiles_s"] for row in rows)]
    columns = ["layer", "calls", "sparse", "density", "1st"]
    columns += ["attn" if stage == "attention" else stage for stage in stages]
    columns += ["decode"]
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column))
    table.add_column("dense", justify="left", min_width=5)  # the numbered reasons below
    for row in rows:
        table.add_row(
            str(row["layer"]),
            str(row["calls"]),
            str(row["sparse"]),
            "-" if row["density"] is None else f"{row['density']:.3f}",
            f"{1e3 * row['first_call_s']:.1f}",
            *(f"{1e3 * row[f'{stage}_s']:.1f}" for stage in stages),
            "-" if row["decode_s"] is None else f"{1e3 * row['decode_s']:.2f}",
            " ".join(f"[{number[kind]}]x{n}" for kind, n in _count_kinds(row["fallbacks"]).items()),
        )
    notes = [
        Text(
            "ms per call. probe .. attn: median over a layer's prefill calls after its first; "
            "1st: all stages of its first call (the process's first includes compilation); "
            "decode: a decode step's attention (always dense); dense: prefill calls per reason "
            "(below)"
        )
    ]
    for kind, reasons in kinds.items():
        alike = f" (and {len(reasons) - 1} alike)" if len(reasons) > 1 else ""
        notes.append(Text(f"[{number[kind]}] {counts[kind]} dense calls: {reasons[0]}{alike}"))
    return Group(Text(summary), table, *notes)


def reason_kind(reason: str) -> str:
    """What a dense call's reason is about: its words before the first colon, numbers aside
    (``"probe"``, ``"seq_len #"``); :func:`stats_report` groups reasons by it."""
    return re.sub(r"\d[\d.]*", "#", reason.split(":", 1)[0])


def _count_kinds(fallbacks: dict[str, int]) -> dict[str, int]:
    """A row's dense calls per reason kind, decode steps left out (they have their column)."""
    counts: dict[str, int] = {}
    for reason, n in fallbacks.items():
        if reason != "decode":
            kind = reason_kind(reason)
            counts[kind] = counts.get(kind, 0) + n
    return counts


def stats_table(model: torch.nn.Module, width: int = TABLE_WIDTH) -> str:
    """:func:`stats_report` as plain text, at most ``width`` characters a line."""
    from rich.console import Console

    console = Console(width=width, color_system=None, record=True, file=io.StringIO())
    console.print(stats_report(model))
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())
