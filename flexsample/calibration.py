"""Measuring a device's cost model: ``flexsample calibrate``.

Times dense attention, planning, the probe and the sparse call on this machine and fits
each as a fixed cost plus rates (:class:`~flexsample.costs.CostModel`); :func:`save` writes
the result where :func:`~flexsample.costs.cost_model` reads it first.

:func:`first_use_calibration` is the short form :func:`~flexsample.costs.cost_model` runs by
itself where no cost model of the device exists (importing this module installs it).
"""

from __future__ import annotations

import datetime
import functools
import itertools

import torch

from .attention import dense_causal_attention, flex_dense_attention
from .backends import kernel_backend, resolve_backend
from .config import SampleConfig
from .costs import CostModel, device_name, dtype_name, save, set_calibrator
from .layout import SampleLayout
from .plan import plan_prefill, run_plan
from .probe import probe_rows
from .synthetic import single_token_stripes
from .testing import random_qkv
from .timing import interleaved_medians
from .tuning import CALIBRATION_WINDOWS, FIRST_USE_LENGTHS, FIRST_USE_REPEATS
from .version import __version__

__all__ = ["calibrate", "first_use_calibration", "fit_rates", "save"]


def fit_rates(points: list[tuple[tuple[float, ...], float]]) -> tuple[float, ...]:
    """Least squares ``seconds = fixed + sum(rate_i * work_i)`` through ``(work, seconds)``
    points in relative terms (each residual over its point's seconds), every coefficient
    non-negative: of the fits of every subset of the terms whose coefficients all come out
    non-negative, the one with the smallest residual.

    Relative, because the points span decades (8K to 64K tokens is 64x the work): an absolute
    fit follows the longest length and can lose a fixed cost that decides the short ones
    (``docs/tuning.md``).

    Returns:
        ``(fixed, rate_1, ..., rate_n)``.
    """
    seconds = torch.tensor([s for _, s in points], dtype=torch.float64).clamp_min(1e-12)
    x = torch.tensor([(1.0, *work) for work, _ in points], dtype=torch.float64) / seconds[:, None]
    y = torch.ones_like(seconds)
    scale = x.abs().amax(dim=0).clamp_min(1e-300)  # work counts span many decades
    best, best_residual = torch.zeros(x.shape[1], dtype=torch.float64), float(y.square().sum())
    for subset in itertools.product((False, True), repeat=x.shape[1]):
        keep = torch.tensor(subset)
        if not bool(keep.any()):
            continue
        a = x[:, keep] / scale[keep]
        solution = torch.linalg.lstsq(a, y[:, None]).solution.flatten() / scale[keep]
        if bool((solution < 0).any()):
            continue
        residual = float((x[:, keep] @ solution - y).square().sum())
        if residual < best_residual:
            best = torch.zeros(x.shape[1], dtype=torch.float64)
            best[keep] = solution
            best_residual = residual
    return tuple(float(c) for c in best)


