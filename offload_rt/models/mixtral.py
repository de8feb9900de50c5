"""Mixtral (`mixtral`): every layer MoE, softmax → top-k → renormalise, no attention biases.
Reference: `MixtralForCausalLM` in transformers; the hub names experts w1 (gate), w3 (up),
w2 (down) under `block_sparse_moe`."""

from __future__ import annotations

from typing import Any

from offload_rt.config import ConfigReader, core_fields
from offload_rt.models.common import MoENames, SoftmaxMoEConfig
from offload_rt.models.family import SoftmaxFamily


def parse(r: ConfigReader) -> SoftmaxMoEConfig:
    layers = r.positive_int("num_hidden_layers")
    core = core_fields(
        r,
        experts_field="num_local_experts",
        moe_intermediate_field="intermediate_size",
        moe_layers=tuple(range(layers)),
        sliding_window=r.optional_positive_int("sliding_window"),
    )
    return SoftmaxMoEConfig(**core, renormalize=True)


def demo(vocab_size: int) -> dict[str, Any]:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "max_position_embeddings": 2048,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "float32",
    }


FAMILY = SoftmaxFamily(
    model_type="mixtral",
    architectures=("MixtralForCausalLM",),
    parser=parse,
    names=MoENames(
        router="model.layers.{layer}.block_sparse_moe.gate.weight",
        experts="model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}",
        projections={"gate": "w1", "up": "w3", "down": "w2"},
    ),
    demo=demo,
)
