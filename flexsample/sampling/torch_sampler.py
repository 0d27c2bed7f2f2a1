"""Stage 1 in plain torch ops: exact probabilities of the sampled rows, chunked over rows.

The CPU production path and the fallback where Triton is missing. Logits are computed for a
chunk of sampled rows at a time against the causal key prefix those rows need, so the largest
temporary is ``chunk_rows x S`` float32 (about ``max_chunk_elems`` elements), never
``rows x S`` per head.
"""

from __future__ import annotations

import torch

from ..layout import SampleLayout

#: Upper bound on the elements of one float32 logits chunk (4 MiB).
DEFAULT_MAX_CHUNK_ELEMS = 1 << 20


def sample_block_scores_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: SampleLayout,
    scale: float,
    *,
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
) -> torch.Tensor:
    """Per-segment sampled attention mass of each uncovered key block, chunked.

    Same contract as :func:`~flexsample.sampling.reference.sample_block_scores_reference`:
    q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)``; returns ``(B, Hq, num_segments, num_blocks)``
    float32. Arithmetic is float32 whatever the input dtype.
    """
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    G, r, nb, bs = (
        layout.num_segments,
        layout.rows_per_segment,
        layout.num_blocks,
        layout.block_size,
    )

    # Work items in (segment, head-in-group, row) order: consecutive rows share a causal
    # prefix length, so a chunk needs only the keys up to its last row.
    rows = layout.sampled_rows(q.device)  # (G, r)
    pos = rows[:, None, :].expand(G, group, r).reshape(-1)  # (G * group * r,)
    head = torch.arange(group, device=q.device)[None, :, None].expand(G, group, r).reshape(-1)
    seg = torch.arange(G, device=q.device)[:, None, None].expand(G, group, r).reshape(-1)
    out_index = head * G + seg  # row of the (group * G, nb) accumulator
    uncovered = layout.uncovered_blocks(pos)  # (N, nb) bool
    key_idx = torch.arange(S, device=q.device)

    chunk = max(1, max_chunk_elems // S)
    n_items = pos.numel()
    out = torch.zeros(B, Hkv, group * G, nb, dtype=torch.float32, device=q.device)
    # Sampled queries, gathered once: (B, Hkv, group, G*r, D) -> per item order above.
    q_rows = q[:, :, rows.flatten()].view(B, Hkv, group, G, r, D)
    q_items = q_rows.permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, n_items, D).float()

    for b in range(B):
        for h in range(Hkv):
            keys = k[b, h].float()  # (S, D); a view when k is already float32
            acc = out[b, h]
            for start in range(0, n_items, chunk):
                stop = min(start + chunk, n_items)
                p_pos = pos[start:stop]
                width = int(p_pos.max()) + 1  # causal prefix this chunk needs
                logits = torch.matmul(q_items[b, h, start:stop], keys[:width].T)
                logits.mul_(scale)
                logits.masked_fill_(key_idx[None, :width] > p_pos[:, None], float("-inf"))
                logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
                total = logits.sum(dim=-1, keepdim=True)
                mass = _block_sums(logits, bs, nb)
                mass.div_(total).mul_(uncovered[start:stop])
                acc.index_add_(0, out_index[start:stop], mass)

    out.div_(r)
    return out.view(B, Hkv, group, G, nb).reshape(B, Hq, G, nb)


def _block_sums(p: torch.Tensor, bs: int, nb: int) -> torch.Tensor:
    """Sum ``p (rows, width)`` over key blocks of ``bs`` columns -> ``(rows, nb)``."""
    rows, width = p.shape
    n_full = width // bs
    out = p.new_zeros(rows, nb)
    out[:, :n_full] = p[:, : n_full * bs].view(rows, n_full, bs).sum(-1)
    if width > n_full * bs:  # one partial block (the prefix ends inside it)
        out[:, n_full] = p[:, n_full * bs :].sum(-1)
    return out
