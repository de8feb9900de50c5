"""DeepSeek-V3's FP8 release layout: float8_e4m3fn weights with a float32 `weight_scale_inv`
per block. Experts stay FP8 in RAM and on the link and are dequantized where they run; dense
FP8 weights are dequantized at load. The reference: transformers holding the weights the
blocks stand for (w = fp8 · scale, the release's definition, written out here)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload_rt
from offload_rt.experts.formats import expert_nbytes
from offload_rt.model import cpukernels
from tests.families import save_family
from tests.test_exactness import PROMPTS, reference_greedy

BLOCK = (16, 16)  # the release's is (128, 128); the tiny model's widths are multiples of 16
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def to_fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (out, in) -> fp8 weight, float32 scale per block (edge blocks partial), and the float32
    weight they stand for, each element q · its block's scale."""
    rows, cols = w.shape
    rb, cb = BLOCK
    nr, nc = -(-rows // rb), -(-cols // cb)
    scale = torch.empty(nr, nc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    back = torch.empty(rows, cols)
    for i in range(nr):
        for j in range(nc):
            block = w[i * rb : (i + 1) * rb, j * cb : (j + 1) * cb].float()
            s = block.abs().max().clamp(min=1e-12) / FP8_MAX
            scale[i, j] = s
            codes = (block / s).to(torch.float8_e4m3fn)
            q[i * rb : (i + 1) * rb, j * cb : (j + 1) * cb] = codes
            back[i * rb : (i + 1) * rb, j * cb : (j + 1) * cb] = codes.float() * s
    return q, scale, back


def is_fp8_in_release(name: str) -> bool:
    """The release quantizes every linear projection but the router and the embeddings."""
    return name.endswith("_proj.weight") or name.endswith("kv_a_proj_with_mqa.weight")


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepseek-v3-fp8")
    hf = save_family("deepseek_v3", folder)
    tensors = load_file(folder / "model.safetensors")
    reference = {}
    for name in [n for n in tensors if is_fp8_in_release(n)]:
        q, scale, back = to_fp8_blocks(tensors[name])
        tensors[name], tensors[name + "_scale_inv"] = q, scale
        reference[name] = back
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    }
    (folder / "config.json").write_text(json.dumps(config))
    # transformers' model on the weights the blocks stand for (loaded by its own loader from a
    # float copy, so its per-expert names are converted as for any hub checkpoint)
    float_copy = tmp_path_factory.mktemp("deepseek-v3-dequantized")
    hf.save_pretrained(float_copy)
    dequantized = load_file(float_copy / "model.safetensors")
    dequantized.update(reference)
    save_file(dequantized, float_copy / "model.safetensors", metadata={"format": "pt"})
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(float_copy).eval()
    with torch.no_grad():
        logits = ref(torch.tensor([PROMPTS[0]])).logits[0]
    tokens = [reference_greedy(ref, p, 16) for p in PROMPTS[:2]]
    return folder, logits, tokens


@pytest.mark.parametrize("cache, kernels", [(1, "eager"), (None, "eager"), (None, "compiled")])
def test_fp8_deepseek_v3_matches_transformers_on_the_dequantized_weights(
    fp8_checkpoint, cache, kernels, monkeypatch
):
    """With "compiled", every one-row product goes through the CPU kernels, the experts'
    straight from their float8 weights and block scales."""
    folder, want_logits, want_tokens = fp8_checkpoint
    if kernels == "compiled":
        monkeypatch.setattr(cpukernels, "MIN_NUMEL", 0)
    with offload_rt.load(folder, cache_experts=cache) as model:
        cfg = model.config
        assert cfg.quantization.scheme == "fp8"
        assert (model.logits(PROMPTS[0]) - want_logits).abs().max().item() <= 1e-4
        tokens = [r.token_ids for r in model.generate(PROMPTS[:2], max_new_tokens=16)]
        stats = model.stats()
        packed = expert_nbytes(cfg, torch.float32)
    assert tokens == want_tokens
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    blocks = 3 * (d // BLOCK[0]) * (f // BLOCK[1])
    assert packed == 3 * d * f + 4 * blocks  # a byte a weight and a float32 scale a block
    assert 0.5 <= packed / (3 * d * f * 2) < 0.52  # about half of a bfloat16 expert
    if cache is not None:
        assert stats["misses"] > 0 and stats["bytes_loaded"] == stats["misses"] * packed


def test_fp8_blocks_must_divide_the_expert_widths(fp8_checkpoint, tmp_path):
    from offload_rt.checkpoint import CheckpointError

    folder = fp8_checkpoint[0]
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [32, 32]  # 48 is not whole blocks
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="weight_block_size rows 32 do not divide"):
        offload_rt.load(tmp_path)
