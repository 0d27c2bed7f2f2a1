"""Peak extra memory of sampling + selection + mask building at S=32K on CPU.

Measured in a subprocess as the growth of resident memory: with MALLOC_MMAP_THRESHOLD_ low,
every large buffer (inductor's included) is its own mapping and leaves RSS when freed, and
``/proc/self/clear_refs`` resets the high-water mark after warm-up (compilation).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import ctypes, json, torch
    import flexsample as fs

    def rss_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    S, Hq, Hkv, D = 32768, 8, 2, 64
    q, k, v = (torch.randn(1, h, S, D) for h in (Hq, Hkv, Hkv))
    cfg = fs.SampleConfig(sampler="torch")

    def stages():
        return fs.plan_prefill(q, k, cfg)  # sampling, selection and the BlockMask

    stages()  # compile and warm up outside the measurement
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = rss_kib("VmRSS:")
    plan = stages()
    peak = rss_kib("VmHWM:")
    qkv = sum(t.numel() * t.element_size() for t in (q, k, v))
    print(json.dumps({"extra_bytes": (peak - base) * 1024, "qkv_bytes": qkv}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_sampling_selection_mask_memory_at_32k():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    extra, qkv = numbers["extra_bytes"], numbers["qkv_bytes"]
    print(
        f"S=32K Hq=8 Hkv=2 D=64 fp32: peak extra {extra / 2**20:.1f} MiB, "
        f"q+k+v {qkv / 2**20:.1f} MiB"
    )
    assert extra < qkv
