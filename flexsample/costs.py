"""When sparse pays: a per-device model of what dense attention, planning and the sparse call cost.

SampleAttention wins only where planning (sampling, selection, the per-row cover, the mask)
plus the sparse call costs less than dense attention. Both sides are close to linear in simple
counts, so each is modelled as a fixed cost plus rates:

* dense causal attention: ``B * Hq * S (S + 1) / 2`` pairs times ``D``;
* planning: ``B * Hq * S`` (selection and mask work per key: sorting, the window candidates)
  plus ``B * Hq * sampled rows * S`` (row, key) products times ``D`` (two or three passes of
  the sampled rows over the keys);
* the sparse call: the (query, key) pairs it computes, gathered columns included, times ``D``;
* the probe (:mod:`flexsample.probe`): a fixed cost plus ``B * Hkv * probed rows * S``
  products times ``D`` (one query head of each kv group is probed); where it finds diffuse
  attention the call runs dense after it, so its cost is what such a call loses
  (:data:`PROBE_SHARE` bounds it);
* where the sparse call runs on FlashAttention-4 (``backend="flash"``), dense causal attention
  through the same FlexAttention kernel with every causal tile, which beats cuDNN's SDPA on
  Hopper at long lengths: the dense path runs whichever of the two the model says is faster.

The rates are measured per device, dtype and FlexAttention backend by
:func:`~flexsample.calibration.calibrate` (``flexsample calibrate``) and cached under the
user's cache directory. Where this machine has none for a device, dtype and backend, the
first planned call measures them (a bounded first-use calibration, seconds; see
:func:`cost_model`): no machine decides on another's numbers, since devices of one name
differ (``docs/tuning.md``). With that turned off (``$FLEXSAMPLE_AUTO_CALIBRATE=0``), the table
shipped with the package (``flexsample/costs.json``: the devices the project measured)
stands in. :func:`cost_model` says which in ``source``.

``$FLEXSAMPLE_COST_TABLE`` names a cost file whose entries replace all of these for every
device of their kind and dtype, whatever its name: a way to run as another machine would
(``make test-foreign`` runs the tests on a table of another CPU), or to try a calibration
made elsewhere. The variable is read where the models are read (once per process, again
after :func:`clear_cache`); a file without an entry for the device's kind and dtype raises.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .layout import SampleLayout, window_pairs
from .probe import probe_rows
from .tuning import DENSE_KERNEL_MARGIN, PROBE_SHARE
from .version import __version__

BUILTIN = Path(__file__).with_name("costs.json")
#: Environment variable naming a cost file that replaces every other table (see above).
FORCED_TABLE_ENV = "FLEXSAMPLE_COST_TABLE"
#: Environment variable that turns the first-use calibration off (``0``).
AUTO_CALIBRATE_ENV = "FLEXSAMPLE_AUTO_CALIBRATE"

logger = logging.getLogger("flexsample")


def user_cache() -> Path:
    """Where :func:`save` writes a calibration: ``$FLEXSAMPLE_CACHE_DIR/costs.json``, else
    under ``$XDG_CACHE_HOME`` (default ``~/.cache``) ``/flexsample/costs.json``."""
    env = os.environ
    return _user_cache(env.get("FLEXSAMPLE_CACHE_DIR"), env.get("XDG_CACHE_HOME"), env.get("HOME"))


@functools.cache
def _user_cache(root: str | None, xdg: str | None, home: str | None) -> Path:
    # Asked on every planned call: the path is built once per environment (Path.home()
    # alone takes tens of microseconds).
    if root:
        return Path(root) / "costs.json"
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "flexsample" / "costs.json"


def device_name(device: torch.device) -> str:
    """The key of a device in the cost tables: the GPU's name, or the CPU's model and threads.

    Asked on every planned call: the names are read once per process.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _gpu_name(index)
    return f"cpu {_cpu_model()} x{torch.get_num_threads()}"