def calibrate(
    device: torch.device,
    dtype: torch.dtype,
    *,
    lengths: tuple[int, ...] | None = None,
    heads: tuple[int, int, int] | None = None,
    repeats: int = 5,
    backend: str | None = None,
    automatic: bool = False,
) -> CostModel:
    """Measure the cost model of ``device`` and ``dtype`` (seconds to minutes; compiles once).

    Times dense causal SDPA, the default planning and the sparse call at three densities
    (fixed windows, :data:`CALIBRATION_WINDOWS`) on planted inputs with single-token stripes,
    and the probe as a diffuse call pays it (planning on random q/k, which the probe sends
    dense: the probe, its verdict's read on the host and the work around them), in turn
    within each repeat, at three or four lengths, and fits each cost as fixed + rates x work
    (non-negative least squares). The sparse call runs on the
    backend ``SampleConfig.backend="auto"`` picks here; where that is FlashAttention-4, dense
    causal attention through it (:func:`~flexsample.attention.flex_dense_attention`) is
    timed and fitted too. Pass the result to :func:`save` to use it from then on.

    Args:
        device: where to measure.
        dtype: the dtype the model will serve.
        lengths: the sequence lengths (default 1024 to 8192 on CPU, four: planning's
            three rates fitted to three lengths followed each run's noise; 8192 to 65536 on
            CUDA, four, around where the dense kernels cross).
        heads: ``(Hq, Hkv, D)`` (default 8, 2, 64 on CPU; 32, 8, 128 on CUDA).
        repeats: timed rounds (median), after one warm-up call of each.
        backend: the sparse call's FlexAttention backend (default: what
            ``SampleConfig.backend="auto"`` picks here).
        automatic: mark the model as a first-use calibration's.
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    lengths = lengths or ((8192, 16384, 32768, 65536) if gpu else (1024, 2048, 4096, 8192))
    Hq, Hkv, D = heads or ((32, 8, 128) if gpu else (8, 2, 64))
    backend = backend or resolve_backend("auto", device, dtype, D)
    plan_config = SampleConfig.always_sparse().replace(backend=backend)
    # The defaults past the length verdict; a numeric max_density, so that the probe finds
    # random q/k too dense whatever cost model there is now.
    probe_config = SampleConfig(min_seq_len=0, max_density=0.5, backend=backend)
    dense, plan, sparse, flex_dense, probe = [], [], [], [], []
    # no_grad, as models run prefill (planning under inference_mode measured slower).
    with torch.no_grad():
        for S in lengths:
            # Structured attention (single-token stripes holding all but about 1% of the
            # mass, as bench/speed.py's): what planning costs where sparse can pay.
            q, k, v = single_token_stripes(Hq, Hkv, S, D, dtype, device)
            # Diffuse attention (random q/k): the probe finds it and the call runs dense, so
            # what planning cost is what the probe costs such a call (the probe, its
            # verdict's read on the host, the checks and lookups around them).
            with torch.random.fork_rng(devices=[device] if gpu else []):
                torch.manual_seed(0)
                dq, dk, _ = random_qkv(1, Hq, Hkv, S, D, dtype, device)
            if plan_prefill(dq, dk, probe_config).path != "dense":
                raise RuntimeError(f"calibrate: the probe did not send random q/k dense at {S}")
            layout = SampleLayout.create(S, plan_config)
            rows = layout.num_segments * layout.rows_per_segment
            plans = [
                plan_prefill(q, k, plan_config.replace(window_ratio=r)) for r in CALIBRATION_WINDOWS
            ]
            fns = [
                functools.partial(dense_causal_attention, q, k, v, D**-0.5),
                functools.partial(plan_prefill, q, k, plan_config),
                functools.partial(plan_prefill, dq, dk, probe_config),
                *(functools.partial(run_plan, p, q, k, v) for p in plans),
            ]
            if kernel_backend(backend).dense_prompts:
                fns.append(functools.partial(flex_dense_attention, q, k, v, D**-0.5, backend))
            dense_s, plan_s, probe_s, *rest = interleaved_medians(fns, device, repeats)
            sparse_s, flex_s = rest[: len(plans)], rest[len(plans) :]
            pairs = (Hq * S * (S + 1) / 2 * D,)
            flex_dense += [(pairs, seconds) for seconds in flex_s]
            dense.append((pairs, dense_s))
            plan.append(((Hq * S, Hq * S * rows * D), plan_s))
            probe.append(((Hkv * S * probe_rows(layout).numel() * D,), probe_s))
            for p, seconds in zip(plans, sparse_s, strict=True):
                sparse.append(((float(p.density.sum()) * S * (S + 1) / 2 * D,), seconds))
    dense_fit, plan_fit, sparse_fit, probe_fit = (
        fit_rates(dense),
        fit_rates(plan),
        fit_rates(sparse),
        fit_rates(probe),
    )
    flex_fit = fit_rates(flex_dense) if flex_dense else (None, None)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    shape = f"Hq={Hq} Hkv={Hkv} D={D}, S in {', '.join(map(str, lengths))}"
    how = "first-use calibration" if automatic else "flexsample calibrate"
    return CostModel(
        device=device_name(device),
        kind=device.type,
        dtype=dtype_name(dtype),
        dense_fixed_s=dense_fit[0],
        dense_pair_s=dense_fit[1],
        plan_fixed_s=plan_fit[0],
        plan_token_s=plan_fit[1],
        plan_pair_s=plan_fit[2],
        sparse_fixed_s=sparse_fit[0],
        sparse_pair_s=sparse_fit[1],
        source=f"{how}, {stamp}, torch {torch.__version__}, {shape}",
        backend=backend,
        flex_dense_fixed_s=flex_fit[0],
        flex_dense_pair_s=flex_fit[1],
        probe_fixed_s=probe_fit[0],
        probe_pair_s=probe_fit[1],
        version=__version__,
        automatic=automatic,
    )


def first_use_calibration(device: torch.device, dtype: torch.dtype, backend: str) -> CostModel:
    """:func:`calibrate` in its short form (:data:`FIRST_USE_LENGTHS`,
    :data:`FIRST_USE_REPEATS` rounds): what :func:`~flexsample.costs.cost_model` measures by
    itself where no cost model of this device exists."""
    device = torch.device(device)
    return calibrate(
        device,
        dtype,
        lengths=FIRST_USE_LENGTHS[device.type],
        repeats=FIRST_USE_REPEATS,
        backend=backend,
        automatic=True,
    )


set_calibrator(first_use_calibration)
