"""Stage 1 in plain torch ops: exact probabilities of the sampled rows, chunked over rows.

The CPU production path and the fallback where Triton is missing. Logits are computed for a
chunk of sampled rows at a time against the causal key prefix those rows need, so the largest
temporary is ``chunk_rows x S`` float32 (at most ``max_chunk_elems`` elements), never
``rows x S`` per head. On CPU the per-chunk work is compiled with inductor, which fuses the
mask, softmax and block sums into two passes over the logits (about 2.5x faster at 16K than
the same ops run eagerly); elsewhere it runs eagerly.
"""

from __future__ import annotations

import functools

import torch
import torch.fx.experimental._config
import torch.nn.functional as F

from ..compilation import recompile_policy
from ..layout import SampleLayout

#: Upper bound on the elements of one float32 logits chunk (8 MiB).
DEFAULT_MAX_CHUNK_ELEMS = 1 << 21


def chunk_block_mass(
    q_rows: torch.Tensor,
    keys: torch.Tensor,
    pos: torch.Tensor,
    uncovered: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Normalised attention mass per key block for a chunk of sampled rows.

    Args:
        q_rows: ``(c, D)`` float32 queries, already multiplied by the softmax scale.
        keys: ``(W, D)`` float32, the key prefix the chunk needs (``W > max(pos)``).
        pos: ``(c,)`` query positions.
        uncovered: ``(c, ceil(W / block_size))`` bool, blocks to count (see
            :meth:`SampleLayout.uncovered_blocks`).
        block_size: tokens per key block.

    Returns:
        ``(c, ceil(W / block_size))`` float32: each row's causal softmax mass per key block,
        zero where ``uncovered`` is False.
    """
    width = keys.shape[0]
    logits = q_rows @ keys.T
    key_idx = torch.arange(width, device=keys.device)
    logits = logits.masked_fill(key_idx[None, :] > pos[:, None], float("-inf"))
    p = (logits - logits.amax(dim=-1, keepdim=True)).exp()
    total = p.sum(dim=-1, keepdim=True)
    blocks = uncovered.shape[1]
    p = F.pad(p, (0, blocks * block_size - width))
    mass = p.view(p.shape[0], blocks, block_size).sum(dim=-1) / total
    return mass * uncovered


@functools.cache
def _compiled_chunk_block_mass():
    return torch.compile(chunk_block_mass, dynamic=True)


def _chunk_fn(device: torch.device, compiled: bool | None):
    if compiled is None:  # inductor on CUDA needs triton, which this path exists to avoid
        compiled = device.type == "cpu" and not torch.compiler.is_compiling()
    if not compiled:
        return chunk_block_mass
    kernel = _compiled_chunk_block_mass()

    def call(*args):
        # No duck sizing: equal sizes by coincidence (rows == head_dim) must not specialise.
        # Past the recompile limit the eager chunk function is the same computation.
        with (
            torch.fx.experimental._config.patch(use_duck_shape=False),
            recompile_policy(fail_on_limit=False),
        ):
            return kernel(*args)

    return call


def sample_block_scores_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    scale: float,
    *,
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
    compiled: bool | None = None,
) -> torch.Tensor:
    """Per-segment sampled attention mass of each uncovered key block, chunked.

    Same contract as :func:`~flexsample.sampling.reference.sample_block_scores_reference`:
    q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)``; returns ``(B, Hq, num_segments, num_blocks)``
    float32. Arithmetic is float32 whatever the input dtype. ``compiled`` forces the per-chunk
    function to be compiled (True) or eager (False); by default it is compiled on CPU.
    """
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    G, r = layout.num_segments, layout.rows_per_segment
    nb, bs = layout.num_blocks, layout.block_size
    block_mass = _chunk_fn(q.device, compiled)

    # Work items in (segment, head-in-group, row) order: consecutive rows share a causal
    # prefix length, so a chunk needs only the keys up to its last row.
    rows = layout.sampled_rows(q.device)  # (G, r)
    pos = rows[:, None, :].expand(G, group, r).reshape(-1)  # (G * group * r,)
    head = torch.arange(group, device=q.device)[None, :, None].expand(G, group, r).reshape(-1)
    seg = torch.arange(G, device=q.device)[:, None, None].expand(G, group, r).reshape(-1)
    out_index = head * G + seg  # row of the (group * G, nb) accumulator
    uncovered = layout.uncovered_blocks(pos)  # (N, nb) bool

    chunk = max(1, max_chunk_elems // S)
    n_items = pos.numel()
    out = torch.zeros(B, Hkv, group * G, nb, dtype=torch.float32, device=q.device)
    # Sampled queries, gathered once and pre-scaled: (B, Hkv, n_items, D) in item order.
    q_rows = q[:, :, rows.flatten()].view(B, Hkv, group, G, r, D)
    q_items = q_rows.permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, n_items, D).float() * scale

    for b in range(B):
        for h in range(Hkv):
            keys = k[b, h].float()  # (S, D); a view when k is already float32
            for start in range(0, n_items, chunk):
                stop = min(start + chunk, n_items)
                width = int(pos[start:stop].max()) + 1  # causal prefix this chunk needs
                blocks = -(-width // bs)
                mass = block_mass(
                    q_items[b, h, start:stop],
                    keys[:width],
                    pos[start:stop],
                    uncovered[start:stop, :blocks],
                    bs,
                )
                out[b, h, :, :blocks].index_add_(0, out_index[start:stop], mass)

    out.div_(r)
    return out.view(B, Hkv, group, G, nb).reshape(B, Hq, G, nb)
