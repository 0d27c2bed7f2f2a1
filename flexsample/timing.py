"""Timing several functions fairly on a shared machine: interleaved rounds, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Literal

import torch

Clock = Literal["wall", "device"]


def interleaved_medians(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    rounds: int,
    *,
    clock: Clock = "wall",
    setups: Sequence[Callable[[], object]] | None = None,
) -> list[float]:
    """Median seconds of each of ``fns``, timed in turn within every round.

    Each function is called once first (compilation, autotuning), untimed. Then every round
    calls each function once, in order: a slow stretch of a shared machine slows every
    function of that round alike, so ratios between them hold (on a 2-core CPU the same call
    varies by 10-20% over minutes).

    Args:
        fns: functions without arguments.
        device: where they run; on CUDA the device is synchronised around each call.
        rounds: timed rounds (>= 1).
        clock: ``"wall"``: host seconds from before the call to its device work's end (what
            a caller waits for, host work included); ``"device"``: on CUDA the time between
            two events around the call (the GPU's own time), elsewhere wall seconds.
        setups: one function per entry of ``fns``, called untimed before each of its calls
            (e.g. switching a model's attention to the mode the function times).

    Returns:
        One median per function, in seconds, in the order of ``fns``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if clock not in ("wall", "device"):
        raise ValueError(f"clock must be 'wall' or 'device', got {clock!r}")
    if setups is not None and len(setups) != len(fns):
        raise ValueError(f"setups must have one function per fn: {len(setups)} for {len(fns)}")
    before = list(setups) if setups is not None else [lambda: None] * len(fns)
    cuda = device.type == "cuda"
    events = cuda and clock == "device"
    for setup, fn in zip(before, fns, strict=True):
        setup()
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for setup, fn, times in zip(before, fns, samples, strict=True):
            setup()
            if cuda:
                torch.cuda.synchronize(device)
            if events:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
                continue
            begin = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - begin)
    return [statistics.median(times) for times in samples]


class StageTimer:
    """Wall time per stage, synchronising the device so asynchronous work is counted."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled and not torch.compiler.is_compiling()
        self.device = device
        self.times: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        # named for torch.profiler (bench/plan_stages.py attributes launches and syncs to it)
        with torch.profiler.record_function(f"flexsample::{name}"):
            yield
            self._sync()
        self.times[name] = time.perf_counter() - start
