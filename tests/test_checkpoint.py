"""Tier 1: broken checkpoints and configs give errors naming the file, tensor or field, at load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload_rt
from offload_rt.checkpoint import INDEX_FILE, CheckpointError, PerExpertLayout
from offload_rt.config import ConfigError
from offload_rt.grid import ExpertKey
from offload_rt.models import open_checkpoint, parse_config
from tests.conftest import TINY

EXPERT = "model.layers.1.block_sparse_moe.experts.5.w2.weight"


@pytest.fixture
def single(tmp_path, reference) -> Path:
    folder = tmp_path / "single"
    shutil.copytree(reference[0], folder)
    return folder


@pytest.fixture
def sharded(tmp_path, sharded_reference) -> Path:
    folder = tmp_path / "sharded"
    shutil.copytree(sharded_reference[0], folder)
    return folder


def shard_of(folder: Path, tensor: str) -> Path:
    return folder / json.loads((folder / INDEX_FILE).read_text())["weight_map"][tensor]


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def assert_load_fails(folder: Path, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as err:
        offload_rt.load(folder)
    for f in fragments:
        assert f in str(err.value)


def test_good_checkpoints_open(single, sharded):
    for folder in (single, sharded):
        ckpt = open_checkpoint(folder)
        assert ckpt.config.experts_per_layer == 8
        down = ckpt.expert(1, 5)["down"]  # Mixtral's w2
        assert down.shape == (TINY["hidden_size"], TINY["intermediate_size"])
        layout = ckpt.spec.experts
        assert isinstance(layout, PerExpertLayout)
        assert layout.names(ExpertKey(1, 5))["down"] == EXPERT
        assert torch.equal(down, ckpt.get(EXPERT))
        ckpt.close()


def test_missing_shard(sharded):
    victim = shard_of(sharded, EXPERT)
    victim.unlink()
    assert_load_fails(sharded, victim.name, "missing")


def test_truncated_safetensors(sharded, single):
    victim = shard_of(sharded, EXPERT)
    victim.write_bytes(victim.read_bytes()[:-100])
    assert_load_fails(sharded, victim.name)
    path = single / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_load_fails(single, "model.safetensors")


def test_garbage_file(single):
    (single / "model.safetensors").write_bytes(b"not a safetensors file at all")
    assert_load_fails(single, "model.safetensors", "not a readable safetensors file")


def test_missing_expert_tensor(single):
    path = single / "model.safetensors"
    tensors = load_file(path)
    del tensors[EXPERT]
    save_file(tensors, path)
    assert_load_fails(single, EXPERT, "missing tensor")


def test_index_lists_a_tensor_the_shard_lacks(sharded):
    victim = shard_of(sharded, EXPERT)
    tensors = load_file(victim)
    del tensors[EXPERT]
    save_file(tensors, victim)
    assert_load_fails(sharded, victim.name, EXPERT)


def test_wrong_shape(single):
    path = single / "model.safetensors"
    tensors = load_file(path)
    tensors[EXPERT] = tensors[EXPERT][:, :-1].contiguous()
    save_file(tensors, path)
    assert_load_fails(single, EXPERT, "shape", "[64, 95]", "[64, 96]")


def test_no_weights_and_no_folder(single, tmp_path):
    (single / "model.safetensors").unlink()
    assert_load_fails(single, "neither model.safetensors nor model.safetensors.index.json")
    assert_load_fails(tmp_path / "nowhere", "does not exist")


def test_corrupt_index(sharded):
    (sharded / INDEX_FILE).write_text("{ not json")
    assert_load_fails(sharded, INDEX_FILE)


@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"hidden_size": None}, ["missing field 'hidden_size'"]),
        ({"num_local_experts": "8"}, ["'num_local_experts'", "positive integer"]),
        ({"rms_norm_eps": -1}, ["'rms_norm_eps'"]),
        ({"model_type": "llama"}, ["unknown model_type 'llama'"]),
        (
            {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
            ["unknown model_type 'llama'", "supported", "mixtral"],
        ),
        ({"num_experts_per_tok": 9}, ["num_experts_per_tok 9 exceeds num_local_experts 8"]),
        ({"num_key_value_heads": 3}, ["not a multiple of num_key_value_heads 3"]),
        ({"dtype": "int3"}, ["'dtype'"]),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, ["'yarn'"]),
        ({"intermediate_size": 97}, ["has shape", "config.json implies"]),
    ],
)
def test_bad_config_field(single, changes, fragments):
    edit_config(single, **changes)
    assert_load_fails(single, *fragments)


def test_config_that_is_not_json(single):
    (single / "config.json").write_text("[1, 2")
    assert_load_fails(single, "config.json", "not valid JSON")


def test_config_reads_real_mixtral_fields():
    # the flat layout of Mixtral-8x7B's own config.json (rope_theta at top level, torch_dtype)
    cfg = parse_config(
        {
            "model_type": "mixtral",
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e6,
            "max_position_embeddings": 32768,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }
    )
    assert cfg.head_dim == 128 and cfg.model_type == "mixtral"
    assert cfg.moe_intermediate_size == 14336 and cfg.moe_layers == tuple(range(32))
    assert cfg.rope_theta == 1e6 and cfg.dtype == "bfloat16" and cfg.eos_token_ids == (2,)
    assert cfg.expert_numel * 2 * cfg.num_experts_total / 1e9 == pytest.approx(90.2, rel=0.01)
    with pytest.raises(ConfigError, match="'eos_token_id'"):
        parse_config(
            {
                **TINY,
                "model_type": "mixtral",
                "rms_norm_eps": 1e-5,
                "rope_theta": 1e4,
                "eos_token_id": "x",
            }
        )


def test_load_rejects_bad_arguments(single):
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        offload_rt.load(single, backend="gpu")
    with pytest.raises(ValueError, match="cache_experts must be a positive integer"):
        offload_rt.load(single, cache_experts=0)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        offload_rt.load(single, dtype="int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_without_cuda(single):
    with pytest.raises(ValueError, match="CUDA is not available"):
        offload_rt.load(single, device="cuda")
