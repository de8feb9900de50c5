"""OLMoE (`olmoe`): RMSNorm over the whole q and k projections (not per head), then q, k, v
clamped to ±`clip_qkv` when set; softmax → top-k, renormalised only when `norm_topk_prob`;
every layer MoE. Reference: `OlmoeForCausalLM` in transformers."""

from __future__ import annotations

from typing import Any

from offload_rt.config import ConfigReader, core_fields
from offload_rt.models.common import MLP_EXPERT_NAMES, SoftmaxMoEConfig, norm_topk
from offload_rt.models.family import SoftmaxFamily


def parse(r: ConfigReader) -> SoftmaxMoEConfig:
    core = core_fields(
        r,
        experts_field=r.first_present("num_experts", "num_local_experts"),
        moe_intermediate_field="intermediate_size",
        moe_layers=tuple(range(r.positive_int("num_hidden_layers"))),
    )
    bias = r.boolean("attention_bias", default=False)
    return SoftmaxMoEConfig(
        **core,
        renormalize=norm_topk(r),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=r.optional_positive_float("clip_qkv"),
    )


def demo(vocab_size: int) -> dict[str, Any]:
    return {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
        "clip_qkv": 8.0,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e4,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "float32",
    }


FAMILY = SoftmaxFamily(
    model_type="olmoe",
    architectures=("OlmoeForCausalLM",),
    parser=parse,
    names=MLP_EXPERT_NAMES,
    demo=demo,
)
