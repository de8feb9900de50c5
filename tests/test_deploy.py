"""deploy/: the Dockerfile and the KubeRay manifests parse, with the kinds and fields they need;
and every `offload-rt` command that they, cluster/ and the operations docs name exists in the
CLI — full command lines are run through the CLI's own parser."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from offload_rt.cli import build_parser

ROOT = Path(__file__).parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
MANIFEST = ROOT / "deploy" / "kuberay.yaml"
DOCS = [
    ROOT / "deploy" / "README.md",
    ROOT / "cluster" / "README.md",
    ROOT / "docs" / "operations-cluster.md",
]
NAMING = [*DOCS, DOCKERFILE, MANIFEST, *sorted((ROOT / "cluster").glob("*.yaml"))]
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER",
}  # fmt: skip


def parse(argv: list[str]) -> argparse.Namespace:
    """The CLI's own parsing; a usage error fails the test with argparse's message."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"offload-rt {' '.join(argv)}: rejected by the CLI parser (exit {e.code})")


def subcommands() -> set[str]:
    usage = build_parser().format_usage()  # "usage: offload-rt [-h] {demo,generate,...} ..."
    found = re.search(r"\{([a-z,-]+)\}", usage)
    assert found, usage
    return set(found.group(1).split(","))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, continuations joined."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word, rest.strip()))
            pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def test_dockerfile_instructions_are_valid():
    steps = dockerfile_instructions()
    assert {word for word, _ in steps} <= INSTRUCTIONS, [w for w, _ in steps]
    assert all(word.isupper() for word, _ in steps)
    first = next(rest for word, rest in steps if word != "ARG")
    assert steps[[w for w, _ in steps].index("FROM")][1] == first
    assert re.fullmatch(r"nvidia/cuda:[\w.]+-runtime-ubuntu[\d.]+", first)
    for word, rest in steps:
        if word == "COPY":  # the sources exist in the build context (the repository root)
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), src


def test_dockerfile_entrypoint_is_offload_rt_serve():
    steps = dict(dockerfile_instructions())
    assert json.loads(steps["ENTRYPOINT"]) == ["offload-rt", "serve"]
    args = parse(["serve", *json.loads(steps["CMD"])])
    assert args.command == "serve" and args.host == "0.0.0.0" and args.device == "cuda"
    assert steps["EXPOSE"] == str(args.port)
    assert f"127.0.0.1:{args.port}/health" in steps["HEALTHCHECK"]


def manifest() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert sorted(kinds) == ["PersistentVolumeClaim", "RayCluster", "Service"]
    return {d["kind"]: d for d in docs}


def pod_specs(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in spec["workerGroupSpecs"]
    ]


def test_raycluster_mounts_the_checkpoint_on_every_pod():
    docs = manifest()
    cluster, claim = docs["RayCluster"], docs["PersistentVolumeClaim"]
    assert cluster["apiVersion"] == "ray.io/v1"
    images = set()
    for pod in pod_specs(cluster):
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        ray_container = pod["containers"][0]  # KubeRay runs Ray in the first container
        assert ray_container["name"].startswith("ray-")
        assert ray_container["resources"]["limits"]["nvidia.com/gpu"] == 1
        for c in pod["containers"]:
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"]
            images.add(c["image"])
    assert len(images) == 1, "every pod must run the same image (the same Ray)"


def test_serve_sidecar_is_a_valid_command_behind_the_service():
    docs = manifest()
    head = docs["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]
    serve = next(c for c in head["containers"] if "args" in c)
    args = parse(["serve", *serve["args"]])  # the image's entrypoint is `offload-rt serve`
    assert (args.backend, args.address, args.host) == ("ray", "auto", "0.0.0.0")
    assert str(args.model_dir).startswith("/models/")
    # a driver on the head node: Ray's session files are shared with the ray-head container
    ray_tmp = {m["name"] for c in head["containers"] for m in c["volumeMounts"]
               if m["mountPath"] == "/tmp/ray"}  # fmt: skip
    assert (
        len(ray_tmp) == 1 and "emptyDir" in {v["name"]: v for v in head["volumes"]}[ray_tmp.pop()]
    )
    assert serve["readinessProbe"]["httpGet"] == {"path": "/health", "port": args.port}
    service = docs["Service"]
    assert service["spec"]["selector"] == {
        "ray.io/cluster": docs["RayCluster"]["metadata"]["name"],
        "ray.io/node-type": "head",
    }
    assert service["spec"]["ports"][0]["targetPort"] == args.port


@pytest.mark.parametrize("path", NAMING, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_commands_exist(path):
    named = set(re.findall(r"offload-rt ([a-z][a-z-]*)", path.read_text()))
    assert named <= subcommands(), f"{path.name} names {sorted(named - subcommands())}"


def command_lines(text: str) -> list[str]:
    """Shell lines of the fenced code blocks, backslash continuations joined."""
    lines, joined = [], ""
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.splitlines():
            joined += line.rstrip().removesuffix("\\")
            if not line.rstrip().endswith("\\"):
                lines.append(joined.strip())
                joined = ""
    return lines


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_command_lines_parse(path):
    lines = command_lines(path.read_text())
    checked = 0
    for line in lines:
        words = shlex.split(line, comments=True)
        if words[:1] == ["offload-rt"]:
            parse(words[1:])
            checked += 1
        elif words[:2] == ["docker", "run"] and len(words) > 2:
            image = next(i for i, w in enumerate(words) if w.startswith("offload-rt:"))
            if words[image + 1 :]:  # arguments after the image replace the image's CMD
                parse(["serve", *words[image + 1 :]])
                checked += 1
    assert checked, f"{path.name}: no offload-rt command line found in its code blocks"
