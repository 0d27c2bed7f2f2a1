"""Random attention inputs with a planted sparse structure, for tests and benchmarks.

Real long-context attention concentrates on a local window, a few attention sinks and a few
"column stripes" (keys many queries attend to). :func:`planted_qkv` builds ``q, k, v`` whose
causal attention has exactly that shape, with the number of stripes per head under control,
so the density SampleAttention should find is known in advance.
"""

from __future__ import annotations

import math

import torch

from .config import SampleConfig


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
    stripe_scope: int | None = None,
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
    remaining entries are Gaussian noise, and far from the diagonal the local features add
    only about ``locality / sqrt(head_dim)`` of logit noise. Query heads of one group share
    keys, so they share stripes, as heads of a GQA group often do.

    With ``stripe_scope``, a stripe is read only by the queries of one ``stripe_scope``-row
    region after it (drawn per stripe) instead of by all: columns a query-aware mask must
    find per query region. Each region's queries carry a dimension of their own (noise-free,
    taken from the local features, whose strength stays ``locality``), and so do the keys of
    its stripes instead of ``u``. There are at most ``(head_dim - 1) // 2`` such
    dimensions: beyond that many regions, regions ``r, r + n, ...`` share one, and a stripe
    is read by those of them after it.

    Args:
        batch: ``B``.
        q_heads: ``Hq``, a multiple of ``kv_heads``.
        kv_heads: ``Hkv``.
        seq_len: ``S``.
        head_dim: ``D``, at least 8.
        stripes: number of stripes per kv head, or an inclusive ``(low, high)`` range drawn
            per head (so heads differ, as in real models).
        stripe_width: tokens per stripe.
        sink_tokens: leading tokens every query attends to.
        signal: logit boost (after the ``1/sqrt(head_dim)`` scale) of sinks and stripes.
        locality: logit boost of keys close to the query.
        local_span: width in tokens of the local peak (the boost falls linearly to zero).
        stripe_scope: rows of the query region that reads each stripe (None: every later
            query reads every stripe).
        dtype: of the returned tensors.
        device: where the tensors are made (drawn there directly).
        seed: makes the draw reproducible.

    Returns:
        ``q (B, Hq, S, D)``, ``k (B, Hkv, S, D)``, ``v (B, Hkv, S, D)``.

    Raises:
        ValueError: ``q_heads`` not a multiple of ``kv_heads``, ``head_dim < 8`` or a
            ``stripe_scope`` below 1.
    """
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim < 8:
        raise ValueError(f"head_dim must be >= 8, got {head_dim}")
    if stripe_scope is not None and stripe_scope < 1:
        raise ValueError(f"stripe_scope must be at least 1 row, got {stripe_scope}")
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int(torch.randint(2**31, (1,))))
    B, Hq, Hkv, S, D = batch, q_heads, kv_heads, seq_len, head_dim
    group = Hq // Hkv
    root = math.sqrt(math.sqrt(D))  # q.k is scaled by 1/sqrt(D): split the boost evenly
    f32 = {"dtype": torch.float32, "device": device}

    # Dim 0 carries u. Dims 1.. carry a local feature r(t): boxcar-smoothed noise along the
    # sequence, so r(i).r(j) / m follows a triangle max(0, 1 - |i - j| / span) and, far away,
    # fluctuates by only 1 / sqrt(m).
    # With stripe_scope, the last `reserved` dimensions carry the query regions instead
    # (noise-free, one dimension per region, regions r, r + reserved, ... sharing one).
    regions = 0 if stripe_scope is None else -(-S // stripe_scope)
    reserved = min((D - 1) // 2, regions)
    m = D - 1 - reserved
    span = max(1, min(local_span, S))
    white = torch.randn(B, Hkv, S + span, m, generator=gen, **f32)
    csum = white.cumsum(dim=2)
    local = (csum[:, :, span:] - csum[:, :, :-span]) / math.sqrt(span)  # (B, Hkv, S, m)
    local *= math.sqrt(locality * math.sqrt(D) / m)

    q = 0.5 * torch.randn(B, Hkv, group, S, D, generator=gen, **f32)
    k = 0.5 * torch.randn(B, Hkv, S, D, generator=gen, **f32)
    v = torch.randn(B, Hkv, S, D, generator=gen, **f32)
    q[..., 1 : 1 + m] += local[:, :, None]
    k[..., 1 : 1 + m] += local
    if reserved:
        q[..., 1 + m :] = 0.0
        k[..., 1 + m :] = 0.0
        for region in range(regions):
            rows = slice(region * stripe_scope, (region + 1) * stripe_scope)
            q[:, :, :, rows, 1 + m + region % reserved] = root
    q[..., 0] = root
    k[..., 0] = 0.0
    k[:, :, :sink_tokens, 0] = signal * root
    # Stripe positions are drawn on the CPU so the same seed gives the same structure anywhere.
    cpu_gen = torch.Generator().manual_seed(
        int(torch.randint(2**31, (1,), generator=gen, device=device))
    )
    for b in range(B):
        for h in range(Hkv):
            count = (
                stripes
                if isinstance(stripes, int)
                else int(torch.randint(stripes[0], stripes[1] + 1, (1,), generator=cpu_gen))
            )
            high = max(sink_tokens + 1, S - stripe_width)
            for s in torch.randint(sink_tokens, high, (count,), generator=cpu_gen).tolist():
                if stripe_scope is None:
                    k[b, h, s : s + stripe_width, 0] = signal * root
                    continue
                first = -(-(s + stripe_width) // stripe_scope)  # regions wholly after it
                if first < regions:  # else no region after it: a stripe nobody reads
                    region = int(torch.randint(first, regions, (1,), generator=cpu_gen))
                    k[b, h, s : s + stripe_width, 1 + m + region % reserved] = signal * root
    q = q.reshape(B, Hq, S, D)
    return tuple(t.to(dtype) for t in (q, k, v))  # type: ignore[return-value]


def single_token_stripes(
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prompt of 16 to 32 single-token key columns per kv head holding all but about 1%
    of the mass at any length (the signal grows with ``log S``), seed 0: the structured
    input the calibration, the speed runner and the GPU tests share."""
    return planted_qkv(
        1, q_heads, kv_heads, seq_len, head_dim, stripes=(16, 32), stripe_width=1, seed=0,
        signal=max(10.0, math.log(100 * seq_len / 64)), dtype=dtype, device=device,
    )  # fmt: skip


