"""Full servers on the shipped model (GPU only): selection under CUDA graphs, offload exact end to
end, counters in the log and in SGLang's /metrics."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lynx_sglang import SHIPPED_MODEL

pytestmark = pytest.mark.gpu

PROMPTS = [f"def function_{i}(x):\n    " for i in range(16)] + [
    "import os\nimport sys\n\n",
    "class Parser:\n    def __init__(self, text):\n",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module", autouse=True)
def shipped_model():
    if not (SHIPPED_MODEL / "model.safetensors").exists():
        pytest.skip("the shipped model is not trained yet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(tmp_path: Path, *args: str) -> Iterator[tuple[str, Path]]:
    """``python -m lynx_sglang.launch_server`` on the shipped model; yields (url, log file)."""
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYNX_")}
    cmd = [sys.executable, "-m", "lynx_sglang.launch_server", "--model-path", str(SHIPPED_MODEL),
           "--port", str(port), "--mem-fraction-static", "0.5", "--lynx-log-interval", "1", *args]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"server did not start:\n{log.read_text()[-4000:]}")
                time.sleep(2)
        yield url, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def generate(url: str) -> list[str]:
    body = {"text": PROMPTS, "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=300) as resp:
        return [item["text"] for item in json.loads(resp.read())]


def wait_for_log(log: Path, pattern: str, timeout: float = 30) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text())
        if match:
            return match
        time.sleep(1)
    pytest.fail(f"no {pattern!r} in the log:\n{log.read_text()[-4000:]}")


def test_lynx_under_cuda_graphs(tmp_path):
    """Selection inside captured decode graphs (padding masked): it runs and shrinks the set."""
    with serve(tmp_path, "--lynx-mode", "lynx", "--lynx-budget", "0.5") as (url, log):
        texts = generate(url)
        assert all(texts)
        m = wait_for_log(log, r"distinct experts/step ([\d.]+) -> ([\d.]+)")
    assert "Capture" in log.read_text() or "capture" in log.read_text()
    assert float(m.group(2)) < float(m.group(1))


def test_offload_is_exact_end_to_end(tmp_path):
    """Offload alone with K=16 < distinct experts per step: greedy outputs equal stock."""
    with serve(tmp_path, "--disable-cuda-graph") as (url, _):
        stock = generate(url)
    with serve(tmp_path, "--disable-cuda-graph", "--lynx-mode", "offload",
               "--lynx-slots", "16") as (url, log):  # fmt: skip
        offloaded = generate(url)
        wait_for_log(log, r"cache hit rate [\d.]+%")
    assert offloaded == stock


def test_lynx_offload_metrics(tmp_path):
    with serve(tmp_path, "--disable-cuda-graph", "--enable-metrics", "--lynx-mode",
               "lynx+offload", "--lynx-slots", "16") as (url, log):  # fmt: skip
        assert all(generate(url))
        wait_for_log(log, r"cache hit rate")
        time.sleep(2)
        with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
            metrics = resp.read().decode()
    assert "lynx:cache_hits_total" in metrics
    assert "lynx:distinct_experts_after" in metrics


def test_unsupported_offload_with_graphs_fails_at_start(tmp_path):
    """Eager offload executor with CUDA graphs on: a clear start-up error, no server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYNX_")}
    done = subprocess.run(
        [sys.executable, "-m", "lynx_sglang.launch_server", "--model-path", str(SHIPPED_MODEL),
         "--lynx-mode", "offload", "--lynx-slots", "16"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--disable-cuda-graph" in done.stderr


def test_lynx_on_sglang_paged_experts(tmp_path):
    """Selection on top of SGLang's own expert paging (--enable-paged-experts)."""
    with serve(tmp_path, "--enable-paged-experts", "--paged-experts-num-resident", "16",
               "--cuda-graph-backend-prefill", "disabled", "--lynx-mode", "lynx",
               "--lynx-budget", "0.5") as (url, log):  # fmt: skip
        assert all(generate(url))
        m = wait_for_log(log, r"distinct experts/step ([\d.]+) -> ([\d.]+)")
    assert float(m.group(2)) < float(m.group(1))
