"""The vLLM plugin's tests run in vLLM's own environment (``make test`` creates it, see the
Makefile's ``vllm-test``); in the main environment, which has no vLLM, they are skipped."""

import pytest

pytest.importorskip("vllm", reason="vLLM tests run in the vLLM environment: make vllm-test")