@functools.cache
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class CostModel:
    """Seconds that dense attention, planning and the sparse call take on one device, dtype and
    FlexAttention backend.

    Attributes:
        device: the device key (:func:`device_name`).
        kind: the device type, ``"cpu"`` or ``"cuda"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        dense_fixed_s, dense_pair_s: dense causal SDPA (cuDNN first on CUDA): fixed seconds,
            and seconds per (query, key) pair and head-dim element.
        plan_fixed_s, plan_token_s, plan_pair_s: planning: fixed seconds, seconds per key
            and head, and seconds per (sampled row, key) product and head-dim element.
        sparse_fixed_s, sparse_pair_s: the sparse call: fixed seconds, and seconds per
            computed pair and head-dim element.
        source: where the numbers come from (a calibration's date, the built-in table).
        backend: the FlexAttention backend the sparse call was measured on (``"triton"``
            or ``"flash"``, see ``SampleConfig.backend``).
        flex_dense_fixed_s, flex_dense_pair_s: dense causal attention of a whole prompt
            through FlexAttention on ``backend`` (every causal tile), as for SDPA; None
            where not measured (it is measured for ``"flash"`` only: on Triton it is slower
            than SDPA).
        probe_fixed_s, probe_pair_s: the probe as a call on diffuse attention pays it
            (planning up to the probe's dense verdict): fixed seconds, and seconds per
            (probed row, key) product and head-dim element; None where not measured (cost files
            written before flexsample 0.4: the length verdict then leaves the probe out).
        version: the flexsample version that measured it (empty in older files).
        automatic: measured by the first-use calibration (a short one), not by
            ``flexsample calibrate``: measured again when the version changes.
    """

    device: str
    kind: str
    dtype: str
    dense_fixed_s: float
    dense_pair_s: float
    plan_fixed_s: float
    plan_token_s: float
    plan_pair_s: float
    sparse_fixed_s: float
    sparse_pair_s: float
    source: str = ""
    backend: str = "triton"
    flex_dense_fixed_s: float | None = None
    flex_dense_pair_s: float | None = None
    probe_fixed_s: float | None = None
    probe_pair_s: float | None = None
    version: str = ""
    automatic: bool = False

    def sdpa_s(
        self, batch_heads: int, seq_len: int, head_dim: int, *, causal_pairs: int | None = None
    ) -> float:
        """Estimated seconds of dense causal SDPA: ``seq_len (seq_len + 1) / 2`` pairs per
        head, or ``causal_pairs`` (a chunk's queries, see :attr:`SampleLayout.causal_pairs`)."""
        per_head = seq_len * (seq_len + 1) / 2 if causal_pairs is None else causal_pairs
        return self.dense_fixed_s + self.dense_pair_s * batch_heads * per_head * head_dim

    def flex_dense_s(self, batch_heads: int, seq_len: int, head_dim: int) -> float | None:
        """Estimated seconds of a whole prompt's dense causal attention through FlexAttention
        on :attr:`backend`; None where not measured."""
        if self.flex_dense_pair_s is None:
            return None
        pairs = batch_heads * seq_len * (seq_len + 1) / 2
        return (self.flex_dense_fixed_s or 0.0) + self.flex_dense_pair_s * pairs * head_dim

    def dense_kernel(
        self, batch_heads: int, seq_len: int, head_dim: int, *, causal_pairs: int | None = None
    ) -> tuple[str, float]:
        """The faster dense kernel and its estimated seconds: ``("sdpa", s)``, or
        ``("flex", s)`` for a whole prompt (``causal_pairs`` None) where FlexAttention's
        dense call is estimated faster by :data:`DENSE_KERNEL_MARGIN`. Chunks
        (``causal_pairs`` given) run SDPA."""
        sdpa = self.sdpa_s(batch_heads, seq_len, head_dim, causal_pairs=causal_pairs)
        flex = (
            None if causal_pairs is not None else self.flex_dense_s(batch_heads, seq_len, head_dim)
        )
        if flex is not None and flex < (1 - DENSE_KERNEL_MARGIN) * sdpa:
            return "flex", flex
        return "sdpa", sdpa

    def dense_s(
        self, batch_heads: int, seq_len: int, head_dim: int, *, causal_pairs: int | None = None
    ) -> float:
        """Estimated seconds of dense causal attention on the faster kernel
        (:meth:`dense_kernel`): what a sparse plan must beat."""
        return self.dense_kernel(batch_heads, seq_len, head_dim, causal_pairs=causal_pairs)[1]

    def plan_s(self, batch_heads: int, seq_len: int, head_dim: int, sampled_rows: int) -> float:
        """Estimated seconds of planning (sample, select, cover, mask)."""
        tokens = batch_heads * seq_len
        return (
            self.plan_fixed_s
            + self.plan_token_s * tokens
            + self.plan_pair_s * tokens * sampled_rows * head_dim
        )

    def probe_s(
        self, batch_kv_heads: int, seq_len: int, head_dim: int, probed_rows: int
    ) -> float | None:
        """Estimated seconds of the probe of ``probed_rows`` rows of one query head per kv
        head (``batch_kv_heads = B * Hkv``); None where not measured."""
        if self.probe_pair_s is None:
            return None
        products = batch_kv_heads * seq_len * probed_rows * head_dim
        return (self.probe_fixed_s or 0.0) + self.probe_pair_s * products

    def sparse_s(self, pairs: float, head_dim: int) -> float:
        """Estimated seconds of the sparse call computing ``pairs`` (query, key) pairs in all."""
        return self.sparse_fixed_s + self.sparse_pair_s * pairs * head_dim

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _entries(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["models"]
    except (OSError, ValueError, KeyError):
        return []


#: Fields an entry may leave out (files written before they existed), with their defaults.
_OPTIONAL = {
    f.name: f.default
    for f in dataclasses.fields(CostModel)
    if f.default is not dataclasses.MISSING and f.name != "source"
}


def _model(entry: dict, source: str) -> CostModel | None:
    """The entry as a model; None for an entry of another version's format."""
    fields = {f.name for f in dataclasses.fields(CostModel)}
    if not set(entry) <= fields or not fields - set(_OPTIONAL) <= set(entry):
        return None
    return CostModel(**{**_OPTIONAL, **entry, "source": f"{source}: {entry['source']}"})


def _backend(entry: dict) -> str:
    return entry.get("backend", "triton")


@functools.cache
def _lookup(
    name: str, kind: str, dtype: str, backend: str, cache_file: str, forced_file: str | None
) -> tuple[CostModel, bool]:
    """The model, and whether this machine measured it for this device, dtype and backend
    (by this version, for a first-use calibration's)."""
    if forced_file:
        return _forced(Path(forced_file), kind, dtype, backend), True
    files = ((Path(cache_file), "calibrated"), (BUILTIN, "built-in"))
    # This device with the backend asked for, then with the other one (its sparse rates and
    # dense kernels are then the other backend's, as the source says).
    for same_backend in (True, False):
        for path, label in files:
            for entry in _entries(path):
                if (entry.get("device"), entry.get("dtype")) != (name, dtype):
                    continue
                if (_backend(entry) == backend) != same_backend:
                    continue
                note = label if same_backend else f"{label}, {_backend(entry)} backend"
                model = _model(entry, note)
                if model is not None:
                    # The built-in table is another machine's measurement, even under this
                    # device's name (a CPU's name says little of its speed): only this
                    # machine's own calibration is exact.
                    current = not model.automatic or model.version == __version__
                    return model, same_backend and path != BUILTIN and current
    for entry in _entries(BUILTIN):  # a device of the same kind that the project measured
        if entry.get("kind") == kind and entry.get("dtype") == dtype:
            note = f"measured on {entry['device']}, not on {name} (run `flexsample calibrate`)"
            model = _model(entry, note)
            if model is not None:
                return model, False
    raise LookupError(f"no cost model for {kind} {dtype}")


def _forced(path: Path, kind: str, dtype: str, backend: str) -> CostModel:
    """The entry of ``$FLEXSAMPLE_COST_TABLE``'s file for this kind and dtype (this backend's
    if it has one)."""
    if not path.is_file():
        raise LookupError(f"${FORCED_TABLE_ENV}: no such file {path}")
    candidates = [e for e in _entries(path) if (e.get("kind"), e.get("dtype")) == (kind, dtype)]
    candidates.sort(key=lambda e: _backend(e) != backend)
    for entry in candidates:
        model = _model(entry, f"${FORCED_TABLE_ENV} ({path.name}, {entry.get('device')})")
        if model is not None:
            return model
    raise LookupError(f"${FORCED_TABLE_ENV} ({path}) has no cost model for {kind} {dtype}")


def cost_model(device: torch.device, dtype: torch.dtype, backend: str = "triton") -> CostModel:
    """The cost model for ``device``, ``dtype`` and the sparse call's FlexAttention
    ``backend``: this machine's calibration.

    Where this machine has none (or a first-use one of another flexsample version), the
    first call measures one: a first-use calibration (:func:`set_calibrator`; seconds on a
    CPU, announced by one warning), saved in the user cache (:func:`user_cache`) and read
    from there by every later process. It does not run inside ``torch.compile`` tracing or
    CUDA graph capture, under ``$FLEXSAMPLE_COST_TABLE``, or with
    ``$FLEXSAMPLE_AUTO_CALIBRATE=0``; there, and where it fails (logged), the built-in table
    stands in: its entry for this device and backend, else for this device and the other
    backend, else a device of the same kind, saying so in ``source``.

    Read once per process and (device, dtype, backend); :func:`clear_cache` reads again.

    Raises:
        LookupError: no entry for this kind of device and dtype (and none could be
            measured); the plan then samples every call it is given (and logs why once).
    """
    key = (device, dtype, backend)
    model = _MODELS.get(key)
    if model is None:
        device = torch.device(device)
        name, dtype_key = device_name(device), dtype_name(dtype)
        forced = os.environ.get(FORCED_TABLE_ENV) or None
        try:
            model, exact = _lookup(name, device.type, dtype_key, backend, str(user_cache()), forced)
        except LookupError as error:
            missing, model, exact = error, None, False
        if not exact and _may_calibrate(device):
            model = _calibrate_first_use(device, dtype, backend, name) or model
        if model is None:
            raise missing
        _MODELS[key] = model
    return model


#: The first-use calibration: ``(device, dtype, backend) -> CostModel``, measuring a short
#: calibration on this machine. Set by :mod:`flexsample.calibration` (it runs the planner,
#: which sits above this module); None: none.
_calibrator: Callable[[torch.device, torch.dtype, str], CostModel] | None = None
#: True while a first-use calibration runs (its own planned calls must not start another).
_calibrating = False
#: (device name, dtype, backend) whose first-use calibration failed in this process.
_failed: set[tuple[str, str, str]] = set()


def set_calibrator(calibrator: Callable[[torch.device, torch.dtype, str], CostModel]) -> None:
    """Install the first-use calibration :func:`cost_model` runs where no cost model of
    this device exists."""
    global _calibrator
    _calibrator = calibrator


def auto_calibration_enabled() -> bool:
    """Whether a missing cost model is measured on first use (``$FLEXSAMPLE_AUTO_CALIBRATE``
    is not ``0``, and no ``$FLEXSAMPLE_COST_TABLE`` decides instead)."""
    env = os.environ
    return env.get(AUTO_CALIBRATE_ENV, "1") != "0" and not env.get(FORCED_TABLE_ENV)


def _may_calibrate(device: torch.device) -> bool:
    if _calibrator is None or _calibrating or not auto_calibration_enabled():
        return False
    if torch.compiler.is_compiling():
        return False
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def _calibrate_first_use(
    device: torch.device, dtype: torch.dtype, backend: str, name: str
) -> CostModel | None:
    """Measure, save and return this device's cost model; None (logged) where it fails."""
    global _calibrating
    key = (name, dtype_name(dtype), backend)
    if key in _failed:
        return None
    logger.warning(
        "flexsample: no cost model of %r (%s, %s backend) for flexsample %s: measuring one "
        "now, once (seconds; saved in %s; %s=0 turns this off)",
        name, key[1], backend, __version__, user_cache(), AUTO_CALIBRATE_ENV,
    )  # fmt: skip
    _calibrating = True
    try:
        model = _calibrator(device, dtype, backend)
        save(model)
    except Exception as error:
        _failed.add(key)
        logger.warning("flexsample: the first-use calibration failed (%r)", error)
        return None
    finally:
        _calibrating = False
    return _lookup(name, device.type, key[1], backend, str(user_cache()), None)[0]


#: :func:`cost_model` per (device, dtype, backend): asked on every planned call, where the
#: lookup (the environment's cache folder, the device's name) is a measurable share of a
#: short call's host time.
_MODELS: dict[tuple, CostModel] = {}
#: Bumped by :func:`clear_cache`: decisions cached on the models read so far are stale.
_generation = 0


def clear_cache() -> None:
    """Forget the cost models read so far: the next :func:`cost_model` reads the files (and
    ``$FLEXSAMPLE_CACHE_DIR``) again, and decisions cached on them are made again
    (:func:`generation`). :func:`save` calls it."""
    global _generation
    _MODELS.clear()
    _lookup.cache_clear()
    _generation += 1


def generation() -> int:
    """How many times :func:`clear_cache` ran: a decision cached with an older value was made
    on cost models (or backends) that have changed since."""
    return _generation


def save(model: CostModel, path: Path | None = None) -> Path:
    """Add (or replace) ``model`` in the cost file ``path`` (default :func:`user_cache`)."""
    path = path or user_cache()
    key = (model.device, model.dtype, model.backend)
    entries = [e for e in _entries(path) if (e["device"], e["dtype"], _backend(e)) != key]
    entries.append(model.to_json())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"models": entries}, indent=1) + "\n")
    clear_cache()
    return path


