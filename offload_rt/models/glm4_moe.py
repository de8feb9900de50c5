"""GLM-4.5 (`glm4_moe`): DeepSeek-V3's MoE block — sigmoid router scores, an
`e_score_correction_bias` that joins them only to choose, experts chosen within the best
`topk_group` of `n_group` groups, weights renormalised and times `routed_scaling_factor`,
`n_shared_experts` shared experts on every token, the first `first_k_dense_replace` layers
dense — with grouped-query attention: q/k/v biases, rotary on the first
`partial_rotary_factor` of each head, q/k RMSNorm per head when `use_qk_norm`. Layers past
`num_hidden_layers` (its multi-token-prediction layer) are not read.
Reference: `Glm4MoeForCausalLM` in transformers."""

from __future__ import annotations

from typing import Any

from offload_rt.config import ConfigError, ConfigReader
from offload_rt.models.common import (
    DEEPSEEK_NAMES,
    SoftmaxMoEConfig,
    deepseek_moe,
    norm_topk,
)
from offload_rt.models.family import SoftmaxFamily


def parse(r: ConfigReader) -> SoftmaxMoEConfig:
    fields = deepseek_moe(r)
    rope = r.d.get("rope_parameters") if isinstance(r.d.get("rope_parameters"), dict) else {}
    factor = rope.get("partial_rotary_factor", r.d.get("partial_rotary_factor", 0.5))
    if not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise ConfigError(f"{r.source}: partial_rotary_factor must lie in (0, 1], got {factor!r}")
    rotary = int(fields["head_dim"] * factor)
    if rotary % 2:
        raise ConfigError(f"{r.source}: rotary dimensions {rotary} must be even")
    return SoftmaxMoEConfig(
        **fields,
        renormalize=norm_topk(r),
        qkv_bias=r.boolean("attention_bias", default=False),
        qk_norm="head" if r.boolean("use_qk_norm", default=False) else "none",
        router_scoring="sigmoid",
        group_score="top2",
        correction=True,
        rotary_dim=rotary,
    )


def demo(vocab_size: int) -> dict[str, Any]:
    return {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_shared_experts": 1,
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "attention_bias": True,
        "use_qk_norm": True,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "float32",
    }


FAMILY = SoftmaxFamily(
    model_type="glm4_moe",
    architectures=("Glm4MoeForCausalLM",),
    parser=parse,
    names=DEEPSEEK_NAMES,
    demo=demo,
)
