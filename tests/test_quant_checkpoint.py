"""Tier 1: `offload-rt quantize` as a user runs it, and broken quantized checkpoints giving
errors that name the tensor or field at fault."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload_rt
from offload_rt.checkpoint import CheckpointError
from offload_rt.cli import main as cli_main
from offload_rt.tools.quantize import quantize_checkpoint

# Mixtral's hub names: w1 is the gate projection, w2 the down projection
SCALES = "model.layers.1.block_sparse_moe.experts.5.w2.scales"
QWEIGHT = "model.layers.0.block_sparse_moe.experts.3.w1.qweight"


def offload_rt_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "offload_rt.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def int4(reference, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int4") / "model"
    quantize_checkpoint(reference[0], out, 4, 32, progress=False)
    return out


@pytest.fixture
def broken(int4, tmp_path) -> Path:
    """A copy of the int4 checkpoint to break."""
    folder = tmp_path / "broken"
    shutil.copytree(int4, folder)
    return folder


def edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def assert_load_fails(folder: Path, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as err:
        offload_rt.load(folder)
    for f in fragments:
        assert f in str(err.value), str(err.value)


def test_missing_scales(broken):
    edit_tensors(broken, lambda t: t.pop(SCALES))
    assert_load_fails(broken, SCALES, "missing tensor", "[64, 3]")


def test_wrong_shapes(broken):
    def cut(t):
        t[QWEIGHT] = t[QWEIGHT][:, :-1].contiguous()
        t[SCALES] = t[SCALES][:-1].contiguous()

    edit_tensors(broken, cut)
    assert_load_fails(broken, QWEIGHT, "[96, 31]", "[96, 32]")
    edit_tensors(broken, lambda t: t.update({QWEIGHT: torch.zeros(96, 32, dtype=torch.uint8)}))
    assert_load_fails(broken, SCALES, "[63, 3]", "[64, 3]")


def test_wrong_dtypes(broken, reference, tmp_path):
    edit_tensors(broken, lambda t: t.update({SCALES: t[SCALES].float()}))
    assert_load_fails(broken, SCALES, "torch.float32", "torch.float16")
    edit_tensors(broken, lambda t: t.update({SCALES: t[SCALES].half(), QWEIGHT: t[QWEIGHT].half()}))
    assert_load_fails(broken, QWEIGHT, "torch.float16", "torch.uint8")
    plain = tmp_path / "plain"
    shutil.copytree(reference[0], plain)
    norm = "model.layers.0.input_layernorm.weight"
    edit_tensors(plain, lambda t: t.update({norm: t[norm].to(torch.uint8)}))
    assert_load_fails(plain, norm, "torch.uint8")


def edit_config(folder: Path, **quant) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"] = {**cfg["quantization_config"], **quant}
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "quant, fragments",
    [
        ({"bits": 3}, ["quantization_config", "bits must be one of (8, 4)", "3"]),
        ({"group_size": 48}, ["group_size 48 does not divide hidden_size 64"]),
        ({"group_size": 16}, ["has shape", "config.json implies"]),
        ({"quant_method": "awq"}, ["quant_method 'awq'", "offload-rt quantize"]),
        ({"version": 2}, ["version 2 is not supported"]),
    ],
)
def test_bad_quantization_config(broken, quant, fragments):
    edit_config(broken, **quant)
    assert_load_fails(broken, *fragments)


def test_quantization_config_over_float_experts(reference, tmp_path):
    folder = tmp_path / "float"
    shutil.copytree(reference[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "offload_rt", "version": 1, "bits": 8}
    cfg["quantization_config"]["group_size"] = 32
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_load_fails(folder, "missing tensor", ".experts.0.w1.qweight")


def test_quantize_command_writes_a_checkpoint_that_generates(reference, tmp_path):
    out = offload_rt_cli(
        "quantize", str(reference[0]), str(tmp_path / "q8"), "--bits", "8", "--group-size", "32"
    )
    assert out.returncode == 0, out.stderr
    # 3 x 64 x 96 float32 weights; int8 codes + float16 scale and offset per 32 weights
    assert "bytes per expert: 73728 as stored -> 20736 (0.2812" in out.stdout
    assert "quantizing" in out.stderr and "16/16" in out.stderr  # tqdm's bar, expert by expert
    gen = offload_rt_cli(
        "generate", str(tmp_path / "q8"), "--token-ids", "1,5,9", "--max-new-tokens", "4"
    )
    assert gen.returncode == 0, gen.stderr
    assert "tokens: 4 new" in gen.stdout and "bytes_loaded=" in gen.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--bits", "4"], "group_size 64 does not divide intermediate_size 96"),
        (["--bits", "4", "--group-size", "7"], "even for 4 bits"),
    ],
)
def test_quantize_command_reports_bad_options(reference, tmp_path, capsys, args, fragment):
    # in this process: the command's own main, as the console script calls it
    assert cli_main(["quantize", str(reference[0]), str(tmp_path / "q"), *args]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_quantize_command_keeps_an_existing_folder(reference, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert cli_main(["quantize", str(reference[0]), str(tmp_path / "taken"), "--bits", "8"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
