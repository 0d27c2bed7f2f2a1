"""Plan a prefill, then run it: the whole pipeline as two calls.

:func:`plan_prefill` decides *what* to compute (layout → sampled column scores → window and
columns per head → gathered column positions → ``BlockMask``, or the dense path and why);
:func:`run_plan` computes it.
:func:`~flexsample.flex_sample_attention` is these two calls plus statistics, and the
benchmarks time exactly these functions, so the numbers they report are the shipped code's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn.attention.flex_attention import BlockMask

from .attention import (
    DENSE_BLOCK_SIZE,
    dense_causal_attention,
    flex_dense_attention,
    sparse_attention,
)
from .backends import Backend, kernel_backend, resolve_backend
from .config import SampleConfig
from .costs import (
    CostModel,
    chunk_pairs,
    cost_model,
    density_verdict,
    generation,
    length_verdict,
)
from .cover import cover_rows
from .layout import SampleLayout, bucket_length, window_pairs
from .patterns import MaskedCall, Pattern
from .probe import probe_density, probe_rows
from .sampling import resolve_sampler, run_sampler_with_lse
from .selection import select_columns
from .tiles import select_tile_keys
from .timing import StageTimer
from .tuning import (
    PLAN_SHARE_AFTER_SELECT,
    PLAN_SHARE_MASK,
    SELECTION_OVER_PROBE,
    TILE_KEYS_OVER_PROBE,
)
from .validation import check_qk, resolve_scale

logger = logging.getLogger("flexsample")
#: The two ways a call runs.
CallPath = Literal["sparse", "dense"]
_DEFAULT_CONFIG = SampleConfig()
_logged_kinds: set[str] = set()


class DenseByLength:
    """Plans that run dense by their length alone, per key (what decided them), valid while
    the cost models they were decided on are: a :func:`~flexsample.costs.clear_cache` (a new
    calibration, a failed FlashAttention-4 call) bumps :func:`~flexsample.costs.generation`
    and every plan is made again; a plan stored with its cost model is valid only for that
    model. At most ``size`` keys (then it starts over)."""

    def __init__(self, size: int = 1024) -> None:
        self._plans: dict[tuple, tuple[int, CostModel | None, PrefillPlan]] = {}
        self._size = size

    def get(self, key: tuple, costs: CostModel | None = None) -> PrefillPlan | None:
        """The plan stored under ``key`` with ``costs``, in this generation, or None."""
        known = self._plans.get(key)
        if known is None or known[0] != generation() or known[1] is not costs:
            return None
        return known[2]

    def put(self, key: tuple, plan: PrefillPlan, costs: CostModel | None = None) -> None:
        if len(self._plans) >= self._size:
            self._plans.clear()
        self._plans[key] = (generation(), costs, plan)


#: :func:`plan_prefill`'s dense-by-length plans, per (q's and k's shapes, dtype, device,
#: config, scale, backend).
_DENSE_BY_LENGTH = DenseByLength()


@dataclass(frozen=True, eq=False)
class PrefillPlan:
    """What SampleAttention decided for one causal prefill (the result of :func:`plan_prefill`).

    Attributes:
        path: ``"sparse"`` (run the block mask) or ``"dense"`` (run dense causal attention:
            SDPA, or FlexAttention with every causal tile where ``backend`` is set).
        reason: why the dense path was chosen; None on the sparse path.
        seq_len, batch_size, num_heads: ``S`` (keys), ``B`` and ``Hq`` of the planned call.
        query_len: ``L``, the queries (the last ``L`` positions; ``S`` for a whole prompt).
        scale: the softmax scale the plan was made with (and :func:`run_plan` uses).
        config: the settings the plan was made with.
        notes: what about this length and config limits sparsity (see
            :meth:`SampleLayout.notes`); empty when nothing does.
        layout: block geometry (None on the dense path).
        sampler: stage-1 implementation that ran (None on the dense path).
        scores: ``(B, Hq, num_segments, S)`` sampled column scores.
        pattern: what each head reads (:class:`~flexsample.patterns.WindowColumns`: the
            window and columns each head chose, with the per-row cover's additions when
            ``config.selection.row_guarantee``).
        row_mass: ``(B, Hq, num_segments, rows_per_segment)`` kept share of each sampled
            row's mass (a lower bound, see :class:`~flexsample.cover.RowCover`); None unless
            ``config.selection.row_guarantee``.
        call: the pattern's FlexAttention call: its ``BlockMask`` and how q, k and v are
            laid out for it (:class:`~flexsample.patterns.MaskedCall`); None on the dense
            path and for a backend without a ``BlockMask`` (``"gather"``).
        backend: the backend the call runs (``"triton"``, ``"flash"`` or ``"gather"``, see
            ``SampleConfig.backend``); on the dense path ``"flash"`` where the cost model
            found FlexAttention's FlashAttention-4 dense call faster than SDPA
            (:func:`~flexsample.attention.flex_dense_attention`), else None (SDPA).
        padded: ``(query rows, keys)`` the call is padded to for a backend compiled per
            static shape (:func:`~flexsample.bucket_length`); None when not padded.
        by_length: dense by the length checks alone (``config.min_seq_len`` or the cost
            model's length verdict), before any look at q and k: every call of this shape
            and config gets this plan.
    """

    path: CallPath
    seq_len: int
    query_len: int
    batch_size: int
    num_heads: int
    scale: float
    config: SampleConfig
    reason: str | None = None
    notes: tuple[str, ...] = ()
    layout: SampleLayout | None = None
    sampler: str | None = None
    scores: torch.Tensor | None = None
    pattern: Pattern | None = None
    row_mass: torch.Tensor | None = None
    call: MaskedCall | None = None
    backend: Backend | None = None
    padded: tuple[int, int] | None = None
    by_length: bool = False

    @property
    def block_mask(self) -> BlockMask | None:
        """The sparse call's FlexAttention ``BlockMask``; None on the dense path."""
        return None if self.call is None else self.call.block_mask

    @property
    def density(self) -> torch.Tensor | None:
        """``(B, Hq)`` computed (query, key) pairs over causal pairs; None on the dense path."""
        return None if self.pattern is None else self.pattern.density()

    def kept_sampled_mass(self) -> torch.Tensor | None:
        """``(B, Hq)`` smallest, over segments, sampled mass the mask keeps (None if dense)."""
        if self.scores is None or self.pattern is None:
            return None
        return self.pattern.kept_sampled_mass(self.scores).amin(dim=-1)


def plan_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SampleConfig | None = None,
    *,
    scale: float | None = None,
    timer: StageTimer | None = None,
) -> PrefillPlan:
    """Decide how to compute causal attention for one prefill: sparse (and which tiles) or dense.

    Runs stages 1–2 and builds the mask: sample the attention of a few query rows, choose per
    head the window and the key columns that with it hold ``config.alpha`` of each segment's
    sampled mass (``config.column_alpha`` with query-aware selection), add keys for the
    sampled rows still short of it (``config.selection.row_guarantee``), with
    ``config.selection.tile_keys`` add each query tile's own keys until a few rows of every
    tile keep ``config.alpha``, list each kv head's columns, and build the ``BlockMask``.

    A dense plan (with its reason) comes back where sparse would not pay: before sampling,
    when the length is below ``config.min_seq_len`` or, with ``min_seq_len=None``, when the
    device's cost model (:mod:`flexsample.costs`) says planning plus the sparsest call
    costs at least dense attention; at the probe (:mod:`flexsample.probe`), when its
    estimate of the least density a mask keeping ``alpha`` of a few rows' mass computes
    could not pay (or exceeds a numeric ``max_density``); after selection, when the plan
    computes more than ``config.max_density`` of the causal pairs or, with
    ``max_density=None``, when its sparse call plus the planning still ahead would cost at
    least dense attention. Dense plans run the faster dense kernel (SDPA, or FlexAttention
    on FlashAttention-4 for a whole prompt where the cost model measured it faster). A NaN or
    an Inf in q or k gives a dense plan too (dense attention spreads it as SDPA does; a
    sparse mask would spread a bad key only into the rows that keep it); :func:`run_plan`
    runs a sparse plan dense where v holds one. Reads counts on the host (device syncs).

    Args:
        q: ``(B, Hq, L, D)`` queries: the last ``L`` positions of the ``S`` keys (``L = S``
            for a whole prompt; a chunk of a chunked prefill has its earlier context in k).
        k: ``(B, Hkv, S, D)`` keys, ``Hq % Hkv == 0``.
        config: method settings; ``SampleConfig()`` if None.
        scale: softmax scale; ``1/sqrt(D)`` if None.
        timer: records the seconds of the ``probe`` (when it runs), ``sample``, ``select``,
            ``cover`` (when ``config.selection.row_guarantee``) and ``mask`` stages.

    Returns:
        A frozen :class:`PrefillPlan`; pass it to :func:`run_plan` with the same q, k and v.

    Raises:
        TypeError, ValueError: bad inputs or config (see :func:`flexsample.flex_sample_attention`).
    """
    if not torch.compiler.is_compiling():
        check_qk(q, k)
    return plan_prefill_unchecked(q, k, config, scale, timer)


