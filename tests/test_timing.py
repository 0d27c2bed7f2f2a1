"""The interleaved timer shared by the cost model's calibration and the benchmarks."""

import time

import pytest
import torch

from flexsample.timing import interleaved_medians


def test_each_function_warms_up_once_then_runs_once_per_round_in_turn():
    calls = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    medians = interleaved_medians(fns, torch.device("cpu"), 3)
    assert calls == list("abc") * 4  # one warm-up round, then three timed rounds
    assert len(medians) == 3 and all(isinstance(m, float) and m >= 0 for m in medians)


def test_setups_run_untimed_before_each_call():
    calls = []
    fns = [lambda name=name: calls.append(name) for name in "ab"]
    setups = [lambda name=name: calls.append(name.upper()) for name in "ab"]
    interleaved_medians(fns, torch.device("cpu"), 2, setups=setups)
    assert calls == ["A", "a", "B", "b"] * 3  # before the warm-up call and every timed one
    slow = [lambda: __import__("time").sleep(0.05)]
    assert interleaved_medians([lambda: None], torch.device("cpu"), 1, setups=slow)[0] < 0.04
    with pytest.raises(ValueError, match="setups must have one function per fn: 1 for 2"):
        interleaved_medians(fns, torch.device("cpu"), 1, setups=setups[:1])


def test_device_clock_is_wall_time_off_cuda():
    nap = [lambda: time.sleep(0.02)]
    (seconds,) = interleaved_medians(nap, torch.device("cpu"), 1, clock="device")
    assert 0.02 <= seconds < 1.0  # the sleep's wall time, in seconds


@pytest.mark.parametrize(
    "kwargs, message",
    [({"rounds": 0}, "rounds must be >= 1"), ({"rounds": 1, "clock": "cpu"}, "clock must be")],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        interleaved_medians([lambda: None], torch.device("cpu"), **kwargs)