def chunk_pairs(layout: SampleLayout) -> int | None:
    """``causal_pairs`` for :meth:`CostModel.dense_s`: None for a whole prompt, the causal
    pairs of a chunk's queries otherwise."""
    return None if layout.query_start == 0 else layout.causal_pairs


def length_verdict(
    model: CostModel,
    batch_heads: int,
    head_dim: int,
    layout: SampleLayout,
    *,
    probe_heads: int | None = None,
) -> str | None:
    """Why a sparse call cannot beat dense attention at this length (None if it may).

    The best a plan can do is compute only its windows' floor; if planning plus that costs
    at least dense attention, planning is wasted. Where the plan probes first
    (:mod:`flexsample.probe`) the probe's ``probe_heads`` (``B * Hkv``) count too, and it
    may cost at most :data:`PROBE_SHARE` of dense attention: on diffuse attention that is
    what the call loses. A model without the probe's rates (an older cost file) leaves it
    out.
    """
    S = layout.seq_len
    fixed = layout.fixed_window_blocks
    floor_blocks = layout.min_window_blocks if fixed is None else fixed
    floor = float(window_pairs(layout, floor_blocks)) * batch_heads
    rows = layout.num_segments * layout.rows_per_segment
    plan = model.plan_s(batch_heads, S, head_dim, rows)
    probe_s = None
    if probe_heads is not None:
        probe_s = model.probe_s(probe_heads, S, head_dim, probe_rows(layout).numel())
    plan += probe_s or 0.0
    best = plan + model.sparse_s(floor, head_dim)
    dense = model.dense_s(batch_heads, S, head_dim, causal_pairs=chunk_pairs(layout))
    queries = "" if layout.query_start == 0 else f" ({layout.query_len} queries)"
    of_model = f"(cost model of {model.device!r}, {model.dtype})"
    if best >= dense:
        return (
            f"seq_len {S}{queries}: planning ~{plan * 1e3:.3g} ms + the sparsest call ~"
            f"{(best - plan) * 1e3:.3g} ms would not beat dense ~{dense * 1e3:.3g} ms {of_model}"
        )
    if probe_s is not None and probe_s > PROBE_SHARE * dense:
        return (
            f"seq_len {S}{queries}: the probe ~{probe_s * 1e3:.3g} ms is "
            f"{probe_s / dense:.0%} of dense ~{dense * 1e3:.3g} ms, more than the "
            f"{PROBE_SHARE:.0%} a call on diffuse attention may lose to it {of_model}"
        )
    return None


def density_verdict(
    model: CostModel,
    pairs: float,
    batch_heads: int,
    layout: SampleLayout,
    head_dim: int,
    planning_left: float = 0.0,
) -> str | None:
    """Why the planned sparse call, with the share ``planning_left`` of planning still to
    run (:data:`PLAN_SHARE_AFTER_SELECT`, :data:`PLAN_SHARE_MASK`), would not beat dense
    attention (None if it would). Planning already done is spent either way."""
    S = layout.seq_len
    left = planning_left * model.plan_s(batch_heads, S, head_dim, layout.num_sampled_rows)
    sparse = model.sparse_s(pairs, head_dim) + left
    dense = model.dense_s(batch_heads, S, head_dim, causal_pairs=chunk_pairs(layout))
    if sparse < dense:
        return None
    density = pairs / (batch_heads * layout.causal_pairs)
    rest = f" + the rest of planning ~{left * 1e3:.3g} ms" if left else ""
    return (
        f"density {density:.3f}: the sparse call ~{(sparse - left) * 1e3:.3g} ms{rest} would "
        f"not beat dense ~{dense * 1e3:.3g} ms (cost model of {model.device!r}, {model.dtype})"
    )
