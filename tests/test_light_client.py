"""The Python client imports without torch or Ray: a process that only talks to a server
need not load either."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
import offload_rt.client
import offload_rt
model = offload_rt.connect("http://127.0.0.1:9")
assert isinstance(model, offload_rt.RemoteModel)
assert offload_rt.RequestError is offload_rt.client.protocol.RequestError
heavy = sorted(m for m in ("torch", "ray", "numpy", "safetensors") if m in sys.modules)
print(",".join(heavy))
"""


def _run(code: str) -> str:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_the_client_imports_neither_torch_nor_ray():
    assert _run(CHECK) == ""


def test_load_and_the_model_types_still_come_from_the_package():
    code = (
        "import sys, offload_rt\n"
        "from offload_rt import SamplingParams, load, ExpertKey\n"
        "from offload_rt.engine import RequestError\n"
        "assert offload_rt.RequestError is RequestError and callable(load)\n"
        "assert 'SamplingParams' in dir(offload_rt)\n"
        "print('torch' in sys.modules)\n"
    )
    assert _run(code) == "True"
