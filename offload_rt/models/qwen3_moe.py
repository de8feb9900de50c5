"""Qwen3-MoE (`qwen3_moe`): softmax → top-k → renormalised when `norm_topk_prob`; RMSNorm on
each head of q and k before RoPE; an explicit `head_dim`; dense MLP layers among the MoE ones
(`mlp_only_layers`, `decoder_sparse_step`). Reference: `Qwen3MoeForCausalLM` in transformers."""

from __future__ import annotations

from typing import Any

from offload_rt.config import ConfigReader
from offload_rt.models.common import (
    MLP_EXPERT_NAMES,
    SoftmaxMoEConfig,
    norm_topk,
    qwen_core,
)
from offload_rt.models.family import SoftmaxFamily


def parse(r: ConfigReader) -> SoftmaxMoEConfig:
    bias = r.boolean("attention_bias", default=False)
    return SoftmaxMoEConfig(
        **qwen_core(r), renormalize=norm_topk(r), qkv_bias=bias, o_bias=bias, qk_norm="head"
    )


def demo(vocab_size: int) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "mlp_only_layers": [0],
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 48,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "float32",
    }


FAMILY = SoftmaxFamily(
    model_type="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    parser=parse,
    names=MLP_EXPERT_NAMES,
    demo=demo,
)
