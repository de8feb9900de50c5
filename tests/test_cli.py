"""Tier 1: the `offload-rt` commands as a user runs them."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from offload_rt.cli.serve import on_a_passing_thread
from offload_rt.demo import demo_name


def offload_rt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "offload_rt.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_demo_makes_its_checkpoint_once_and_generates(tmp_path, capsys):
    first = offload_rt("demo", "--cache-dir", str(tmp_path), "--max-new-tokens", "8")
    assert first.returncode == 0, first.stderr
    assert "random weights" in first.stdout
    assert "tokens: 8 new" in first.stdout and "tok/s" in first.stdout
    assert "hits=" in first.stdout and "resident_max=" in first.stdout
    folder = tmp_path / demo_name()
    stamp = (folder / "config.json").stat().st_mtime_ns
    # the second time through the command's own main, in this process (a process start fewer)
    from offload_rt.cli import main

    assert main(["demo", "--cache-dir", str(tmp_path), "--max-new-tokens", "8"]) == 0
    second = capsys.readouterr().out
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    # greedy: the same text both times
    text = [line for line in first.stdout.splitlines() if line.startswith("text")]
    assert text and text == [line for line in second.splitlines() if line.startswith("text")]


def test_generate_takes_a_model_dir_and_options(reference):
    folder, _ = reference
    out = offload_rt(
        "generate",
        str(folder),
        "--token-ids",
        "1,5,9",
        "--max-new-tokens",
        "6",
        "--cache-experts",
        "3",
        "--dtype",
        "float32",
    )
    assert out.returncode == 0, out.stderr
    assert "tokens: 6 new" in out.stdout
    assert "resident_max=3" in out.stdout


def test_generate_reports_a_broken_checkpoint_clearly(tmp_path):
    out = offload_rt("generate", str(tmp_path), "--prompt", "hi")
    assert out.returncode == 2
    assert "no config.json" in out.stderr and "Traceback" not in out.stderr


def test_the_actor_count_reaches_ray(reference):
    # generate and demo on Ray run end to end in tests/ray/test_quickstart.py (the same
    # load_model), plan in tests/ray/test_families_ray.py; here the count of actors reaches the
    # options Ray is started with
    from offload_rt.cli import build_parser
    from offload_rt.cli.options import ray_options

    argv = ["generate", str(reference[0]), "--backend", "ray", "--expert-actors", "2"]
    args = build_parser().parse_args(argv)
    assert args.backend == "ray" and ray_options(args).expert_actors == 2


def test_gpu_memory_option_reaches_the_placement(reference):
    from offload_rt.cli import build_parser
    from offload_rt.cli.options import ray_options

    args = build_parser().parse_args(["plan", str(reference[0]), "--gpu-memory-gb", "20"])
    assert ray_options(args).gpu_memory_bytes == 20 * 2**30
    args = build_parser().parse_args(["serve", str(reference[0]), "--gpu-memory-gb", "-1"])
    with pytest.raises(ValueError, match="--gpu-memory-gb must be positive"):
        ray_options(args)


def test_threads_option_sets_torchs_threads(reference):
    import torch

    from offload_rt.cli import build_parser
    from offload_rt.cli.options import load_model

    before = torch.get_num_threads()
    args = build_parser().parse_args(["generate", str(reference[0]), "--threads", "1"])
    try:
        with load_model(args, reference[0]):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    args = build_parser().parse_args(["generate", str(reference[0]), "--dense-quant", "int8"])
    assert args.dense_quant == "int8"
    args = build_parser().parse_args(["serve", str(reference[0]), "--threads", "0"])
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        load_model(args, reference[0])


def test_serve_loads_on_a_thread_that_ends_with_the_load():
    """serve loads the model where the OpenMP team of its parallel copies cannot outlive the
    load (the scheduler's thread then owns the only team: docs/architecture.md, CPU kernels)."""
    seen: list[threading.Thread] = []
    got = on_a_passing_thread(lambda: seen.append(threading.current_thread()) or 7)
    assert got == 7 and seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()
