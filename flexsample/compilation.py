"""How flexsample uses ``torch.compile``: one recompile policy for every compiled function.

Each new dtype, head dim or block size compiles a function once more. Dynamo's default limit
(8 variants per function) is low for a library called with many shapes, and past it Dynamo
silently runs the function eagerly: for FlexAttention that means dense, slow attention.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

#: Compiled variants allowed per function before Dynamo gives up on it.
RECOMPILE_LIMIT = 64


@contextmanager
def recompile_policy(*, fail_on_limit: bool):
    """Raise Dynamo's recompile limit to :data:`RECOMPILE_LIMIT` for the enclosed calls.

    Args:
        fail_on_limit: make reaching the limit an error (for functions whose eager fallback
            would be silently wrong or dense) instead of running eagerly (for functions whose
            eager form is the same computation, only slower).
    """
    config = torch._dynamo.config
    changes: dict[str, object] = {}
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.7
        if hasattr(config, name):
            changes[name] = max(getattr(config, name), RECOMPILE_LIMIT)
            break
    if fail_on_limit and hasattr(config, "fail_on_recompile_limit_hit"):
        changes["fail_on_recompile_limit_hit"] = True
    with config.patch(**changes):
        yield
