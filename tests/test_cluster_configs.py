"""Every `ray up` config in cluster/ passes Ray's own cluster-config validator, after the
defaults are filled in as `ray up` fills them (ray.autoscaler's prepare_config)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
jsonschema = pytest.importorskip("jsonschema")

CLUSTER = Path(__file__).parents[1] / "cluster"
CONFIGS = sorted(CLUSTER.glob("*.yaml"))


def ray_up_check(config: dict) -> dict:
    """What `ray up` does to a config before it touches any machine: fill the provider's
    defaults (prepare_config) and validate against ray-schema.json (validate_config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"onprem.yaml", "aws-g6.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_rays_validator(path):
    config = yaml.safe_load(path.read_text())
    prepared = ray_up_check(config)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # every node installs offload_rt from the checkout that file_mounts copies to it
    assert prepared["file_mounts"]["~/offload_rt"] == "."
    assert any("~/offload_rt" in c for c in prepared["setup_commands"])
    # token authentication on both sides, with the token shipped to every node
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)


def test_validator_rejects_a_misspelt_key():
    """The check above can fail: a key ray-schema.json does not know is refused."""
    config = yaml.safe_load((CLUSTER / "onprem.yaml").read_text())
    config["head_start_commands"] = config.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError, match="head_start_commands"):
        ray_up_check(config)


def test_onprem_gpu_count_matches_on_every_node():
    config = yaml.safe_load((CLUSTER / "onprem.yaml").read_text())
    gpus = [
        re.search(r"--num-gpus=(\d+)", c).group(1)  # type: ignore[union-attr]
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for c in config[key]
        if "ray start" in c
    ]
    assert gpus == ["1", "1"]
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] not in config["provider"]["worker_ips"]


def test_cloud_config_uses_consumer_class_gpus():
    config = yaml.safe_load((CLUSTER / "aws-g6.yaml").read_text())
    types = config["available_node_types"]
    # g6: one NVIDIA L4 (24 GB) per instance up to g6.8xlarge
    assert all(t["node_config"]["InstanceType"].startswith("g6.") for t in types.values())
    assert all(t["resources"]["GPU"] == 1 for t in types.values())
    workers = sum(t.get("min_workers", 0) for t in types.values())
    assert workers <= config["max_workers"]
