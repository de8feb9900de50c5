"""Tier 4: docs/quickstart.md's first section, run as written, reaches a generated answer through
the Python client against a ray-backend server.

Every ```bash block of the section runs, in order, in one shell, in an empty folder. The one
block it does not run, ```bash install, is checked instead: its install command must be the
one README.md gives and CI's .ci/run performs (from this clean clone), so no step is missing.
The only edit: port 8000 becomes a free port, so the test never collides with a real server.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "docs" / "quickstart.md"
RUN_TIMEOUT_S = 600


def section_one_blocks() -> list[tuple[str, str]]:
    """(info string, code) of each fenced block in section 1."""
    text = QUICKSTART.read_text()
    section = text.split("\n## 2.")[0]
    return re.findall(r"^```([^\n]*)\n(.*?)^```$", section, flags=re.M | re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_install_step_is_readmes():
    installs = [code for info, code in section_one_blocks() if info == "bash install"]
    assert len(installs) == 1
    readme = (ROOT / "README.md").read_text()
    pip = next(line for line in installs[0].splitlines() if line.startswith("pip install"))
    assert pip in readme  # README's first command, which .ci/run performs in the clean clone
    assert "-c .ci/constraints.txt" in (ROOT / ".ci" / "run").read_text()


def test_the_quickstart_reaches_an_answer_through_the_client(tmp_path):
    blocks = [code for info, code in section_one_blocks() if info == "bash"]
    assert len(blocks) >= 4
    port = str(free_port())
    script = "set -euo pipefail\n" + "\n".join(b.replace("8000", port) for b in blocks)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "text (random weights):" in out  # the demo generated, in one actor, through its cache
    assert "actors=1" in out and "hits=" in out
    answer = re.search(r"answer \(random weights\): (.+) (stop|length)", out)
    assert answer is not None, out[-3000:]
    assert (tmp_path / "models" / "demo-mixtral-v2" / "config.json").is_file()
