"""The constants that tune the method, in one place.

Each was chosen by measurement; ``docs/tuning.md`` has what was measured, where and with
which command. Users set :class:`~flexsample.SampleConfig`; these are for developers who
measure again (change one, run the frontier and the speed benchmarks, record the result).
"""

from __future__ import annotations

# --- The cost model's verdicts (flexsample.costs, flexsample.plan) -------------------------

#: How much faster FlexAttention's dense call must be estimated than SDPA's for the dense
#: path to run it (a margin against the calibration's error near the crossover).
DENSE_KERNEL_MARGIN = 0.03

#: The most of dense attention's time the probe may cost: where it finds diffuse attention
#: the call runs dense after it and loses that much, so lengths where the probe costs more
#: run dense without it.
PROBE_SHARE = 0.05

#: How much denser the selection comes out than the probe's least density (a lower bound,
#: the per-row oracle of a few rows): the probe's verdict weighs the plan at this much its
#: estimate.
SELECTION_OVER_PROBE = 1.7
#: The same for query-aware plans (``tile_keys``), which come out less dense for the probe's
#: estimate at ``alpha`` than window + columns plans: the defaults' margin over their pooled
#: ratio on SmolLM2's layers at 8K (1.7 / 1.24), times the query-aware preset's ratio (0.87).
TILE_KEYS_OVER_PROBE = 1.2

#: Shares of planning's time that follow selection: the row cover and the mask together,
#: and the mask alone, so that the verdict after selection counts the planning still
#: ahead, not only the sparse call (lower ends of what was measured).
PLAN_SHARE_AFTER_SELECT = 0.35
PLAN_SHARE_MASK = 0.06

#: ``flexsample calibrate`` times the sparse call with fixed windows of these shares of the
#: sequence: densities from near the floor to where dense attention usually wins, so that
#: the fitted rate per pair is the slope over the densities the verdicts weigh.
CALIBRATION_WINDOWS = (0.05, 0.3, 0.6)
#: The first-use calibration's lengths per device type (``flexsample.costs.cost_model``
#: measures them by itself where no cost model of the device exists): the full calibration's,
#: since shorter ones (1K-4K) decided otherwise at 8K-16K (``docs/tuning.md``).
FIRST_USE_LENGTHS = {"cpu": (1024, 2048, 4096, 8192), "cuda": (8192, 16384, 32768, 65536)}
#: Timed rounds of the first-use calibration (median), after one warm-up call.
FIRST_USE_REPEATS = 3

# --- Selection (flexsample.selection) ---------------------------------------------------

#: Heaviest units per segment that selection weighs: the columns a window candidate takes
#: are the heaviest eligible ones, so where they lie among the first ``TOP_UNITS`` the
#: result is the one the whole sorted list gives, at ``TOP_UNITS / S`` of the work.
TOP_UNITS = 8192

#: Units weighed first: a head whose answer these already decide (every candidate they
#: leave short costs more over them than the winner) is not weighed again over
#: :data:`TOP_UNITS`. Heads with sharp attention need a few hundred columns.
FIRST_UNITS = 1024

#: Memory per device type for weighing a batch of window candidates at once (GPUs:
#: launch-bound, batching pays); where absent, one candidate at a time (CPUs:
#: compute-bound, and planning's memory stays below the size of q, k and v).
SELECT_BUDGET_BYTES = {"cuda": 1 << 28}

# --- The row cover (flexsample.cover) -----------------------------------------------------

#: Keys first searched per short row (its heaviest missing ones); four times more, then a
#: full sort, only where they do not reach ``alpha``.
COVER_FIRST_KEYS = 64

#: A repair adds only keys holding at least ``(1 - alpha) / KEY_FLOOR_DIVISOR`` of the row's
#: mass. A shortfall spread thinner (a diffuse background) would cost thousands of columns,
#: each read by every later query, for a few thousandths of mass: such a row stays short,
#: and ``row_mass`` says by how much. ``alpha = 1`` has no floor.
KEY_FLOOR_DIVISOR = 64

# --- The probe (flexsample.probe) ---------------------------------------------------------

#: Rows probed per segment: its last sampled rows.
PROBE_ROWS_PER_SEGMENT = 1

#: The most probed rows the Triton probe takes (one program holds them all; more, from
#: more than 64 segments, take the torch probe).
MAX_TRITON_PROBE_ROWS = 64
