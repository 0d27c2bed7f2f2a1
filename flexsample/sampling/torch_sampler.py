"""Stage 1 in plain torch ops: exact probabilities of the sampled rows, chunked over rows.

The CPU production path and the fallback where Triton is missing. Logits are computed for a
chunk of sampled rows at a time against the causal key prefix those rows need, so the largest
temporary is ``chunk_rows x S`` float32 (at most ``max_chunk_elems`` elements), never
``rows x S`` per head. On CPU the per-chunk work is compiled with inductor, which fuses the
mask and softmax into two passes over the logits; elsewhere it runs eagerly.
"""

from __future__ import annotations

import functools

import torch
import torch.fx.experimental._config

from ..compilation import recompile_policy
from ..layout import SampleLayout

#: Upper bound on the elements of one float32 logits chunk (8 MiB).
DEFAULT_MAX_CHUNK_ELEMS = 1 << 21


def chunk_probabilities(
    q_rows: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Causal softmax probabilities of a chunk of sampled rows.

    Args:
        q_rows: ``(c, D)`` float32 queries, already multiplied by the softmax scale.
        keys: ``(W, D)`` float32, the key prefix the chunk needs (``W > max(pos)``).
        pos: ``(c,)`` query positions.

    Returns:
        ``(c, W)`` float32: each row's causal softmax over the prefix (zero after the row).
    """
    return causal_softmax_(q_rows @ keys.T, pos)


def causal_softmax_(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Each row's softmax over the keys up to its own position ``pos`` (zero after it).

    Args:
        logits: ``(c, W)`` scaled scores of rows against keys ``0 .. W - 1``; masked in
            place (pass a tensor of your own).
        pos: ``(c,)`` the rows' positions.
    """
    key_idx = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill_(key_idx[None, :] > pos[:, None], float("-inf")).softmax(dim=-1)


def grouped_probabilities(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    bounds: list[int],
    start: int,
    stop: int,
    pos: torch.Tensor,
    num_keys: int | None = None,
) -> torch.Tensor:
    """Causal softmax probabilities of rows ``start .. stop - 1`` of ``q_rows``, whose rows
    are ordered by the kv head they read: one matrix product per kv head the span holds.

    Args:
        q_rows: ``(R, D)`` queries, already multiplied by the softmax scale, in the dtype of
            the result.
        k: ``(B, Hkv, S, D)`` keys.
        bounds: for each kv head ``b * Hkv + kv`` in turn, the end of its rows in ``q_rows``
            (cumulative counts).
        start, stop: the span of rows.
        pos: ``(R,)`` the rows' query positions.
        num_keys: keys ``0 .. num_keys - 1`` (``S`` if None; more than the span's last row).

    Returns:
        ``(stop - start, num_keys)``: each row's causal softmax (zero after the row).
    """
    Hkv, S = k.shape[1], k.shape[2]
    width = S if num_keys is None else num_keys
    logits = torch.empty(stop - start, width, dtype=q_rows.dtype, device=q_rows.device)
    lo = start
    for slot, end in enumerate(bounds):  # the kv heads this span holds rows of
        hi = min(end, stop)
        if hi > lo:
            b, kv = divmod(slot, Hkv)
            keys = k[b, kv, :width].to(q_rows.dtype)
            torch.mm(q_rows[lo:hi], keys.T, out=logits[lo - start : hi - start])
            lo = hi
    return causal_softmax_(logits, pos[start:stop])


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def cpu_compiled(fn, device: torch.device, compiled: bool | None = None):
    """``fn`` compiled with inductor where that pays (on CPU, outside another compilation).

    ``compiled`` forces it (True) or the eager function (False). Shapes are dynamic, without
    duck sizing (equal sizes by coincidence, rows == head_dim, must not specialise); past the
    recompile limit the eager function runs, the same computation.
    """
    if compiled is None:  # inductor on CUDA needs triton, which this path exists to avoid
        compiled = device.type == "cpu" and not torch.compiler.is_compiling()
    if not compiled:
        return fn
    kernel = _compiled(fn)

    def call(*args):
        with (
            torch.fx.experimental._config.patch(use_duck_shape=False),
            recompile_policy(fail_on_limit=False),
        ):
            return kernel(*args)

    return call


def sample_column_scores_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    scale: float,
    *,
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
    compiled: bool | None = None,
) -> torch.Tensor:
    """Per-segment sampled attention mass of each key, chunked.

    Same contract as :func:`~flexsample.sampling.reference.sample_column_scores_reference`:
    q ``(B, Hq, L, D)`` (the last ``L`` positions), k ``(B, Hkv, S, D)``; returns
    ``(B, Hq, num_segments, S)`` float32. Arithmetic is float32 whatever the input dtype.
    ``compiled`` forces the per-chunk function to be compiled (True) or eager (False); by
    default it is compiled on CPU.
    """
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    G, r = layout.num_segments, layout.rows_per_segment
    probabilities = cpu_compiled(chunk_probabilities, q.device, compiled)

    # Work items in (segment, head-in-group, row) order: consecutive rows share a causal
    # prefix length, so a chunk needs only the keys up to its last row.
    rows = layout.sampled_rows(q.device)  # (G, r)
    pos = rows[:, None, :].expand(G, group, r).reshape(-1)  # (G * group * r,)
    head = torch.arange(group, device=q.device)[None, :, None].expand(G, group, r).reshape(-1)
    seg = torch.arange(G, device=q.device)[:, None, None].expand(G, group, r).reshape(-1)
    out_index = head * G + seg  # row of the (group * G, S) accumulator

    chunk = max(1, max_chunk_elems // S)
    n_items = pos.numel()
    out = torch.zeros(B, Hkv, group * G, S, dtype=torch.float32, device=q.device)
    # Sampled queries, gathered once and pre-scaled: (B, Hkv, n_items, D) in item order.
    q_rows = q[:, :, rows.flatten() - layout.query_start].view(B, Hkv, group, G, r, D)
    q_items = q_rows.permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, n_items, D).float() * scale

    for b in range(B):
        for h in range(Hkv):
            keys = k[b, h].float()  # (S, D); a view when k is already float32
            for start in range(0, n_items, chunk):
                stop = min(start + chunk, n_items)
                width = int(pos[start:stop].max()) + 1  # causal prefix this chunk needs
                p = probabilities(q_items[b, h, start:stop], keys[:width], pos[start:stop])
                out[b, h, :, :width].index_add_(0, out_index[start:stop], p)

    out.div_(r)
    return out.view(B, Hkv, group, G, S).reshape(B, Hq, G, S)
