"""Checkpoints in the original Mixtral release format, made from Hugging Face ones for the tests.

The inverse of `offload-rt convert`, written independently of it: a transformers checkpoint's
tensors are put back into the torrent's layout (fused experts, w2 stored per expert as (F, D),
q/k rows in the interleaved rotary order) and saved with torch.save as consolidated.00.pth,
with a params.json of the torrent's fields.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def hf_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face checkpoint folder (single file or shards)."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def half_split_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' q/k row order (per head: all real parts, then all imaginary parts) ->
    the original's (per head: real, imaginary, real, imaginary ...)."""
    rows, d = w.shape
    hd = rows // heads
    # row h*hd + c*hd/2 + i of the HF layout is pair i's component c; the original puts it at
    # row h*hd + 2i + c
    out = torch.empty_like(w)
    for h in range(heads):
        for i in range(hd // 2):
            for c in range(2):
                out[h * hd + 2 * i + c] = w[h * hd + c * hd // 2 + i]
    return out


def original_state(hf: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    experts = config["num_local_experts"]
    out = {
        "tok_embeddings.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
    }
    for layer in range(config["num_hidden_layers"]):
        p, o = f"model.layers.{layer}.", f"layers.{layer}."
        out[o + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[o + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[o + "attention.wq.weight"] = half_split_to_interleaved(
            hf[p + "self_attn.q_proj.weight"], heads
        )
        out[o + "attention.wk.weight"] = half_split_to_interleaved(
            hf[p + "self_attn.k_proj.weight"], kv_heads
        )
        out[o + "attention.wv.weight"] = hf[p + "self_attn.v_proj.weight"]
        out[o + "attention.wo.weight"] = hf[p + "self_attn.o_proj.weight"]
        moe = p + "block_sparse_moe."
        out[o + "block_sparse_moe.gate.weight"] = hf[moe + "gate.weight"]
        for proj in ("w1", "w2", "w3"):
            blocks = [hf[f"{moe}experts.{e}.{proj}.weight"] for e in range(experts)]
            if proj == "w2":  # (D, F) each -> stored as (F, D)
                blocks = [b.T for b in blocks]
            out[o + f"block_sparse_moe.{proj}"] = torch.cat(blocks).contiguous()
    return {k: v.contiguous().clone() for k, v in out.items()}


def torrent_params(config: dict) -> dict:
    """params.json with the torrent's fields only (no rope_theta, no context length)."""
    return {
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "head_dim": config["hidden_size"] // config["num_attention_heads"],
        "hidden_dim": config["intermediate_size"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config["num_key_value_heads"],
        "norm_eps": config.get("rms_norm_eps", 1e-5),
        "vocab_size": config["vocab_size"],
        "moe": {
            "num_experts_per_tok": config["num_experts_per_tok"],
            "num_experts": config["num_local_experts"],
        },
    }


def write_original(folder: Path, state: dict[str, torch.Tensor], params: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params, indent=4))
    return folder


def original_from_hf(folder: Path, hf_folder: Path) -> Path:
    """An original-format copy of the Hugging Face checkpoint in `hf_folder`."""
    config = json.loads((hf_folder / "config.json").read_text())
    state = original_state(hf_state(hf_folder), config)
    return write_original(folder, state, torrent_params(config))