def plan_prefill_unchecked(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SampleConfig | None,
    scale: float | None,
    timer: StageTimer | None,
    v: torch.Tensor | None = None,
) -> PrefillPlan:
    """:func:`plan_prefill` without checking q and k again: for callers that checked them
    (:func:`~flexsample.flex_sample_attention` checks q, k and v once per call, and passes
    ``v`` so that a NaN or Inf in it also sends the call dense)."""
    config = _DEFAULT_CONFIG if config is None else config
    if not isinstance(config, SampleConfig):
        raise TypeError(f"config must be a SampleConfig, got {type(config).__name__}")
    scale = resolve_scale(q, scale)
    timer = timer or StageTimer(q.device, enabled=False)
    B, Hq, L, D = q.shape
    S = k.shape[2]
    # Resolved first: a backend that cannot run here is an error on every path.
    compiling = torch.compiler.is_compiling()
    if compiling:
        backend: Backend = "triton" if config.backend == "auto" else config.backend
    else:
        backend = resolve_backend(config.backend, q.device, q.dtype, D)
    if config.selection.tile_keys and kernel_backend(backend).static_shapes:
        if config.backend != "auto":
            raise ValueError(
                f"SampleConfig.selection.tile_keys has no call for backend {backend!r} (a "
                "kernel compiled per static shape) yet: use backend='triton' or 'gather'"
            )
        _log_once(
            "tile-keys-backend", logging.INFO,
            "flexsample: query-aware selection (tile_keys) runs on FlexAttention's Triton "
            "kernel: backend %r has no call for it yet", backend,
        )  # fmt: skip
        backend = "triton"
    costs = (
        _cost_model(q.device, q.dtype, backend)
        if config.min_seq_len is None or config.max_density is None
        else None
    )
    # A length that runs dense runs dense on every call of its shape: the plan is made once
    # (making it again is a tenth of a short call's time on a GPU, docs/tuning.md).
    key = (q.shape, k.shape, q.dtype, q.device, config, scale, backend)  # Hkv: the probe's cost
    known = _DENSE_BY_LENGTH.get(key, costs)
    if known is not None:
        return known
    common = {
        "seq_len": S,
        "query_len": L,
        "batch_size": B,
        "num_heads": Hq,
        "scale": scale,
        "config": config,
    }
    layout = _layout(S, config, L)

    def dense(reason: str) -> PrefillPlan:
        return _dense_plan(reason, common, layout, backend, costs, q.device, q.dtype, D)

    reason = _length_reason(config, layout, costs, B * Hq, D, B * k.shape[1])
    if reason is not None:
        plan = dataclasses.replace(dense(reason), by_length=True)
        if not compiling:
            _DENSE_BY_LENGTH.put(key, plan, costs)
        return plan

    if not compiling and (bad := nonfinite_inputs(q=q, k=k, v=v)):
        return dense(f"{bad} hold NaN or Inf: dense attention spreads them as SDPA does")
    notes = layout.notes()
    for field, note in notes.items():
        _log_once(field, logging.WARNING, "flexsample: %s", note)
    sampler = resolve_sampler(config.sampler, q.device)
    if config.max_density != 1.0 and (config.max_density is not None or costs is not None):
        with timer.stage("probe"):
            least = probe_density(
                q,
                k,
                layout,
                config.alpha,
                scale,
                reference=sampler == "reference",
                triton=sampler == "triton",
            )
        reason = _probe_verdict(config, costs, least, layout, B * Hq, D)
        if reason is not None:
            _log_once("probe", logging.INFO, "flexsample: dense attention (%s)", reason)
            return dense(reason)
    with timer.stage("sample"):
        scores, row_lse = run_sampler_with_lse(sampler, q, k, layout, scale)
    with timer.stage("select"):
        pattern = select_columns(scores, layout, config.column_alpha)
        if config.selection.group_union:
            pattern = pattern.shared_by_group(Hq // k.shape[1])
    # Checked before the cover too: the cover only adds pairs, so a selection already too
    # dense saves the cover's pass.
    after_select = PLAN_SHARE_AFTER_SELECT if config.selection.row_guarantee else PLAN_SHARE_MASK
    reason = _density_verdict(config, costs, pattern, layout, B * Hq, D, after_select)
    row_mass = None
    if reason is None and config.selection.row_guarantee:
        with timer.stage("cover"):
            cover = cover_rows(q, k, pattern, config.column_alpha, scale, sampler, row_lse=row_lse)
            pattern, row_mass = cover.selection, cover.row_mass
            if config.selection.group_union:  # a key a row's cover added serves its whole group
                pattern = pattern.shared_by_group(Hq // k.shape[1])
        reason = _density_verdict(config, costs, pattern, layout, B * Hq, D, PLAN_SHARE_MASK)
    if reason is None and config.selection.tile_keys:
        with timer.stage("tiles"):
            pattern = select_tile_keys(
                q, k, pattern, config.alpha, scale, config.selection.tile_rows,
                config.selection.tile_keys, sampler,
            )  # fmt: skip
        reason = _density_verdict(config, costs, pattern, layout, B * Hq, D, PLAN_SHARE_MASK)
    if reason is not None:
        _log_once("density", logging.INFO, "flexsample: dense attention (%s)", reason)
        return dense(reason)
    spec = kernel_backend(backend)
    call = None
    if spec.block_mask:
        with timer.stage("mask"):
            call = pattern.compile(Hq // k.shape[1], static=spec.static_shapes)
    return PrefillPlan(
        path="sparse",
        notes=tuple(notes.values()),
        layout=layout,
        sampler=sampler,
        scores=scores,
        pattern=pattern,
        row_mass=row_mass,
        call=call,
        backend=backend,
        padded=None if call is None else call.padded,
        **common,
    )


def run_plan(plan: PrefillPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Compute the attention a plan decided: compiled block-sparse FlexAttention, the
    pattern's gathered products (``"gather"``, CPU), or dense SDPA.

    The FlexAttention path lays q, k and v out as the pattern's call reads them
    (``plan.call``: for :class:`~flexsample.WindowColumns`, each kv head's columns gathered in
    front of its keys) and runs one FlexAttention call; ``"gather"`` runs
    :meth:`~flexsample.patterns.Pattern.attend`. Where v holds a NaN or an Inf, a sparse
    plan runs dense (logged once), as SDPA would spread it.

    Args:
        plan: from :func:`plan_prefill` on these ``q`` and ``k``.
        q: ``(B, Hq, L, D)``, the last ``L`` positions.
        k: ``(B, Hkv, S, D)``.
        v: ``(B, Hkv, S, D)``.

    Returns:
        ``(B, Hq, L, D)`` in q's dtype.

    Raises:
        ValueError: ``q`` does not have the batch size, heads and length the plan was made for.
    """
    if not torch.compiler.is_compiling():
        B, Hq, L, _ = q.shape
        planned = (plan.batch_size, plan.num_heads, plan.query_len, plan.seq_len)
        if (B, Hq, L, k.shape[2]) != planned:
            raise ValueError(
                f"the plan is for (B, Hq, L, S) = {planned}, got q of shape "
                f"{tuple(q.shape)} and k of shape {tuple(k.shape)}"
            )
        if plan.path == "sparse" and nonfinite_inputs(v=v):  # plan_prefill saw q and k only
            _log_once("nonfinite", logging.WARNING, "flexsample: %s", NONFINITE_V)
            return dense_causal_attention(q, k, v, plan.scale)
    return run_plan_unchecked(plan, q, k, v)


#: Logged once where :func:`run_plan` runs a sparse plan dense because of its values.
NONFINITE_V = "v holds NaN or Inf: the sparse plan ran dense, which spreads them as SDPA does"


def nonfinite_inputs(**tensors: torch.Tensor | None) -> str:
    """The names of the given tensors that hold a NaN or an Inf (``"k, v"``), or ``""``.

    A sparse call would spread a bad key only into the rows whose mask keeps it; dense
    attention spreads it into every later row, as SDPA does. One pass over each tensor
    (a float32 sum) and one read on the host.
    """
    named = [(name, t) for name, t in tensors.items() if t is not None]
    if not named:
        return ""
    sums = torch.stack([t.sum(dtype=torch.float32) for _, t in named])
    finite = torch.isfinite(sums).tolist()
    return ", ".join(name for (name, _), ok in zip(named, finite, strict=True) if not ok)


def run_plan_unchecked(
    plan: PrefillPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """:func:`run_plan` without checking that q and k have the plan's shape: for callers
    that made the plan from these tensors (or from a call of the same signature)."""
    if plan.path == "dense":
        if plan.backend is not None:
            return flex_dense_attention(q, k, v, plan.scale, plan.backend)
        return dense_causal_attention(q, k, v, plan.scale)
    call = plan.call
    if call is None:  # a backend without a BlockMask: the pattern's own products
        return plan.pattern.attend(q, k, v, plan.scale)
    out = sparse_attention(
        call.queries(q),
        call.arrange(k),
        call.arrange(v),
        call.block_mask,
        plan.scale,
        plan.backend or "triton",
        static_shapes=call.padded is not None,
    )
    return call.outputs(out, q.shape[2])


def _dense_plan(
    reason: str,
    common: dict,
    layout: SampleLayout,
    backend: Backend,
    costs: CostModel | None,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
) -> PrefillPlan:
    """A dense plan on the faster dense kernel: FlexAttention on FlashAttention-4 for a whole
    prompt where this device's cost model (``costs``, or looked up where the config's
    explicit limits left it unread) measured it faster than SDPA, else SDPA."""
    dense_prompts = kernel_backend(backend).dense_prompts
    if dense_prompts and layout.query_start == 0 and not torch.compiler.is_compiling():
        costs = costs or _cost_model(device, dtype, backend, quiet=True)  # SDPA needs none
        batch_heads = common["batch_size"] * common["num_heads"]
        if (
            costs is not None
            and costs.dense_kernel(batch_heads, layout.seq_len, head_dim)[0] == "flex"
        ):
            padded = bucket_length(layout.seq_len, DENSE_BLOCK_SIZE)
            return PrefillPlan(
                path="dense", reason=reason, backend=backend, padded=(padded, padded), **common
            )
    return PrefillPlan(path="dense", reason=reason, **common)


def dense_before_sampling(
    config: SampleConfig,
    seq_len: int,
    query_len: int,
    batch_heads: int,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    batch_kv_heads: int | None = None,
) -> str | None:
    """Why :func:`plan_prefill` would choose dense attention before sampling, else None.

    The length checks alone, without tensors: ``config.min_seq_len``, or with
    ``min_seq_len=None`` the device's cost model (the probe, planning and the sparsest call
    against dense attention, see :func:`~flexsample.costs.length_verdict`). Serving engines
    ask it per request, to leave the requests that would run dense to their own kernels.

    Args:
        config: the settings.
        seq_len: keys ``S``.
        query_len: queries ``L <= S`` (the last ``L`` positions).
        batch_heads: ``B * Hq``.
        head_dim: ``D``.
        device: where the attention would run.
        dtype: the inputs' dtype.
        batch_kv_heads: ``B * Hkv`` (the probe reads one query head per kv head); None:
            ``batch_heads``, the dearest probe.
    """
    layout = SampleLayout.create(seq_len, config, query_len=query_len)
    backend = resolve_backend(config.backend, device, dtype, head_dim)
    costs = _cost_model(device, dtype, backend) if config.min_seq_len is None else None
    kv_heads = batch_heads if batch_kv_heads is None else batch_kv_heads
    return _length_reason(config, layout, costs, batch_heads, head_dim, kv_heads)


def _length_reason(
    config: SampleConfig,
    layout: SampleLayout,
    costs: CostModel | None,
    batch_heads: int,
    head_dim: int,
    batch_kv_heads: int,
) -> str | None:
    """:func:`dense_before_sampling` on a layout and the device's cost model (None: none)."""
    if config.min_seq_len is not None:
        if layout.seq_len >= config.min_seq_len:
            return None
        reason = f"seq_len {layout.seq_len} < min_seq_len {config.min_seq_len}"
        _log_once("min_seq_len", logging.INFO, "flexsample: dense attention (%s)", reason)
        return reason
    if costs is None:
        return None
    probe_heads = batch_kv_heads if config.max_density != 1.0 else None  # as plan_prefill
    reason = _cached_length_verdict(costs, batch_heads, head_dim, layout, probe_heads)
    if reason is not None:
        _log_once("length", logging.INFO, "flexsample: dense attention (%s)", reason)
    return reason


@functools.lru_cache(maxsize=4096)
def _cached_length_verdict(
    costs: CostModel,
    batch_heads: int,
    head_dim: int,
    layout: SampleLayout,
    probe_heads: int | None,
) -> str | None:
    # Every layer of a prefill asks the same question: answered once per shape (the
    # cost model and layout are frozen, hashable values; a new calibration is a new key).
    return length_verdict(costs, batch_heads, head_dim, layout, probe_heads=probe_heads)


@functools.lru_cache(maxsize=4096)
def _layout(seq_len: int, config: SampleConfig, query_len: int) -> SampleLayout:
    # Every layer of a prefill lays out the same shape: once per shape and config.
    return SampleLayout.create(seq_len, config, query_len=query_len)


def _cost_model(
    device: torch.device, dtype: torch.dtype, backend: Backend, *, quiet: bool = False
) -> CostModel | None:
    """This device's cost model; None (logged once unless ``quiet``) where there is none."""
    try:
        return cost_model(device, dtype, backend)
    except LookupError as error:
        if not quiet:
            _log_once("no-costs", logging.WARNING, "flexsample: %s; planning every call", error)
        return None


def _density_verdict(
    config: SampleConfig,
    costs: CostModel | None,
    pattern: Pattern,
    layout: SampleLayout,
    batch_heads: int,
    head_dim: int,
    planning_left: float,
) -> str | None:
    """Why the selection should run dense after all (None: run it sparse), counting the
    share ``planning_left`` of planning still ahead (:func:`~flexsample.costs.density_verdict`)."""
    if config.max_density == 1.0 or (config.max_density is None and costs is None):
        return None
    density = pattern.density()
    if config.max_density is not None:
        mean = float(density.mean())
        if mean <= config.max_density:
            return None
        return f"density {mean:.3f} > max_density {config.max_density}"
    pairs = float(density.sum()) * layout.causal_pairs
    return density_verdict(costs, pairs, batch_heads, layout, head_dim, planning_left)


def _probe_verdict(
    config: SampleConfig,
    costs: CostModel | None,
    least: torch.Tensor,
    layout: SampleLayout,
    batch_heads: int,
    head_dim: int,
) -> str | None:
    """Why the probe says no plan can pay (None: plan it).

    ``least`` is :func:`~flexsample.probe.probe_density`'s ``(B, Hq)`` estimate of the least
    density any mask keeping ``alpha`` of the rows' mass computes.
    """
    mean = float(least.mean())
    rows = probe_rows(layout).numel()
    found = (
        f"probe: {rows} rows per head put the least density at {mean:.3f} for alpha {config.alpha}"
    )
    if config.max_density is not None:
        if mean <= config.max_density:
            return None
        return f"{found} > max_density {config.max_density}"
    if costs is None:
        return None
    fixed = layout.fixed_window_blocks
    window = float(window_pairs(layout, layout.min_window_blocks if fixed is None else fixed))
    # The selection comes out denser than this lower bound: weigh the plan it will make.
    margin = TILE_KEYS_OVER_PROBE if config.selection.tile_keys else SELECTION_OVER_PROBE
    expected = (least * margin).clamp(max=1.0)
    pairs = max(float(expected.sum()) * layout.causal_pairs, window * batch_heads)
    plan = costs.plan_s(batch_heads, layout.seq_len, head_dim, layout.num_sampled_rows)
    sparse = costs.sparse_s(pairs, head_dim)
    dense = costs.dense_s(batch_heads, layout.seq_len, head_dim, causal_pairs=chunk_pairs(layout))
    if plan + sparse < dense:
        return None
    return (
        f"{found}: planning ~{plan * 1e3:.3g} ms + a call at {margin:g}x that "
        f"density ~{sparse * 1e3:.3g} ms (what selection makes of it) would not beat dense "
        f"~{dense * 1e3:.3g} ms (cost model of {costs.device!r}, {costs.dtype})"
    )


def _log_once(kind: str, level: int, message: str, *args: object) -> None:
    """Log ``message`` the first time something of this ``kind`` happens in the process."""
    if kind not in _logged_kinds:
        _logged_kinds.add(kind)
        logger.log(level, message, *args)
