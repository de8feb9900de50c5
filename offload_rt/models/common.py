"""What the softmax-routed families share: their config core, their Llama-style tensor names,
the checkpoint spec built from those names, and the decoder built from the weights.

A family module (`mixtral.py`, `qwen3_moe.py`, ...) parses its config.json into a
`SoftmaxMoEConfig` and gives its `MoENames`; everything here is driven by those two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from offload_rt.checkpoint import (
    CheckpointSpec,
    ExpertLayout,
    FusedLayout,
    PerExpertLayout,
)
from offload_rt.config import ConfigError, ConfigReader, ModelConfig, core_fields
from offload_rt.model import (
    AttentionSpec,
    AttentionWeights,
    DecoderSpec,
    DenseMLP,
    DenseWeights,
    ExpertBackend,
    ExpertPrefetcher,
    LayerWeights,
    MoEDecoder,
    MoEWeights,
    RopeTables,
    RouterSpec,
)

QK_NORMS = ("none", "head", "full")  # no q/k norm; RMSNorm per head (Qwen3); whole (OLMoE)
Getter = Callable[[str], torch.Tensor]  # a dense tensor by name, on the device, in the dtype


@dataclass(frozen=True)
class SoftmaxMoEConfig(ModelConfig):
    """The core plus what Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE set differently."""

    renormalize: bool = True  # top-k weights divided by their sum (norm_topk_prob)
    qkv_bias: bool = False  # q, k, v projections have biases
    o_bias: bool = False  # the output projection has a bias
    qk_norm: str = "none"  # one of QK_NORMS
    clip_qkv: float | None = None  # q, k, v clamped to ±clip_qkv (OLMoE)
    dense_intermediate_size: int | None = None  # the dense MLP's width in non-MoE layers
    shared_intermediate_size: int | None = None  # a shared expert's width (Qwen2-MoE)
    shared_gate: bool = False  # the shared expert's output scaled by sigmoid(gate x)
    router_scoring: str = "softmax"  # or "sigmoid" (GLM-4.5, DeepSeek-V3)
    router_groups: int = 1  # n_group
    router_groups_kept: int = 1  # topk_group
    group_score: str = "max"  # "top2": a group scored by its best two experts (DeepSeek-V3)
    routed_scale: float = 1.0  # routed_scaling_factor
    correction: bool = False  # the router has an e_score_correction_bias
    rotary_dim: int | None = None  # dimensions of a head that rotate; None: all (head_dim)

    @property
    def router_spec(self) -> RouterSpec:
        return RouterSpec(
            self.num_experts_per_tok,
            self.router_scoring,
            self.renormalize,
            self.routed_scale,
            self.router_groups,
            self.router_groups_kept,
            self.group_score,
        )


@dataclass(frozen=True)
class MoENames:
    """A family's tensor names; templates take {layer}, and {expert} and {proj} for experts.
    Attention, norms and embeddings follow Llama's names in every family here."""

    router: str  # e.g. "model.layers.{layer}.mlp.gate.weight"
    experts: str  # per-expert layout, without ".weight"
    projections: dict[str, str]  # "gate"/"up"/"down" -> the family's projection names
    fused_router: str = "model.layers.{layer}.mlp.gate.weight"  # as transformers 5 writes
    fused_gate_up: str = "model.layers.{layer}.mlp.experts.gate_up_proj"
    fused_down: str = "model.layers.{layer}.mlp.experts.down_proj"
    dense_mlp: str = "model.layers.{layer}.mlp.{proj}.weight"  # proj: gate/up/down_proj
    shared: str = "model.layers.{layer}.mlp.shared_expert.{proj}.weight"
    shared_gate: str = "model.layers.{layer}.mlp.shared_expert_gate.weight"
    correction: str = "model.layers.{layer}.mlp.gate.e_score_correction_bias"


