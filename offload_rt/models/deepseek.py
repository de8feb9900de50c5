"""DeepSeek-V3 (`deepseek_v3`, also R1) and DeepSeek-V2 (`deepseek_v2`, V2-Lite): multi-head
latent attention (`model/mla.py`: an optional query latent `q_lora_rank`, a key/value latent
`kv_lora_rank` and a rotary key shared by the heads, YaRN with `mscale_all_dim`), and the MoE
block of `deepseek_moe`: dense first layers, shared experts, a grouped router —
V3: sigmoid scores, an `e_score_correction_bias` to choose, groups scored by their best two;
V2: softmax scores, `topk_method` greedy or group_limited_greedy (groups scored by their best).
Layers past `num_hidden_layers` (V3's multi-token-prediction layer) are not read.
References: `DeepseekV3ForCausalLM`, `DeepseekV2ForCausalLM` in transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from offload_rt.checkpoint import CheckpointSpec
from offload_rt.config import ConfigError, ConfigReader, YarnConfig
from offload_rt.model import (
    DecoderModel,
    DecoderSpec,
    ExpertBackend,
    ExpertPrefetcher,
    MoEDecoder,
    RopeTables,
)
from offload_rt.model.mla import MLASpec, MLAWeights
from offload_rt.model.rope import mscale
from offload_rt.models.common import (
    DEEPSEEK_NAMES,
    Getter,
    MoENames,
    SoftmaxMoEConfig,
    deepseek_moe,
    dense_shapes,
    dense_weights,
    expert_layout,
    norm_topk,
)

V2_METHODS = ("greedy", "group_limited_greedy")


@dataclass(frozen=True)
class DeepseekConfig(SoftmaxMoEConfig):
    q_lora_rank: int | None = None  # the query latent's width; None: a plain q projection
    kv_lora_rank: int = 512  # R: the key/value latent a token keeps in the cache
    nope_dim: int = 128  # qk_nope_head_dim: the part of a head's key from the latent
    rope_dim: int = 64  # qk_rope_head_dim: the rotary part, one key for every head
    v_dim: int = 128  # v_head_dim
    attention_bias: bool = False  # q_a, kv_a and o projections have biases
    rope_interleave: bool = True  # rotary pairs interleaved
    yarn: YarnConfig | None = None  # rotary scaling; None: plain

    @property
    def softmax_scale(self) -> float:
        scale = (self.nope_dim + self.rope_dim) ** -0.5
        if self.yarn is not None and self.yarn.mscale_all_dim:
            scale *= mscale(self.yarn.factor, self.yarn.mscale_all_dim) ** 2
        return scale


def _mla_fields(r: ConfigReader) -> dict[str, Any]:
    return dict(
        q_lora_rank=r.optional_positive_int("q_lora_rank"),
        kv_lora_rank=r.positive_int("kv_lora_rank"),
        nope_dim=r.positive_int("qk_nope_head_dim"),
        rope_dim=r.positive_int("qk_rope_head_dim"),
        v_dim=r.positive_int("v_head_dim"),
        attention_bias=r.boolean("attention_bias", default=False),
        yarn=r.yarn(),
    )


def parse_v3(r: ConfigReader) -> DeepseekConfig:
    return DeepseekConfig(
        **deepseek_moe(r, rope_kinds=("default", "yarn")),
        **_mla_fields(r),
        renormalize=r.boolean("norm_topk_prob", default=True),
        router_scoring="sigmoid",
        group_score="top2",
        correction=True,
        rope_interleave=r.boolean("rope_interleave", default=True),
    )


def parse_v2(r: ConfigReader) -> DeepseekConfig:
    fields = deepseek_moe(r, rope_kinds=("default", "yarn"))
    method = r.d.get("topk_method", "greedy")
    if method not in V2_METHODS:
        raise ConfigError(f"{r.source}: topk_method {method!r} is not one of {V2_METHODS}")
    if method == "greedy":  # groups play no part
        fields.update(router_groups=1, router_groups_kept=1)
    return DeepseekConfig(**fields, **_mla_fields(r), renormalize=norm_topk(r), group_score="max")


def _mla_shapes(cfg: DeepseekConfig, p: str) -> dict[str, tuple[int, ...]]:
    d, h, r = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    a = p + "self_attn."
    shapes: dict[str, tuple[int, ...]] = {
        a + "kv_a_proj_with_mqa.weight": (r + cfg.rope_dim, d),
        a + "kv_a_layernorm.weight": (r,),
        a + "kv_b_proj.weight": (h * (cfg.nope_dim + cfg.v_dim), r),
        a + "o_proj.weight": (d, h * cfg.v_dim),
    }
    q_out = h * (cfg.nope_dim + cfg.rope_dim)
    if cfg.q_lora_rank is None:
        shapes[a + "q_proj.weight"] = (q_out, d)
    else:
        shapes[a + "q_a_proj.weight"] = (cfg.q_lora_rank, d)
        shapes[a + "q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        shapes[a + "q_b_proj.weight"] = (q_out, cfg.q_lora_rank)
    if cfg.attention_bias:
        shapes[a + "kv_a_proj_with_mqa.bias"] = (r + cfg.rope_dim,)
        shapes[a + "o_proj.bias"] = (d,)
        if cfg.q_lora_rank is not None:
            shapes[a + "q_a_proj.bias"] = (cfg.q_lora_rank,)
    return shapes


def _mla_weights(cfg: DeepseekConfig, get: Getter, p: str) -> MLAWeights:
    a = p + "self_attn."
    h = cfg.num_attention_heads
    kv_b = get(a + "kv_b_proj.weight").view(h, cfg.nope_dim + cfg.v_dim, cfg.kv_lora_rank)
    w_uk, w_uv = kv_b.split([cfg.nope_dim, cfg.v_dim], dim=1)

    def bias(name: str) -> torch.Tensor | None:
        return get(a + name) if cfg.attention_bias else None

    lora = cfg.q_lora_rank is not None
    return MLAWeights(
        wkv_a=get(a + "kv_a_proj_with_mqa.weight"),
        kv_a_norm=get(a + "kv_a_layernorm.weight"),
        w_uk=w_uk.contiguous(),
        w_uv=w_uv.contiguous(),
        wo=get(a + "o_proj.weight"),
        wq=None if lora else get(a + "q_proj.weight"),
        wq_a=get(a + "q_a_proj.weight") if lora else None,
        q_a_norm=get(a + "q_a_layernorm.weight") if lora else None,
        wq_b=get(a + "q_b_proj.weight") if lora else None,
        bq_a=bias("q_a_proj.bias") if lora else None,
        bkv_a=bias("kv_a_proj_with_mqa.bias"),
        bo=bias("o_proj.bias"),
    )


def kv_bytes_per_token(cfg: DeepseekConfig, dtype: torch.dtype) -> int:
    """What one token costs the cache in one layer: its latent and its rotary key."""
    return (cfg.kv_lora_rank + cfg.rope_dim) * dtype.itemsize


@dataclass(frozen=True)
class DeepseekFamily:
    model_type: str
    architectures: tuple[str, ...]
    parser: Callable[[ConfigReader], DeepseekConfig]
    names: MoENames = DEEPSEEK_NAMES

    def parse(self, r: ConfigReader) -> DeepseekConfig:
        return self.parser(r)

    def spec(self, cfg: DeepseekConfig, present: frozenset) -> CheckpointSpec:
        return CheckpointSpec(
            config=cfg,
            dense=dense_shapes(cfg, self.names, present, _mla_shapes),
            experts=expert_layout(cfg, self.names, present),
            dtype_probe="model.embed_tokens.weight",
        )

    def build(
        self,
        cfg: DeepseekConfig,
        get: Callable[[str], torch.Tensor],
        present: frozenset,
        backend: ExpertBackend,
        device: torch.device,
        prefetcher: ExpertPrefetcher | None,
    ) -> DecoderModel:
        weights = dense_weights(cfg, self.names, get, present, _mla_weights)
        attention = MLASpec(
            cfg.num_attention_heads,
            cfg.kv_lora_rank,
            cfg.nope_dim,
            cfg.rope_dim,
            cfg.v_dim,
            cfg.rms_norm_eps,
            cfg.softmax_scale,
            interleaved=cfg.rope_interleave,
        )
        rope = RopeTables.build(
            cfg.rope_dim, cfg.rope_theta, cfg.max_position_embeddings, device, cfg.yarn
        )
        spec = DecoderSpec(attention, cfg.router_spec)
        return MoEDecoder(cfg, spec, weights, backend, rope, prefetcher)

    def demo_config(self, vocab_size: int) -> dict[str, Any]:
        return demo(self.model_type, vocab_size)


def demo(model_type: str, vocab_size: int) -> dict[str, Any]:
    v3 = model_type == "deepseek_v3"
    return {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": 96 if v3 else None,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_shared_experts": 1 if v3 else 2,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc" if v3 else "group_limited_greedy",
        "first_k_dense_replace": 1,
        "norm_topk_prob": v3,
        "routed_scaling_factor": 2.5 if v3 else 1.0,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "float32",
    }


V3 = DeepseekFamily("deepseek_v3", ("DeepseekV3ForCausalLM",), parse_v3)
V2 = DeepseekFamily("deepseek_v2", ("DeepseekV2ForCausalLM",), parse_v2)
