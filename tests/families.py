"""Random checkpoints of every registered family, written by its transformers class: the
reference for the model math. One entry per family; a family added to the registry without
an entry here fails `test_every_registered_family_has_a_reference`."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_experts_per_tok=2,
    # larger than the default 0.02 so that logits are spread and greedy choices are not near-ties
    initializer_range=0.1,
)

# DeepSeek-V3's MoE block as GLM-4.5 and DeepSeek share it: 6 experts in 3 groups of which 2
# are kept, a dense first layer; and DeepSeek's latent attention shape
DEEPSEEK_BLOCK = dict(
    intermediate_size=96,
    moe_intermediate_size=48,
    n_routed_experts=6,
    n_group=3,
    topk_group=2,
    first_k_dense_replace=1,
)
MLA = dict(
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=20, num_key_value_heads=4
)

# family -> (transformers config class, model class, its own fields); 6 experts a layer
REFERENCES: dict[str, tuple[str, str, dict]] = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=48, num_local_experts=6),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        # a dense first layer, head_dim != hidden / heads, renormalised top-k
        dict(
            intermediate_size=96,
            moe_intermediate_size=48,
            num_experts=6,
            head_dim=24,
            mlp_only_layers=[0],
            norm_topk_prob=True,
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        # a shared expert of its own width, q/k/v biases, no renormalisation
        dict(
            intermediate_size=96,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            num_experts=6,
            norm_topk_prob=False,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        # q/k norms over whole projections, a clip tight enough to bite on random weights
        dict(intermediate_size=48, num_experts=6, clip_qkv=0.5, eos_token_id=2),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        # DeepSeek-V3's block: a dense first layer, 3 groups of which 2 are kept, a shared
        # expert, scaled weights; partial rotary, q/k norms, q/k/v biases
        dict(
            **DEEPSEEK_BLOCK,
            n_shared_experts=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.5,
            head_dim=24,
            attention_bias=True,
            use_qk_norm=True,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        # a query latent, YaRN with mscale_all_dim, 3 groups of 2 kept, a dense first layer,
        # a shared expert, a correction bias, scaled renormalised weights
        dict(
            **DEEPSEEK_BLOCK,
            **MLA,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            q_lora_rank=40,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                beta_fast=32.0,
                beta_slow=1.0,
                mscale=1.0,
                mscale_all_dim=1.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        # V2-Lite's shape: no query latent; group-limited softmax routing, two shared experts
        dict(
            **DEEPSEEK_BLOCK,
            **MLA,
            n_shared_experts=2,
            topk_method="group_limited_greedy",
            routed_scaling_factor=1.5,
            q_lora_rank=None,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        # a window shorter than the prompts, explicit head_dim, YaRN scaling that bites within
        # the context, a SwiGLU clamp tight enough to bite on random weights
        dict(
            intermediate_size=48,
            num_local_experts=6,
            head_dim=24,
            sliding_window=6,
            swiglu_limit=1.0,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=64,
            ),
        ),
    ),
}


def save_family(
    family: str,
    folder: Path,
    fused: bool = False,
    sharded: bool = False,
    seed: int = 0,
    **overrides,
):
    """Write a random `family` checkpoint to `folder` (the hub's per-expert layout, or
    transformers 5's fused one; one file or shards); returns the reference model (eval).
    Biases and norm weights are drawn too, so that every one of them is exercised."""
    import transformers

    config_cls, model_cls, fields = REFERENCES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**COMMON, **fields, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.dim() == 1:  # norm weights
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.1)
        for name, b in model.named_buffers():  # a router's correction bias: large enough to bite
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
    kwargs: dict = {"save_original_format": not fused}
    if sharded:
        kwargs["max_shard_size"] = "100KB"
    model.save_pretrained(folder, **kwargs)
    return model
