"""Offline vLLM generation with or without flexsample's backend: answers, timings, stats.

Run in vLLM's environment (``make vllm-env`` creates it). Builds passkey prompts on the
offline SmolLM2 (saved once as a transformers directory, since vLLM does not read this GGUF),
generates greedily with ``vllm.LLM`` in this process, and writes one JSON object: each
prompt's expected key, the generated text, the key found in it, seconds per round, and the
plugin's totals (:func:`flexsample.integrations.vllm.stats`).

The tests (``tests/vllm_plugin``) and the prefill benchmark (``bench/vllm_bench.py``) call it as a
subprocess: one engine per process.

    python bench/vllm_run.py --backend CUSTOM --passkey 3000 --out run.json
    python bench/vllm_run.py --passkey 3000 --short 2 --max-num-batched-tokens 1024 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# Stats and logs of the attention backend live in the engine core: keep it in this process.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


SHORT = [
    "Once upon a time, in a small village by the sea,",
    "The three primary colours are",
    "Water boils at a temperature of",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=None, help="attention backend (CUSTOM: flexsample)")
    parser.add_argument("--passkey", type=int, default=3000, help="passkey prompt tokens")
    parser.add_argument("--depth", type=float, default=0.4, help="needle depth in the filler")
    parser.add_argument("--short", type=int, default=0, help="short prompts beside the long one")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="token budget per step"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="model dtype (auto: vLLM's choice, the model's bfloat16 on x86 and Arm CPUs)",
    )
    parser.add_argument("--max-tokens", type=int, default=12, help="tokens to generate")
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds, each with fresh prompts (timing)"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import flexsample.integrations.vllm as plugin
    from flexsample.integrations.haystack import extract_number, passkey_prompt
    from flexsample.integrations.models import transformers_directory

    model = transformers_directory()
    tokenizer = AutoTokenizer.from_pretrained(model)
    engine = {"attention_config": {"backend": args.backend}} if args.backend else {}
    if args.max_num_batched_tokens:
        engine["max_num_batched_tokens"] = args.max_num_batched_tokens
    llm = LLM(
        model=str(model),
        max_model_len=8192,
        enforce_eager=True,
        gpu_memory_utilization=float(os.environ.get("FLEXSAMPLE_VLLM_MEMORY", "0.2")),
        enable_prefix_caching=False,  # every round must prefill its prompt
        dtype=args.dtype,
        seed=0,
        **engine,
    )
    # Every request decodes max_tokens tokens (no early end): the short ones keep decoding
    # while the long one prefills.
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rounds = []
    for r in range(args.rounds):
        long = passkey_prompt(tokenizer, args.passkey, args.depth, seed=r + 1)
        # Short prompts first: they prefill in the first step and then decode in the steps
        # that prefill the long prompt's chunks (the scheduler serves running requests first).
        prompts = [SHORT[i % len(SHORT)] for i in range(args.short)] + [long.text]
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        texts = [o.outputs[0].text for o in outputs]
        rounds.append(
            {
                "seconds": seconds,
                "prompt_tokens": [len(o.prompt_token_ids) for o in outputs],
                "expected": long.answer,
                "found": extract_number(texts[-1]),
                "texts": texts,
            }
        )
    result = {
        "backend": args.backend or "default",
        "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "flexsample_config": os.environ.get("FLEXSAMPLE_VLLM_CONFIG", ""),
        "rounds": rounds,
        "stats": plugin.stats(),
    }
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