def planted_case(
    target_density: float,
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    *,
    block_size: int = 128,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SampleConfig]:
    """Planted inputs and a config whose SampleAttention mask has about ``target_density``
    (planned sparse whatever the cost model would say: ``SampleConfig.always_sparse``).

    With ``N = ceil(S / block_size)`` tiles per side, a window of ``w`` tiles keeps about
    ``2 w / N`` of the causal tiles and each column stripe about ``1 / N``. Half the target
    goes to the window (``window_ratio = target / 4``), half to stripes
    (``round(target * N / 2)`` per kv head); the sink adds about ``2 / N``. The planted keys'
    logit boost grows with ``log S`` so the background holds about 1% of the mass. The density
    actually reached is what the stats report: near the target when ``N`` is large, above it
    at short lengths where one tile is a large fraction.

    Args:
        target_density: wanted fraction of causal tiles, in ``(0, 1]``.
        batch: ``B``.
        q_heads: ``Hq``.
        kv_heads: ``Hkv``.
        seq_len: ``S``.
        head_dim: ``D``.
        block_size: tile side of the returned config.
        dtype: of the returned tensors.
        device: where the tensors are made.
        seed: makes the draw reproducible.

    Returns:
        ``q, k, v`` as :func:`planted_qkv` and the matching :class:`SampleConfig`.

    Raises:
        ValueError: ``target_density`` outside ``(0, 1]``.
    """
    if not 0 < target_density <= 1:
        raise ValueError(f"target_density must lie in (0, 1], got {target_density}")
    n = math.ceil(seq_len / block_size)
    # Whole-block stripes, a fixed window and a sink block: the tile arithmetic above (token
    # columns would keep far fewer pairs than the target).
    # Always planned sparse: the case exists to time the sparse path at a given density.
    config = SampleConfig.always_sparse(
        window_ratio=target_density / 4,
        block_size=block_size,
        min_window=block_size,
        column_unit="block",
        sink_blocks=1,
    )
    # Keep the local peak inside the window so the planted structure is window + stripes, and
    # make the planted keys strong enough that the S background keys hold only about 1% of
    # the mass, whatever the length (else covering the background sets the density).
    span = max(16, min(256, int(config.selection.window_ratio * seq_len) // 2))
    stripes = max(1, round(target_density * n / 2))
    heavy_tokens = 4 + 4 * stripes  # sink + stripes, at planted_qkv's default widths
    q, k, v = planted_qkv(
        batch,
        q_heads,
        kv_heads,
        seq_len,
        head_dim,
        stripes=stripes,
        signal=max(10.0, math.log(100 * seq_len / heavy_tokens)),
        local_span=span,
        dtype=dtype,
        device=device,
        seed=seed,
    )
    return q, k, v, config
