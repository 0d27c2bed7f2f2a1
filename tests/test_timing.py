"""The interleaved timer shared by the cost model's calibration and the benchmarks."""

import pytest
import torch

from flexsample.timing import interleaved_medians


def test_each_function_warms_up_once_then_runs_once_per_round_in_turn():
    calls = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    medians = interleaved_medians(fns, torch.device("cpu"), 3)
    assert calls == list("abc") * 4  # one warm-up round, then three timed rounds
    assert len(medians) == 3 and all(isinstance(m, float) and m >= 0 for m in medians)


def test_device_clock_is_wall_time_off_cuda():
    assert len(interleaved_medians([lambda: None], torch.device("cpu"), 1, clock="device")) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [({"rounds": 0}, "rounds must be >= 1"), ({"rounds": 1, "clock": "cpu"}, "clock must be")],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        interleaved_medians([lambda: None], torch.device("cpu"), **kwargs)
