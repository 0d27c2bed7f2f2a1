"""Datasets and scoring of flexsample's lm-eval tasks (generated offline, deterministic).

lm-eval calls the dataset functions with the task's ``metadata`` merged with the run's
``--model_args``, so prompts are sized with the tokenizer of the model being evaluated:
``tokenizer=`` if given, else ``pretrained=`` (with ``gguf_file=``), else the offline
SmolLM2. ``num_samples`` (default 20) sets the number of prompts per task.
"""

from __future__ import annotations

import functools
import os

import datasets

from flexsample.integrations.haystack import extract_number, spread_depths, task_prompts


@functools.cache
def _load_tokenizer(name: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    from flexsample.integrations.lm_eval import resolve_pretrained

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path, gguf_file = resolve_pretrained(name, gguf_file)
    try:
        if gguf_file:
            return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise FileNotFoundError(
            f"flexsample tasks size prompts with the model's tokenizer and found none at "
            f"{path!r}: pass tokenizer=<local folder> in --model_args"
        ) from e


def _tokenizer(kwargs: dict):
    name = kwargs.get("tokenizer") or kwargs.get("pretrained") or "smollm2"
    return _load_tokenizer(str(name), kwargs.get("gguf_file"))


def _dataset(family: str, kwargs: dict) -> dict[str, datasets.Dataset]:
    length = int(kwargs["length"])
    prompts = task_prompts(family, _tokenizer(kwargs), length, int(kwargs.get("num_samples", 20)))
    docs = [
        {
            "input": prompt.text,
            "answer": prompt.answer,
            "depth": depth,
            "length": length,
            "num_tokens": prompt.num_tokens,
        }
        for prompt, depth in zip(prompts, spread_depths(len(prompts)), strict=True)
    ]
    return {"test": datasets.Dataset.from_list(docs)}


def passkey(**kwargs) -> dict[str, datasets.Dataset]:
    """A 5-digit pass key hidden at evenly spread depths of repetitive filler."""
    return _dataset("passkey", kwargs)


def niah_single(**kwargs) -> dict[str, datasets.Dataset]:
    """One needle "The special magic number for <city> is <7 digits>."."""
    return _dataset("niah_single", kwargs)


def niah_multi(**kwargs) -> dict[str, datasets.Dataset]:
    """Four needles of the same form at spread depths; the question asks for one of them."""
    return _dataset("niah_multi", kwargs)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match: the first number the model generates is the expected one."""
    return {"exact_match": float(extract_number(results[0]) == doc["answer"])}
