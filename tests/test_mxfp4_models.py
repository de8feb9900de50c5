"""MXFP4 experts in whole models: GPT-OSS in the release's layout against transformers holding
the weights transformers itself dequantizes from the same codes, and `offload-rt quantize
--format mxfp4` of other families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload_rt
from offload_rt.experts.formats import expert_nbytes
from offload_rt.model import cpukernels
from tests.families import save_family
from tests.test_exactness import PROMPTS, reference_greedy

NEW_TOKENS = 32


def write_release_mxfp4(folder: Path, hf, seed: int = 0) -> None:
    """Rewrite the float GPT-OSS checkpoint in `folder` as OpenAI released GPT-OSS: each
    layer's expert weights as random MXFP4 codes and exponents (`..._blocks`, `..._scales`),
    biases as they were, and `quantization_config.quant_method` "mxfp4". The reference `hf`
    gets the weights transformers' `convert_moe_packed_tensors` dequantizes from them."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(folder / "model.safetensors")
    for i, layer in enumerate(hf.model.layers):
        experts, prefix = layer.mlp.experts, f"model.layers.{i}.mlp.experts."
        for name in ("gate_up_proj", "down_proj"):
            e, cols, rows = getattr(experts, name).shape  # stored (E, in, out)
            blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=gen)
            blocks = blocks.to(torch.uint8)
            # exponents around 2^-5: weights of about 0.03-0.2, as the float model's
            scales = torch.randint(119, 125, (e, rows, cols // 32), generator=gen).to(torch.uint8)
            with torch.no_grad():
                weight = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
                getattr(experts, name).copy_(weight)
            del tensors[prefix + name]
            tensors[prefix + name + "_blocks"] = blocks
            tensors[prefix + name + "_scales"] = scales
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"],
    }
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    hf = save_family("gpt_oss", folder, intermediate_size=64)  # widths: multiples of 32
    write_release_mxfp4(folder, hf)
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPTS[0]])).logits[0]
    tokens = [reference_greedy(hf, p, NEW_TOKENS) for p in PROMPTS[:2]]
    return folder, logits, tokens


@pytest.mark.parametrize(
    "cache, kernels", [(1, "eager"), (6, "eager"), (None, "eager"), (None, "compiled")]
)
def test_release_mxfp4_gpt_oss_matches_transformers_dequantized(
    release, cache, kernels, monkeypatch
):
    """With "compiled", every one-row product goes through the CPU kernels, the experts'
    straight from their MXFP4 codes."""
    folder, want_logits, want_tokens = release
    if kernels == "compiled":
        monkeypatch.setattr(cpukernels, "MIN_NUMEL", 0)
    with offload_rt.load(folder, cache_experts=cache) as model:
        assert model.config.quantization.scheme == "mxfp4"
        got = model.logits(PROMPTS[0])
        assert (got - want_logits).abs().max().item() <= 1e-4
        tokens = [r.token_ids for r in model.generate(PROMPTS[:2], max_new_tokens=NEW_TOKENS)]
        stats = model.stats()
        packed = expert_nbytes(model.config, torch.float32)
    assert tokens == want_tokens
    if cache is not None:
        # what a miss moves: the packed codes, exponents and biases, under 0.3 of bf16
        cfg = model.config
        d, f = cfg.hidden_size, cfg.moe_intermediate_size
        bf16 = (3 * d * f + 2 * f + d) * 2
        assert stats["misses"] > 0 and stats["bytes_loaded"] == stats["misses"] * packed
        assert packed / bf16 <= 0.3, (packed, bf16)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_quantize_to_mxfp4_runs_as_transformers_on_the_dequantized_weights(
    tmp_path, family, capsys
):
    """`offload-rt quantize --format mxfp4` writes each expert weight as blocks and scales;
    the runtime's logits equal transformers' on a float checkpoint holding exactly the weights
    those codes stand for, and the per-expert bytes are what MXFP4 promises."""
    import transformers

    from offload_rt.cli import main
    from offload_rt.experts.mxfp4 import dequantize_mxfp4_new

    width = {"mixtral": "intermediate_size", "qwen3_moe": "moe_intermediate_size"}[family]
    save_family(family, tmp_path / "float", **{width: 64})
    argv = ["quantize", str(tmp_path / "float"), str(tmp_path / "q"), "--format", "mxfp4"]
    assert main([*argv, "--no-progress"]) == 0
    assert "quantized to mxfp4 (groups of 32)" in capsys.readouterr().out
    # the reference: the float checkpoint with every expert weight replaced by its dequantized
    # MXFP4 codes, read by transformers itself
    tensors = load_file(tmp_path / "float" / "model.safetensors")
    quantized = load_file(tmp_path / "q" / "model.safetensors")
    replaced = 0
    for name in list(tensors):
        base = name.removesuffix(".weight")
        if base + ".blocks" not in quantized:
            continue
        blocks, scales = quantized[base + ".blocks"], quantized[base + ".scales"]
        tensors[name] = dequantize_mxfp4_new(blocks, scales, torch.float32)
        replaced += 1
    with offload_rt.load(tmp_path / "q", cache_experts=4) as model:
        cfg = model.config
        assert replaced == cfg.num_experts_total * 3
        got = model.logits(PROMPTS[0])
        stats = model.stats()
        packed = expert_nbytes(cfg, torch.float32)
    save_file(tensors, tmp_path / "float" / "model.safetensors", metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float").eval()
    with torch.no_grad():
        want = hf(torch.tensor([PROMPTS[0]])).logits[0]
    assert (got - want).abs().max().item() <= 1e-4
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    assert packed == 3 * (d * f // 2 + d * f // 32)  # 4.25 bits a weight, nothing else
    assert stats["bytes_loaded"] == stats["misses"] * packed


def test_quantize_gpt_oss_to_mxfp4_writes_the_release_layout(tmp_path):
    """A float GPT-OSS quantized to MXFP4 is written in the release's layout (fused blocks and
    scales per layer, gate and up rows interleaved, biases as they were); the runtime's logits
    equal transformers' with the weights transformers dequantizes from those very tensors."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from offload_rt.tools.quantize import quantize_checkpoint

    hf = save_family("gpt_oss", tmp_path / "float", intermediate_size=64)
    quantize_checkpoint(tmp_path / "float", tmp_path / "q", 4, 32, progress=False, scheme="mxfp4")
    stored = load_file(tmp_path / "q" / "model.safetensors")
    floats = load_file(tmp_path / "float" / "model.safetensors")
    for i, layer in enumerate(hf.model.layers):
        prefix = f"model.layers.{i}.mlp.experts."
        for name in ("gate_up_proj", "down_proj"):
            assert prefix + name not in stored
            blocks, scales = stored[prefix + name + "_blocks"], stored[prefix + name + "_scales"]
            weight = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            # close to the float weights: the codes stand for this layer's experts, in order
            assert (weight - floats[prefix + name]).abs().max() < 0.2
            with torch.no_grad():
                getattr(layer.mlp.experts, name).copy_(weight)
        assert torch.equal(
            stored[prefix + "gate_up_proj_bias"], floats[prefix + "gate_up_proj_bias"]
        )
    with torch.no_grad():
        want = hf(torch.tensor([PROMPTS[0]])).logits[0]
    with offload_rt.load(tmp_path / "q", cache_experts=4) as model:
        assert (model.logits(PROMPTS[0]) - want).abs().max().item() <= 1e-4
