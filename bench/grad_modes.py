"""Does ``torch.inference_mode`` slow flexsample down against ``torch.no_grad``? (CUDA)

Times ``flex_sample_attention`` on planted inputs (Llama-3-8B attention shape, bf16) under
``no_grad``, ``inference_mode`` and ``no_grad`` again (the spread between the two ``no_grad``
rows is the noise), medians of 10 calls after 3 warm-up calls, at the defaults and always
sparse (planning every call).

    PYTHONPATH=. python bench/grad_modes.py
"""

from __future__ import annotations

import statistics
import time

import torch

import flexsample as fs
from flexsample.synthetic import planted_case

MODES = (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode))


def median_ms(q, k, v, config, repeats: int = 10) -> float:
    for _ in range(3):
        fs.flex_sample_attention(q, k, v, config=config)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fs.flex_sample_attention(q, k, v, config=config)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    configs = {"defaults": fs.SampleConfig(), "always sparse": fs.SampleConfig.always_sparse()}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ms, median of 10")
    for S in (8192, 32768, 131072):
        q, k, v, _ = planted_case(0.1, 1, 32, 8, S, 128, dtype=torch.bfloat16, device="cuda")
        for label, cfg in configs.items():
            row = {}
            for name, mode in (*MODES, ("no_grad again", torch.no_grad)):
                with mode():
                    row[name] = median_ms(q, k, v, cfg)
            print(S, label, {name: round(ms, 2) for name, ms in row.items()}, flush=True)


if __name__ == "__main__":
    main()
