"""A quick look at FlexAttention's FlashAttention-4 backend on a GPU (minutes, no report).

At 16384 and 16000 tokens (Llama-3-8B attention shape, planted single-token stripes, bf16),
every layer sparse: the Triton and the FLASH backend's first call (compilation included),
ten more calls of the attention alone (host wall clock, a rough figure: ``bench/gpu_run.py``
times with CUDA events), the output error against SDPA and the difference between the
backends. Then cuDNN attention called through aten directly on grouped K/V against
flexsample's dense path (equal outputs? host time per call): a lead for the dense path's
host overhead.

    python3 bench/flash_smoke.py    # with flash-attn-4 installed (pip install "flexsample[flash]")

Output of one run: ``bench/results/gpu_NVIDIA_H200_flash_smoke.txt``.
"""

import time

import torch
import torch.nn.functional as F

import flexsample as fs
from flexsample.synthetic import planted_qkv

dev = torch.device("cuda", 0)
print("flash_unavailable:", fs.flash_unavailable(dev, torch.bfloat16, 128))
for S in (16384, 16000):
    q, k, v = planted_qkv(
        1,
        32,
        8,
        S,
        128,
        stripes=(16, 32),
        stripe_width=1,
        signal=12.0,
        dtype=torch.bfloat16,
        device=dev,
        seed=0,
    )
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    outs = {}
    for be in ("triton", "flash"):
        cfg = fs.SampleConfig.always_sparse(backend=be)
        t = time.time()
        out, st = fs.flex_sample_attention(q, k, v, config=cfg, return_stats=True)
        torch.cuda.synchronize()
        outs[be] = out
        plan = fs.plan_prefill(q, k, cfg)
        fs.run_plan(plan, q, k, v)
        torch.cuda.synchronize()
        t1 = time.time()
        for _ in range(10):
            fs.run_plan(plan, q, k, v)
        torch.cuda.synchronize()
        err = float(
            (out.float() - ref.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt()
        )
        print(
            f"S={S} {be}: ran {st.backend}, padded {plan.padded}, first call {t1 - t:.1f} s, "
            f"attention {(time.time() - t1) * 100:.2f} ms, err {err:.4f}, "
            f"density {st.mean_density:.4f}"
        )
    d = (outs["triton"].float() - outs["flash"].float()).abs().max()
    print(f"S={S} max |triton - flash| = {float(d):.3e}")
print("flash_unavailable after:", fs.flash_unavailable(dev, torch.bfloat16, 128))
# cuDNN through aten directly on grouped K/V (no sdpa_kernel context): equal, and host time?
q, k, v = (torch.randn(1, h, 8192, 128, device=dev, dtype=torch.bfloat16) for h in (32, 8, 8))
try:
    o = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, False, 0.0, True, False, scale=128**-0.5
    )[0]
    r = fs.dense_causal_attention(q, k, v, 128**-0.5)
    print("aten cudnn gqa vs dense path:", float((o.float() - r.float()).abs().max()))
    for name, fn in {
        "aten": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, False, 0.0, True, False, scale=128**-0.5
        ),
        "dense_causal_attention": lambda: fs.dense_causal_attention(q, k, v, 128**-0.5),
    }.items():
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            fn()
        print(f"host {name}: {(time.perf_counter() - t) / 200 * 1e6:.1f} us")
        torch.cuda.synchronize()
except Exception as e:
    print("aten cudnn:", type(e).__name__, str(e).splitlines()[0][:200])