# the names Qwen2-MoE, Qwen3-MoE and OLMoE share: `mlp.gate` routes to `mlp.experts.{e}`
MLP_EXPERT_NAMES = MoENames(
    router="model.layers.{layer}.mlp.gate.weight",
    experts="model.layers.{layer}.mlp.experts.{expert}.{proj}",
    projections={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
)


# the names of DeepSeek-V3's MoE block, as GLM-4.5 and DeepSeek-V2/V3 store it: the router
# (`mlp.gate`, with its correction bias), routed experts, `shared_experts` without a gate
DEEPSEEK_NAMES = MoENames(
    router="model.layers.{layer}.mlp.gate.weight",
    experts="model.layers.{layer}.mlp.experts.{expert}.{proj}",
    projections={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    shared="model.layers.{layer}.mlp.shared_experts.{proj}.weight",
)


def sparse_layers(r: ConfigReader, layers: int) -> tuple[int, ...]:
    """Qwen's rule: MoE unless in `mlp_only_layers` or off the `decoder_sparse_step` grid."""
    step = r.optional_positive_int("decoder_sparse_step") or 1
    dense = set(r.int_list("mlp_only_layers"))
    return tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)


def qwen_core(r: ConfigReader) -> dict:
    """The core fields as Qwen2-MoE and Qwen3-MoE name them, and the dense MLP width when
    some layers are dense (`dense_intermediate_size`)."""
    no_sliding_window(r)
    moe_layers = sparse_layers(r, r.positive_int("num_hidden_layers"))
    core = core_fields(
        r,
        experts_field=r.first_present("num_experts", "num_local_experts"),
        moe_intermediate_field="moe_intermediate_size",
        moe_layers=moe_layers,
    )
    dense = len(moe_layers) < core["num_hidden_layers"]
    core["dense_intermediate_size"] = r.positive_int("intermediate_size") if dense else None
    return core


def deepseek_moe(r: ConfigReader, rope_kinds: tuple[str, ...] = ("default",)) -> dict[str, Any]:
    """The core and MoE-block fields DeepSeek-V3's block sets, as GLM-4.5 and DeepSeek name
    them: dense first layers, routed and shared experts, the router's groups and scale."""
    layers = r.positive_int("num_hidden_layers")
    first = r.optional_int("first_k_dense_replace") or 0
    freq = r.optional_positive_int("moe_layer_freq") or 1
    moe_layers = tuple(i for i in range(first, layers) if i % freq == 0)
    core = core_fields(
        r,
        experts_field="n_routed_experts",
        moe_intermediate_field="moe_intermediate_size",
        moe_layers=moe_layers,
        rope_kinds=rope_kinds,
    )
    dense = len(moe_layers) < layers
    shared = r.optional_int("n_shared_experts") or 0
    groups = r.optional_positive_int("n_group") or 1
    kept = r.optional_positive_int("topk_group") or 1
    if core["experts_per_layer"] % groups or kept > groups:
        raise ConfigError(
            f"{r.source}: n_group {groups} must divide n_routed_experts "
            f"{core['experts_per_layer']} and be at least topk_group {kept}"
        )
    return dict(
        **core,
        dense_intermediate_size=r.positive_int("intermediate_size") if dense else None,
        shared_intermediate_size=core["moe_intermediate_size"] * shared or None,
        router_groups=groups,
        router_groups_kept=kept,
        routed_scale=r.optional_positive_float("routed_scaling_factor") or 1.0,
    )


def no_sliding_window(r: ConfigReader) -> None:
    if r.boolean("use_sliding_window", default=False):
        raise ConfigError(
            f"{r.source}: use_sliding_window true is not supported for {r.d['model_type']} "
            "(its per-layer windows); set it to false"
        )


def norm_topk(r: ConfigReader) -> bool:
    return r.boolean("norm_topk_prob", default=False)


def _attention_shapes(cfg: SoftmaxMoEConfig, p: str) -> dict[str, tuple[int, ...]]:
    d, q_out = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        p + "self_attn.q_proj.weight": (q_out, d),
        p + "self_attn.k_proj.weight": (kv_out, d),
        p + "self_attn.v_proj.weight": (kv_out, d),
        p + "self_attn.o_proj.weight": (d, q_out),
    }
    if cfg.qkv_bias:
        for name, width in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            shapes[p + f"self_attn.{name}_proj.bias"] = (width,)
    if cfg.o_bias:
        shapes[p + "self_attn.o_proj.bias"] = (d,)
    if cfg.qk_norm != "none":
        per_head = cfg.qk_norm == "head"
        shapes[p + "self_attn.q_norm.weight"] = (cfg.head_dim if per_head else q_out,)
        shapes[p + "self_attn.k_norm.weight"] = (cfg.head_dim if per_head else kv_out,)
    return shapes


def _mlp_shapes(template: str, layer: int, width: int, d: int) -> dict[str, tuple[int, ...]]:
    return {
        template.format(layer=layer, proj="gate_proj"): (width, d),
        template.format(layer=layer, proj="up_proj"): (width, d),
        template.format(layer=layer, proj="down_proj"): (d, width),
    }


def _router_name(cfg: SoftmaxMoEConfig, names: MoENames, present: frozenset) -> str:
    """The hub's router name, or transformers 5's when the checkpoint has that one."""
    fused = names.fused_router.format(layer=cfg.moe_layers[0])
    return names.fused_router if fused in present else names.router


AttentionShapes = Callable[[Any, str], dict[str, tuple[int, ...]]]
AttentionReader = Callable[[Any, Getter, str], Any]


