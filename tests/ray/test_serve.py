"""Tier 3/4: `offload-rt serve --backend ray` as a user starts it (a subprocess that starts
its own local Ray), the Python client against it, /metrics, and a clean stop on SIGINT."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

import offload_rt
from offload_rt.demo import make_demo_checkpoint
from offload_rt.protocol import InvalidRequest

START_TIMEOUT_S = 180  # Ray's start and the actors' loading, on 2 slow cores
PROMPTS = ["Hello", "Mixtral on a small GPU", [1, 50, 51, 52]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become healthy")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return make_demo_checkpoint(tmp_path_factory.mktemp("serve-ray") / "demo")


def test_the_client_against_a_ray_backend_server(demo_dir):
    with offload_rt.load(demo_dir) as local:
        want = local.generate(PROMPTS, max_new_tokens=10)
        sampled = local.generate("Hello", max_new_tokens=10, temperature=0.8, seed=4)
    port = free_port()
    cmd = [sys.executable, "-m", "offload_rt.cli", "serve", str(demo_dir), "--backend", "ray",
           "--port", str(port), "--max-batch", "4", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        with offload_rt.connect(url) as remote:
            assert remote.generate(PROMPTS, max_new_tokens=10) == want
            assert remote.generate("Hello", max_new_tokens=10, temperature=0.8, seed=4) == sampled
            assert "".join(remote.stream("Hello", max_new_tokens=10)) == want[0].text
            with pytest.raises(InvalidRequest, match="temperature"):
                remote.generate("Hello", temperature=-1.0)
        metrics = httpx.get(url + "/metrics", timeout=10).text
        for name in ("queue_depth", "tokens_per_second", "expert_cache_hit_rate",
                     "generated_tokens_total", "http_requests_total"):  # fmt: skip
            assert f"offload_rt_{name}" in metrics
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: the actors go, then Ray
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
