"""Fixtures shared by the test suite (tests/) and the benchmark suites (bench/)."""

from __future__ import annotations

import os

import pytest

# A machine without a cost model of its own measures one on first use (flexsample.costs): the
# suites turn that off (tests that assert decisions fix their table; the first-use
# calibration has its own test), so that a run on a new machine does not time it in workers.
os.environ.setdefault("FLEXSAMPLE_AUTO_CALIBRATE", "0")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M and its tokenizer, loaded once per session (skips if not installed).

    Tests that enable flexsample on it disable it again; the teardown makes sure.
    """
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from flexsample.integrations.models import SMOLLM2, ModelNotInstalled, load_model

    try:
        SMOLLM2.path()
    except ModelNotInstalled as e:
        pytest.skip(str(e))
    model, tokenizer = load_model(SMOLLM2)
    yield model, tokenizer
    import flexsample.integrations.transformers as fst

    fst.disable(model)
