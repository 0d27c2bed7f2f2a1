"""CUDA-graph replay of planning's launch-bound, sync-free steps.

On a GPU, selection's window search is dozens of small kernels, and the host takes longer to
launch them than the device takes to run them (``docs/tuning.md``). :func:`graphed`
captures such a step in a CUDA graph on its shape's second call (:data:`EAGER_CALLS`: a
prefill's layers share a shape, a length seen once costs no capture) and replays it after
that: one launch, the same kernels.

The eager function is the reference twin: a step runs eagerly on CPU, inside
``torch.compile``, while another capture is under way, where its inputs would be too large to
copy (:data:`MAX_INPUT_BYTES`), where a capture failed (logged once), and everywhere with the
environment variable ``FLEXSAMPLE_CUDA_GRAPHS=0``.

What a graph holds: a copy of its inputs and its outputs, plus its intermediate tensors in one
memory pool per device that every flexsample graph shares (replays never overlap: each waits
for the one before, on any stream). At most :data:`MAX_GRAPHS` graphs are kept, the least
recently used dropped first; :func:`clear` drops them all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger("flexsample")

#: The environment variable that turns graph replay off (``0``).
ENV_VAR = "FLEXSAMPLE_CUDA_GRAPHS"
#: Graphs kept at once (one per step and shape: a prefill's layers share theirs).
MAX_GRAPHS = 16
#: Largest total size of a step's inputs for a graph (each graph keeps a copy of them).
MAX_INPUT_BYTES = 1 << 28
#: Calls of a step and shape that run eagerly before it is captured: a shape seen once (a
#: serving engine's prompt lengths vary) costs no capture; a prefill's layers share one.
EAGER_CALLS = 1


@dataclass(eq=False)
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]
    keep: tuple[object, ...]  # tensors the step reads from elsewhere (caches): kept alive


_graphs: OrderedDict[tuple, _Graph] = OrderedDict()
_failed: set[tuple] = set()
_calls: dict[tuple, int] = {}
_pools: dict[torch.device, tuple] = {}
_last_replay: dict[torch.device, torch.cuda.Event] = {}
_lock = threading.Lock()


def enabled(device: torch.device) -> bool:
    """Whether :func:`graphed` replays graphs for tensors on ``device`` here and now."""
    return (
        device.type == "cuda"
        and os.environ.get(ENV_VAR, "1") != "0"
        and not torch.compiler.is_compiling()
        and not torch.cuda.is_current_stream_capturing()
    )


@contextlib.contextmanager
def use_graphs(on: bool) -> Iterator[None]:
    """Within the block, replay graphs (``on``) or run every step eagerly, as
    ``FLEXSAMPLE_CUDA_GRAPHS`` says; the variable's earlier value is restored after it (for
    benchmarks that time both, and checks that compare them)."""
    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = before


def graphed(
    key: tuple,
    fn: Callable[..., Sequence[torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    *,
    keep: Sequence[object] = (),
) -> tuple[torch.Tensor, ...]:
    """``fn(*inputs)``, through a CUDA graph captured per ``key`` and shape (after
    :data:`EAGER_CALLS` eager calls).

    Args:
        key: everything besides the inputs' shapes, dtypes and devices that ``fn`` depends
            on (its closure's settings); equal keys must mean the same computation.
        fn: a step without host syncs or data-dependent shapes, returning a tuple of tensors.
        inputs: its tensor arguments (copied into the graph's own on every call).
        keep: tensors ``fn`` reads that it did not create (a cache's, say): the graph keeps
            them alive, since it reads their memory on every replay.

    Returns:
        ``fn``'s outputs: fresh tensors, owned by the caller (copies of the graph's).
    """
    if not inputs or not enabled(inputs[0].device):
        return tuple(fn(*inputs))
    size = sum(t.numel() * t.element_size() for t in inputs)
    if size > MAX_INPUT_BYTES:
        return tuple(fn(*inputs))
    device = inputs[0].device
    full_key = (key, tuple((t.shape, t.dtype, t.device) for t in inputs))
    with _lock, torch.cuda.device(device):  # capture and replay on the inputs' GPU
        entry = _graphs.get(full_key)
        if entry is None:
            calls = _calls.get(full_key, 0)
            if full_key in _failed or calls < EAGER_CALLS:
                if len(_calls) >= 4096:
                    _calls.clear()
                _calls[full_key] = calls + 1
                return tuple(fn(*inputs))
            return _capture(full_key, fn, inputs, keep, device)
        _graphs.move_to_end(full_key)
        stream = torch.cuda.current_stream(device)
        last = _last_replay.get(device)
        if last is not None:  # the shared pool: never two replays at once
            stream.wait_event(last)
        for static, x in zip(entry.inputs, inputs, strict=True):
            static.copy_(x)
        entry.graph.replay()
        outputs = tuple(out.clone() for out in entry.outputs)
        done = torch.cuda.Event()
        done.record(stream)
        _last_replay[device] = done
        return outputs


def clear() -> None:
    """Drop every graph (their memory returns to torch's allocator)."""
    with _lock:
        _graphs.clear()
        _failed.clear()
        _calls.clear()
        _last_replay.clear()


def cached_graphs() -> int:
    """How many graphs are kept."""
    return len(_graphs)


def _capture(
    full_key: tuple,
    fn: Callable[..., Sequence[torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    keep: Sequence[object],
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """Run ``fn`` eagerly (its result is this call's), then capture it for the next calls."""
    stream = torch.cuda.current_stream(device)
    last = _last_replay.get(device)
    if last is not None:
        stream.wait_event(last)
    static = tuple(x.clone() for x in inputs)
    side = torch.cuda.Stream(device)
    side.wait_stream(stream)
    # Warm-up on a side stream, as CUDA graphs require (lazy initialisation, cuBLAS
    # workspaces); its result is this call's answer.
    with torch.cuda.stream(side):
        result = tuple(fn(*static))
    stream.wait_stream(side)
    for out in result:  # allocated on the side stream, used on this one
        out.record_stream(stream)
    pool = _pools.get(device)
    if pool is None:
        pool = _pools[device] = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = tuple(fn(*static))
    except RuntimeError as error:  # an operation that cannot be captured: eager from now on
        _failed.add(full_key)
        logger.warning("flexsample: CUDA graph capture failed, running eagerly (%s)", error)
        return result
    _graphs[full_key] = _Graph(graph, static, outputs, tuple(keep))
    while len(_graphs) > MAX_GRAPHS:
        _graphs.popitem(last=False)
    return result
