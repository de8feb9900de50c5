"""Qwen2-MoE (`qwen2_moe`): q/k/v biases; softmax → top-k, renormalised only when
`norm_topk_prob`; a shared expert of its own width on every token, scaled by
sigmoid(shared_expert_gate x). Reference: `Qwen2MoeForCausalLM` in transformers."""

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
    return SoftmaxMoEConfig(
        **qwen_core(r),
        renormalize=norm_topk(r),
        qkv_bias=r.boolean("qkv_bias", default=True),  # the hub's configs leave it out
        shared_intermediate_size=r.positive_int("shared_expert_intermediate_size"),
        shared_gate=True,
    )


def demo(vocab_size: int) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "float32",
    }


FAMILY = SoftmaxFamily(
    model_type="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    parser=parse,
    names=MLP_EXPERT_NAMES,
    demo=demo,
)