def dense_shapes(
    cfg: SoftmaxMoEConfig,
    names: MoENames,
    present: frozenset,
    attention: AttentionShapes | None = None,
) -> dict[str, tuple[int, ...]]:
    """Every tensor the coordinator holds, with its expected shape; `attention` gives a
    layer's attention tensors (default: grouped-query attention's, Llama's names)."""
    attention = attention or _attention_shapes
    d, v = cfg.hidden_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    router = _router_name(cfg, names, present)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes.update(attention(cfg, p))
        if not cfg.grid.has_layer(layer):
            assert cfg.dense_intermediate_size is not None
            shapes.update(_mlp_shapes(names.dense_mlp, layer, cfg.dense_intermediate_size, d))
            continue
        shapes[router.format(layer=layer)] = (cfg.experts_per_layer, d)
        if cfg.correction:
            shapes[names.correction.format(layer=layer)] = (cfg.experts_per_layer,)
        if cfg.shared_intermediate_size:
            shapes.update(_mlp_shapes(names.shared, layer, cfg.shared_intermediate_size, d))
            if cfg.shared_gate:
                shapes[names.shared_gate.format(layer=layer)] = (1, d)
    return shapes


def expert_layout(cfg: ModelConfig, names: MoENames, present: frozenset) -> ExpertLayout:
    """Fused 3-D tensors when the checkpoint has them, else one tensor per expert."""
    f, d = cfg.moe_intermediate_size, cfg.hidden_size
    if names.fused_gate_up.format(layer=cfg.moe_layers[0]) in present:
        if cfg.quantization is not None:
            raise ConfigError(
                "quantized experts are read one tensor per expert; this checkpoint fuses them"
            )
        return FusedLayout(cfg.grid, names.fused_gate_up, names.fused_down, f, d)
    shapes = {"gate": (f, d), "up": (f, d), "down": (d, f)}
    return PerExpertLayout(cfg.grid, names.experts, names.projections, shapes, cfg.quantization)


def checkpoint_spec(cfg: SoftmaxMoEConfig, names: MoENames, present: frozenset) -> CheckpointSpec:
    return CheckpointSpec(
        config=cfg,
        dense=dense_shapes(cfg, names, present),
        experts=expert_layout(cfg, names, present),
        dtype_probe="model.embed_tokens.weight",
    )


def _attention(cfg: SoftmaxMoEConfig, get: Getter, p: str) -> AttentionWeights:
    qkv = [get(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")]
    bias = None
    if cfg.qkv_bias:
        bias = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in ("q", "k", "v")])
    norms = (None, None)
    if cfg.qk_norm != "none":
        norms = (get(p + "self_attn.q_norm.weight"), get(p + "self_attn.k_norm.weight"))
    return AttentionWeights(
        wqkv=torch.cat(qkv),
        wo=get(p + "self_attn.o_proj.weight"),
        bqkv=bias,
        bo=get(p + "self_attn.o_proj.bias") if cfg.o_bias else None,
        q_norm=norms[0],
        k_norm=norms[1],
    )


def _mlp(get: Getter, template: str, layer: int) -> DenseMLP:
    def w(proj: str) -> torch.Tensor:
        return get(template.format(layer=layer, proj=proj))

    return DenseMLP(w13=torch.cat([w("gate_proj"), w("up_proj")]), w2=w("down_proj"))


def _layer_mlp(
    cfg: SoftmaxMoEConfig, names: MoENames, get: Getter, layer: int, router: str
) -> MoEWeights | DenseMLP:
    if not cfg.grid.has_layer(layer):
        return _mlp(get, names.dense_mlp, layer)
    shared = _mlp(get, names.shared, layer) if cfg.shared_intermediate_size else None
    gate = get(names.shared_gate.format(layer=layer)) if shared and cfg.shared_gate else None
    correction = get(names.correction.format(layer=layer)).float() if cfg.correction else None
    return MoEWeights(
        router=get(router.format(layer=layer)),
        correction=correction,
        shared=shared,
        shared_gate=gate,
    )


def dense_weights(
    cfg: SoftmaxMoEConfig,
    names: MoENames,
    get: Getter,
    present: frozenset,
    attention: AttentionReader | None = None,
) -> DenseWeights:
    attention = attention or _attention
    router = _router_name(cfg, names, present)
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        layers.append(
            LayerWeights(
                input_norm=get(p + "input_layernorm.weight"),
                attn=attention(cfg, get, p),
                post_attn_norm=get(p + "post_attention_layernorm.weight"),
                mlp=_layer_mlp(cfg, names, get, i, router),
            )
        )
    embed = get("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else get("lm_head.weight")
    return DenseWeights(embed=embed, layers=layers, norm=get("model.norm.weight"), lm_head=lm_head)


def build_decoder(
    cfg: SoftmaxMoEConfig,
    names: MoENames,
    get: Getter,
    present: frozenset,
    backend: ExpertBackend,
    device: torch.device,
    prefetcher: ExpertPrefetcher | None,
) -> MoEDecoder:
    spec = DecoderSpec(
        attention=AttentionSpec(
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.rms_norm_eps,
            cfg.clip_qkv,
        ),
        router=cfg.router_spec,
    )
    weights = dense_weights(cfg, names, get, present)
    rotary = cfg.rotary_dim or cfg.head_dim
    rope = RopeTables.build(rotary, cfg.rope_theta, cfg.max_position_embeddings, device)
    return MoEDecoder(cfg, spec, weights, backend, rope, prefetcher)
