"""cluster/onprem.yaml's own start commands bring up a real two-node Ray cluster on 127.0.0.1.

The commands are run as `ray up` runs them on each node (bash, RAY_HEAD_IP in the
environment), with only these changes, each for a reason the test states:
- `ray stop` is left out: it stops every Ray on the machine, other tests' included;
- port 6379 becomes a free port, and each node gets a free dashboard-agent port, the head a
  free client-server port, no dashboard and its own temp dir: two nodes on one machine, next
  to other Ray instances, must not collide;
- `--autoscaling-config=~/ray_bootstrap_config.yaml` is left out: `ray up` writes that file,
  and with it the head's autoscaler would ssh into the example's worker_ips;
- the cluster token that file_mounts puts at ~/.ray/auth_token is a fresh one in the temp dir,
  named by RAY_AUTH_TOKEN_PATH (the real ~/.ray/auth_token belongs to whoever uses this
  machine). The checks run in a subprocess with that environment, as a driver on the head.
Only the processes this test started are stopped: those whose command line holds its unique
temp dir, and their children.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

CONFIG = Path(__file__).parents[2] / "cluster" / "onprem.yaml"
MIXTRAL_EXPERT_BYTES = 3 * 14336 * 4096 * 2  # one fp16 expert of Mixtral 8x7B


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapt(command: str, port: int, extra: str) -> str:
    command = re.sub(r"\s--autoscaling-config=\S+", "", command)
    command = command.replace("--port=6379", f"--port={port}").replace(":6379", f":{port}")
    return f"{command} --node-ip-address=127.0.0.1 --disable-usage-stats {extra}"


def start_commands(temp: Path, port: int) -> list[str]:
    config = yaml.safe_load(CONFIG.read_text())
    head = [c for c in config["head_start_ray_commands"] if c.strip() != "ray stop"]
    worker = [c for c in config["worker_start_ray_commands"] if c.strip() != "ray stop"]
    assert len(head) == len(worker) == 1 and "ray start" in head[0] + worker[0]
    head_extra = (
        f"--temp-dir={temp} --include-dashboard=false --dashboard-agent-listen-port={free_port()}"
    )
    if client_server_starts():  # it would bind port 10001, which another Ray may hold
        head_extra += f" --ray-client-server-port={free_port()}"
    worker_extra = f"--dashboard-agent-listen-port={free_port()}"
    return [adapt(head[0], port, head_extra), adapt(worker[0], port, worker_extra)]


def client_server_starts() -> bool:
    """Whether `ray start --head` starts a Ray Client server (it needs `ray[client]`)."""
    from ray._private.utils import get_ray_client_dependency_error

    return get_ray_client_dependency_error() is None


def our_processes(marker: str) -> list[int]:
    """Processes whose command line holds `marker`, and all their descendants."""
    parents, mine = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(entry.name)] = int(
                (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            )
        except (OSError, IndexError, ValueError):
            continue
        if marker in cmdline:
            mine.add(int(entry.name))
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in mine} - mine
        mine |= children
        grew = bool(children)
    return sorted(mine - {os.getpid()})


def stop(marker: str, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after `grace_s` (some Ray processes ignore SIGTERM
    for long), then check that none is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in our_processes(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while our_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not our_processes(marker), "processes of the test cluster outlived it"


CHECK = textwrap.dedent(
    """
    import json, sys, time
    import ray
    from offload_rt.distributed.cluster import RayOptions, plan_for_cluster
    from offload_rt.grid import ExpertGrid
    ray.init(address=sys.argv[1], namespace="offload_rt_onprem_test")
    deadline = time.monotonic() + 60
    while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    # 4 of Mixtral's 32 layers: 32 fp16 experts, 11 GiB, fit the two (claimed) 24 GB GPUs
    plan = plan_for_cluster(ExpertGrid((0, 1, 2, 3), 8), int(sys.argv[2]), RayOptions())
    print(json.dumps({
        "nodes": [{"id": n["NodeID"], "resources": n["Resources"]} for n in nodes],
        "actors": [{"device": a.device, "node": a.node_id,
                    "resident": a.expected_resident_fraction} for a in plan.actors],
    }))
    ray.shutdown()
    """
)


@pytest.fixture
def onprem_cluster():
    # short: Ray's unix socket paths under it must stay below 108 characters
    temp = Path(tempfile.mkdtemp(prefix="ort-onprem-", dir="/tmp"))
    (temp / "auth_token").write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "RAY_HEAD_IP": "127.0.0.1",
        "RAY_AUTH_TOKEN_PATH": str(temp / "auth_token"),
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the `ray` CLI
    port = free_port()
    try:
        for command in start_commands(temp, port):
            run = subprocess.run(
                ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=180
            )
            assert run.returncode == 0, f"{command}\n{run.stdout}\n{run.stderr}"
        yield f"127.0.0.1:{port}", env
    finally:
        stop(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def test_onprem_start_commands_bring_up_the_configured_cluster(onprem_cluster):
    address, env = onprem_cluster
    check = subprocess.run(
        [sys.executable, "-c", CHECK, address, str(MIXTRAL_EXPERT_BYTES)],
        env={**env, "RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert check.returncode == 0, check.stderr
    seen = json.loads(check.stdout.strip().splitlines()[-1])
    assert len(seen["nodes"]) == 2
    for node in seen["nodes"]:  # as --num-gpus=1 --object-store-memory=4000000000 say
        assert node["resources"]["GPU"] == 1
        assert node["resources"]["object_store_memory"] == pytest.approx(4e9, rel=0.01)
    # the placement sees one GPU actor per node, each holding its experts on its GPU
    assert [a["device"] for a in seen["actors"]] == ["cuda", "cuda"]
    assert [a["resident"] for a in seen["actors"]] == [1.0, 1.0]
    assert {a["node"] for a in seen["actors"]} == {n["id"] for n in seen["nodes"]}
