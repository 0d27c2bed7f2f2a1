"""vLLM end to end on SmolLM2: offline generation and the OpenAI-compatible server.

Each engine runs in its own process (``bench/vllm_run.py``; the server through vLLM's own
module); answers are compared with vLLM's own backend on the same prompts, on a passkey prompt
of about 3K tokens.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "vllm_run.py"
PASSKEY = 3000
pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", **extra)
    env.pop("TRITON_INTERPRET", None)  # set by tests/conftest.py for the main suite only
    return env


def run_engine(tmp_path: Path, name: str, *args: str, config: str = "") -> tuple[dict, str]:
    """Run ``bench/vllm_run.py`` with ``args``; ``(its JSON, its log)``."""
    out = tmp_path / f"{name}.json"
    env = _env(FLEXSAMPLE_VLLM_CONFIG=config)
    proc = subprocess.run(
        [sys.executable, str(RUN), *args, "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # vLLM logs to stdout
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return json.loads(out.read_text()), proc.stdout


CHUNKED = ("--passkey", str(PASSKEY), "--short", "2", "--max-num-batched-tokens", "1024")
#: Every prompt of at least 512 tokens (each chunk of the long one) through flexsample and
#: every layer of it sparse, whatever this machine's cost model says: these tests are of the
#: sparse path inside vLLM; the short prompts stay with vLLM's kernel. A 128-token window
#: floor: with 0.4's 512 a 3K prompt would keep most pairs in the window.
SPARSE = json.dumps({"min_seq_len": 512, "max_density": 1.0, "min_window": 128})
#: What the cost model would leave to vLLM's kernel is tested against fixed tables in the
#: main suite (tests/test_costs.py); the dtypes are pinned: vLLM's "auto" is bfloat16 on
#: CPUs with AVX512-BF16 or AMX, and the CPU cache layout follows the dtype.


@pytest.fixture(scope="module")
def baselines(tmp_path_factory) -> dict:
    """vLLM's own backend, chunked prefill of the long prompt beside two short requests, per
    dtype (run when first asked for)."""
    runs: dict[str, dict] = {}

    def get(dtype: str) -> dict:
        if dtype not in runs:
            folder = tmp_path_factory.mktemp(f"baseline-{dtype}")
            result, _ = run_engine(folder, "baseline", *CHUNKED, "--dtype", dtype)
            runs[dtype] = result["rounds"][0]
        return runs[dtype]

    return get


@pytest.mark.parametrize("dtype", [pytest.param("float32", marks=pytest.mark.full), "bfloat16"])
def test_chunked_prefill_beside_decoding_requests(tmp_path, baselines, dtype):
    baseline = baselines(dtype)
    # Chunks of at most 1024 tokens: the first attends to itself; the second and third to
    # context read back from the paged cache in the layout of this CPU's kernel for the dtype
    # (amx for bfloat16 on AMX CPUs); the two short requests prefill beside the first chunk
    # and decode beside the others, through vLLM's kernel.
    result, log = run_engine(
        tmp_path, "chunked", "--backend", "CUSTOM", *CHUNKED, "--dtype", dtype, config=SPARSE
    )
    assert result["dtype"] == dtype
    answer = result["rounds"][0]
    assert answer["found"] == answer["expected"] == baseline["found"]
    assert answer["texts"][:-1] == baseline["texts"][:-1]  # the wrapped backend's, exactly
    stats = result["stats"]
    assert stats["unread_context_requests"] == 0, log[-4000:]
    assert stats["sparse_requests"] == 3 and stats["sparse_tokens"] == answer["prompt_tokens"][-1]
    assert stats["layer_calls"] == 3 * 30 and stats["dense_layer_calls"] == 0  # SmolLM2's 30
    assert 0 < stats["mean_density"] < 1
    assert stats["wrapped_tokens"] > 0  # shared steps with the short requests
    steps = re.findall(
        r"flexsample: 1 prefill\(s\), (\d+) tokens( after (\d+) context tokens)?: 30/30 layer", log
    )
    assert len(steps) == 3, log[-4000:]
    assert [int(c or 0) for _, _, c in steps] == [
        0,
        int(steps[0][0]),
        sum(int(t) for t, *_ in steps[:2]),
    ]


def test_openai_server_answers_a_long_completion(tmp_path, baselines):
    from transformers import AutoTokenizer

    from flexsample.integrations.haystack import extract_number, passkey_prompt
    from flexsample.integrations.models import transformers_directory

    model = transformers_directory()
    prompt = passkey_prompt(AutoTokenizer.from_pretrained(model), PASSKEY, 0.4, seed=1)
    port = 8000 + os.getpid() % 1000
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--attention-backend", "CUSTOM", "--max-model-len", "8192", "--enforce-eager",
            "--gpu-memory-utilization", "0.2", "--dtype", "bfloat16",
            "--max-num-batched-tokens", "1024",
        ],
        env=_env(FLEXSAMPLE_VLLM_CONFIG=SPARSE),
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 10 minutes"
            time.sleep(2)
        body = {"model": str(model), "prompt": prompt.text, "max_tokens": 12, "temperature": 0}
        request = urllib.request.Request(
            f"{base}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=900) as response:
            text = json.load(response)["choices"][0]["text"]
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=120)
        log.close()
    assert extract_number(text) == prompt.answer == baselines("bfloat16")["expected"]
    # The engine core runs in its own process; its log went to the server's output. The
    # prompt came in chunks, each through flexsample, the later ones after their context.
    text = (tmp_path / "server.log").read_text()
    assert len(re.findall(r"flexsample: 1 prefill\(s\)", text)) >= 3, text[-4000:]
    assert "after 1024 context tokens: 30/30 layer calls sparse" in text, text[-4000:]
    assert "prefill chunks after earlier context run" not in text
