"""Random attention inputs with a planted sparse structure, for tests and benchmarks.

Real long-context attention concentrates on a local window, a few attention sinks and a few
"column stripes" (keys many queries attend to). :func:`planted_qkv` builds ``q, k, v`` whose
causal attention has exactly that shape, with the number of stripes per head under control,
so the density SampleAttention should find is known in advance.
"""

from __future__ import annotations

import math

import torch


def planted_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    *,
    stripes: int | tuple[int, int] = 8,
    stripe_width: int = 4,
    sink_tokens: int = 4,
    signal: float = 10.0,
    locality: float = 6.0,
    local_span: int = 256,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values whose causal attention is local + sinks + column stripes.

    Construction, per key/value head: every query carries a shared direction ``u``; sink keys
    (the first ``sink_tokens``) and ``stripes`` runs of ``stripe_width`` keys at random
    positions carry ``u`` too, so their logits stand about ``signal`` above the rest. Queries
    and keys also carry sinusoidal position features whose dot product peaks when the query
    and key are within about ``local_span`` tokens, ``locality`` above the background. The
    remaining entries are Gaussian noise. Query heads of one group share keys, so they share
    stripes, as heads of a GQA group often do.

    Args:
        batch, q_heads, kv_heads, seq_len, head_dim: shapes; ``q_heads % kv_heads == 0`` and
            ``head_dim >= 8``.
        stripes: number of stripes per kv head, or an inclusive ``(low, high)`` range drawn
            per head (so heads differ, as in real models).
        stripe_width: tokens per stripe.
        sink_tokens: leading tokens every query attends to.
        signal: logit boost (after the ``1/sqrt(head_dim)`` scale) of sinks and stripes.
        locality: logit boost of keys close to the query.
        local_span: rough width in tokens of the local peak.
        dtype, device: of the returned tensors.
        seed: makes the draw reproducible.

    Returns:
        ``q (B, Hq, S, D)``, ``k (B, Hkv, S, D)``, ``v (B, Hkv, S, D)``.
    """
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim < 8:
        raise ValueError(f"head_dim must be >= 8, got {head_dim}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else int(torch.randint(2**31, (1,))))
    B, Hq, Hkv, S, D = batch, q_heads, kv_heads, seq_len, head_dim
    group = Hq // Hkv
    root = math.sqrt(math.sqrt(D))  # q.k is scaled by 1/sqrt(D): split the boost evenly

    # Feature layout: dim 0 carries u; dims 1..2F carry F sinusoid pairs; the rest is noise.
    n_freq = max(1, min(8, (D - 1) // 4))
    freqs = torch.logspace(0, 1, n_freq) * (math.pi / (2 * local_span))
    pos = torch.arange(S, dtype=torch.float64)
    angles = pos[:, None] * freqs[None, :]
    pos_feat = torch.cat([angles.cos(), angles.sin()], dim=-1) * math.sqrt(locality / n_freq) * root

    q = 0.5 * torch.randn(B, Hkv, group, S, D, generator=gen, dtype=torch.float64)
    k = 0.5 * torch.randn(B, Hkv, S, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=gen, dtype=torch.float64)
    q[..., 0] = root
    q[..., 1 : 1 + 2 * n_freq] += pos_feat
    k[..., 1 : 1 + 2 * n_freq] += pos_feat
    k[..., 0] = 0.0
    k[:, :, :sink_tokens, 0] = signal * root
    for b in range(B):
        for h in range(Hkv):
            count = (
                stripes
                if isinstance(stripes, int)
                else int(torch.randint(stripes[0], stripes[1] + 1, (1,), generator=gen))
            )
            starts = torch.randint(
                sink_tokens, max(sink_tokens + 1, S - stripe_width), (count,), generator=gen
            )
            for s in starts.tolist():
                k[b, h, s : s + stripe_width, 0] = signal * root
    q = q.reshape(B, Hq, S, D)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))  # type: ignore[return-value]
