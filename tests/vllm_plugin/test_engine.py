"""vLLM end to end on SmolLM2: offline generation and the OpenAI-compatible server.

Each engine runs in its own process (``bench/vllm_run.py``; the server through vLLM's own
module); answers are compared with vLLM's own backend on the same prompts. A passkey prompt
of about 3K tokens is long enough for the CPU cost model to sample it.
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


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    """vLLM's own backend, chunked prefill of the long prompt beside two short requests."""
    result, _ = run_engine(tmp_path_factory.mktemp("baseline"), "baseline", *CHUNKED)
    return result["rounds"][0]


def test_long_prefill_runs_sparse_with_the_same_answer(tmp_path, baseline):
    # A 128-token floor: at this length the CPU cost model runs 0.4's 512 floor dense on
    # every layer, and the test is of the sparse path through vLLM.
    result, log = run_engine(
        tmp_path, "plugin", "--backend", "CUSTOM", "--passkey", str(PASSKEY),
        config='{"min_window": 128}',
    )  # fmt: skip
    answer = result["rounds"][0]
    assert answer["found"] == answer["expected"] == baseline["found"]
    stats = result["stats"]
    tokens = answer["prompt_tokens"][-1]
    assert stats["sparse_requests"] == 1 and stats["sparse_tokens"] == tokens
    assert stats["layer_calls"] == 30  # every layer of SmolLM2-135M, once
    assert stats["dense_layer_calls"] < 30 and 0 < stats["mean_density"] < 1
    assert f"flexsample: 1 prefill(s), {tokens} tokens: " in log


def test_chunked_prefill_beside_decoding_requests(tmp_path, baseline):
    # Chunks of at most 1024 tokens: the second and third attend to context read from the
    # paged cache; the two short requests prefill beside the first chunk and decode beside
    # the others. min_seq_len makes flexsample plan every chunk (the cost model would leave
    # the shortest to CPU_ATTN).
    result, log = run_engine(
        tmp_path, "chunked", "--backend", "CUSTOM", *CHUNKED, config='{"min_seq_len": 512}'
    )
    answer = result["rounds"][0]
    assert answer["found"] == answer["expected"] == baseline["found"]
    assert answer["texts"][:-1] == baseline["texts"][:-1]  # the wrapped backend's requests
    stats = result["stats"]
    assert stats["sparse_requests"] == 3 and stats["sparse_tokens"] == answer["prompt_tokens"][-1]
    assert stats["wrapped_tokens"] > 0  # shared steps with the short requests
    steps = re.findall(r"flexsample: 1 prefill\(s\), (\d+) tokens( after (\d+) context)?", log)
    assert len(steps) == 3, log[-4000:]
    assert [int(c or 0) for _, _, c in steps] == [
        0,
        int(steps[0][0]),
        sum(int(t) for t, *_ in steps[:2]),
    ]


def test_openai_server_answers_a_long_completion(tmp_path, baseline):
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
            "--gpu-memory-utilization", "0.2",
        ],
        env=_env(),
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
    assert extract_number(text) == prompt.answer == baseline["expected"]
    # The engine core runs in its own process; its log went to the server's output.
    assert "flexsample: 1 prefill(s)" in (tmp_path / "server.log").read_text()
