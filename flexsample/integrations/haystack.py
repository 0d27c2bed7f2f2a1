"""Long-context retrieval prompts (passkey, needle in a haystack), sized with a tokenizer.

Deterministic: the same tokenizer, length, depths and seed give the same prompt. Prompts
are plain text with no chat template, ending in a cue the model completes ("The pass key
is"), the setting in which SmolLM2 answers reliably with dense attention.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about the important information there.\n"
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
NEEDLE = "The special magic number for {name} is {key}. "
NEEDLE_QUESTION = (
    "\nWhat is the special magic number for {name}? The special magic number for {name} is"
)
NAMES = (
    "Lisbon", "Oslo", "Quito", "Nairobi", "Hanoi", "Lima", "Perth", "Tallinn",
    "Dakar", "Bergen", "Cusco", "Porto", "Riga", "Sapporo", "Tunis", "Zurich",
)  # fmt: skip


class Tokenizer(Protocol):
    """What the prompt builders need of a tokenizer: a Hugging Face style ``__call__``."""

    def __call__(self, text: str, add_special_tokens: bool = ...) -> dict: ...


@dataclass(frozen=True)
class HaystackPrompt:
    """A retrieval prompt and its expected answer.

    Attributes:
        text: the prompt.
        answer: the string the model should produce next (e.g. ``"52817"``).
        depths: relative positions of the needles in the filler, in ``[0, 1]``.
        num_tokens: prompt length under the tokenizer used to size it.
    """

    text: str
    answer: str
    depths: tuple[float, ...]
    num_tokens: int


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Tokens of ``text`` as the model will see it (special tokens included)."""
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def _assemble(needles: Sequence[tuple[float, str]], question: str, filler_repeats: int) -> str:
    pieces = [FILLER] * filler_repeats
    # Insert from the deepest needle backwards so earlier insertions keep their index.
    for depth, needle in sorted(needles, key=lambda n: -n[0]):
        pieces.insert(round(depth * filler_repeats), needle)
    return INTRO + "".join(pieces) + question


def haystack_prompt(
    tokenizer: Tokenizer,
    target_tokens: int,
    needles: Sequence[tuple[float, str]],
    question: str,
    answer: str,
) -> HaystackPrompt:
    """The longest prompt of at most ``target_tokens`` with needles at the given depths.

    Args:
        tokenizer: a Hugging Face tokenizer (anything callable like one).
        target_tokens: upper bound on the prompt length in tokens.
        needles: ``(depth, sentence)`` pairs, depth in ``[0, 1]`` of the filler.
        question: the closing text that asks for the answer.
        answer: the expected continuation.

    Raises:
        ValueError: a depth outside ``[0, 1]``, or ``target_tokens`` too small to hold the
            needles and the question.
    """
    if any(not 0.0 <= d <= 1.0 for d, _ in needles):
        raise ValueError(f"needle depths must lie in [0, 1], got {[d for d, _ in needles]}")
    low, high = 0, 1
    if count_tokens(tokenizer, _assemble(needles, question, 0)) > target_tokens:
        raise ValueError(f"target_tokens={target_tokens} cannot hold the needles and question")
    while count_tokens(tokenizer, _assemble(needles, question, high)) <= target_tokens:
        low, high = high, high * 2
    while high - low > 1:  # invariant: low fits, high does not
        mid = (low + high) // 2
        if count_tokens(tokenizer, _assemble(needles, question, mid)) <= target_tokens:
            low = mid
        else:
            high = mid
    text = _assemble(needles, question, low)
    return HaystackPrompt(
        text=text,
        answer=answer,
        depths=tuple(d for d, _ in needles),
        num_tokens=count_tokens(tokenizer, text),
    )


def passkey_prompt(
    tokenizer: Tokenizer, target_tokens: int, depth: float, *, seed: int = 0
) -> HaystackPrompt:
    """A passkey-retrieval prompt: a random 5-digit key hidden at ``depth`` of the filler."""
    key = str(random.Random(seed).randint(10000, 99999))
    return haystack_prompt(
        tokenizer, target_tokens, [(depth, PASSKEY_NEEDLE.format(key=key))], PASSKEY_QUESTION, key
    )


def needle_prompt(
    tokenizer: Tokenizer,
    target_tokens: int,
    depths: Sequence[float],
    *,
    seed: int = 0,
) -> HaystackPrompt:
    """Needle in a haystack with ``len(depths)`` needles; the question asks for one of them.

    Each needle is "The special magic number for <city> is <7 digits>."; the other needles
    are distractors of the same form.
    """
    if not 1 <= len(depths) <= len(NAMES):
        raise ValueError(f"between 1 and {len(NAMES)} needles, got {len(depths)}")
    rng = random.Random(seed)
    names = rng.sample(NAMES, len(depths))
    keys = [str(rng.randint(1_000_000, 9_999_999)) for _ in depths]
    target = rng.randrange(len(depths))
    needles = [
        (d, NEEDLE.format(name=n, key=k)) for d, n, k in zip(depths, names, keys, strict=True)
    ]
    question = NEEDLE_QUESTION.format(name=names[target])
    return haystack_prompt(tokenizer, target_tokens, needles, question, keys[target])


def extract_number(generated: str) -> str | None:
    """The first run of digits in a model's continuation, or None."""
    match = re.search(r"\d+", generated)
    return match.group(0) if match else None


def spread_depths(n: int) -> list[float]:
    """``n`` needle depths spread evenly over ``[0, 1]`` (one needle: the middle)."""
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def _niah_single(tokenizer: Tokenizer, n: int, depth: float, *, seed: int) -> HaystackPrompt:
    return needle_prompt(tokenizer, n, [depth], seed=seed)


def _niah_multi(tokenizer: Tokenizer, n: int, depth: float, *, seed: int) -> HaystackPrompt:
    depths = sorted((depth + shift) % 1.0 for shift in (0.0, 0.27, 0.51, 0.76))
    return needle_prompt(tokenizer, n, depths, seed=seed)


#: The task families of flexsample's lm-eval tasks: ``(tokenizer, tokens, depth, seed=)`` to
#: a prompt. ``passkey``: a 5-digit pass key; ``niah_single``: one needle "The special magic
#: number for <city> is <7 digits>."; ``niah_multi``: four such needles at spread depths, the
#: question asks for one.
TASK_FAMILIES = {"passkey": passkey_prompt, "niah_single": _niah_single, "niah_multi": _niah_multi}


def task_prompts(
    family: str, tokenizer: Tokenizer, length: int, num_samples: int = 20
) -> list[HaystackPrompt]:
    """The prompts of the lm-eval task ``flexsample_<family>_<length>``: one per depth of
    :func:`spread_depths`, sample ``i`` seeded with ``length * 1000 + i``."""
    if family not in TASK_FAMILIES:
        raise ValueError(f"unknown task family {family!r}; known: {sorted(TASK_FAMILIES)}")
    make = TASK_FAMILIES[family]
    return [
        make(tokenizer, length, depth, seed=length * 1000 + i)
        for i, depth in enumerate(spread_depths(num_samples))
    ]
