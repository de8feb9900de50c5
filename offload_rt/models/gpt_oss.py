"""GPT-OSS (`gpt_oss`): attention with biases and a learned sink logit per head, layers
alternating sliding-window and full attention (`layer_types`; a sliding layer's KV cache is a
ring of `sliding_window` positions), YaRN rotary scaling; a router with a bias (top-k logits,
softmax over them); experts fused per layer with biases and a clamped SwiGLU, gate and up
interleaved column by column; the release's experts in MXFP4.
Reference: `GptOssForCausalLM` in transformers (`transformers.integrations.mxfp4` for MXFP4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from offload_rt.checkpoint import FLOAT_DTYPES, CheckpointSpec, TensorRef
from offload_rt.config import (
    ClampedSwiGLUConfig,
    ConfigError,
    ConfigReader,
    QuantConfig,
    YarnConfig,
    core_fields,
)
from offload_rt.grid import ExpertGrid, ExpertKey
from offload_rt.model import (
    AttentionSpec,
    DecoderModel,
    DecoderSpec,
    ExpertBackend,
    ExpertPrefetcher,
    MoEDecoder,
    MoEWeights,
    RopeTables,
    RouterSpec,
)
from offload_rt.models.common import MoENames, SoftmaxMoEConfig, dense_shapes, dense_weights

LAYER_TYPES = ("sliding_attention", "full_attention")
NAMES = MoENames(
    router="model.layers.{layer}.mlp.router.weight",
    experts="model.layers.{layer}.mlp.experts",
    projections={},
    fused_router="model.layers.{layer}.mlp.router.weight",
)
EXPERTS = "model.layers.{layer}.mlp.experts."


@dataclass(frozen=True)
class GptOssConfig(SoftmaxMoEConfig):
    layer_types: tuple[str, ...] = ()  # per layer, one of LAYER_TYPES
    window: int = 128  # positions a sliding layer sees (its own included)
    yarn: YarnConfig | None = None  # rotary scaling; None: plain rotary embeddings

    @property
    def ring_windows(self) -> tuple[int | None, ...]:
        return tuple(self.window if t == "sliding_attention" else None for t in self.layer_types)


def parse(r: ConfigReader) -> GptOssConfig:
    layers = r.positive_int("num_hidden_layers")
    core = core_fields(
        r,
        experts_field="num_local_experts",
        moe_intermediate_field="intermediate_size",
        moe_layers=tuple(range(layers)),
        rope_kinds=("default", "yarn"),
    )
    core["clamped_swiglu"] = ClampedSwiGLUConfig(  # transformers' defaults when absent
        limit=r.optional_positive_float("swiglu_limit") or 7.0,
        alpha=r.optional_positive_float("swiglu_alpha") or 1.702,
    )
    bias = r.boolean("attention_bias", default=True)
    return GptOssConfig(
        **core,
        renormalize=True,
        qkv_bias=bias,
        o_bias=bias,
        layer_types=_layer_types(r, layers),
        window=r.positive_int("sliding_window"),
        yarn=r.yarn(),
    )


def _layer_types(r: ConfigReader, layers: int) -> tuple[str, ...]:
    """As transformers' default when absent: sliding first, then alternating."""
    raw = r.d.get("layer_types")
    if raw is None:
        return tuple(LAYER_TYPES[i % 2] for i in range(layers))
    if not isinstance(raw, list) or len(raw) != layers or any(t not in LAYER_TYPES for t in raw):
        raise ConfigError(
            f"{r.source}: field 'layer_types' must list one of {LAYER_TYPES} for each of the "
            f"{layers} layers, got {raw!r}"
        )
    return tuple(raw)


@dataclass(frozen=True)
class GptOssLayout:
    """A layer's experts fused, as transformers writes GPT-OSS and OpenAI released it: float
    `gate_up_proj` (E, D, 2F) with gate and up interleaved column by column and `down_proj`
    (E, F, D), both (in, out); or MXFP4 `..._blocks` (E, out, in / 32, 16) and `..._scales`
    (E, out, in / 32), gate and up interleaved row by row; biases (E, 2F) and (E, D) beside."""

    grid: ExpertGrid
    hidden: int  # D
    intermediate: int  # F
    quant: QuantConfig | None  # the release's MXFP4, or None: float

    def _stored(self) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        e, d, f = self.grid.experts, self.hidden, self.intermediate
        out = {
            "gate_up_proj_bias": ((e, 2 * f), FLOAT_DTYPES),
            "down_proj_bias": ((e, d), FLOAT_DTYPES),
        }
        if self.quant is None:
            out["gate_up_proj"] = ((e, d, 2 * f), FLOAT_DTYPES)
            out["down_proj"] = ((e, f, d), FLOAT_DTYPES)
            return out
        g, u8 = self.quant.group_size, (torch.uint8,)
        for name, rows, cols in (("gate_up_proj", 2 * f, d), ("down_proj", d, f)):
            out[name + "_blocks"] = ((e, rows, cols // g, g // 2), u8)
            out[name + "_scales"] = ((e, rows, cols // g), u8)
        return out

    def tensors(self) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        return {
            EXPERTS.format(layer=layer) + name: spec
            for layer in self.grid.layers
            for name, spec in self._stored().items()
        }

    def parts(self, key: ExpertKey) -> dict[str, TensorRef]:
        prefix = EXPERTS.format(layer=key.layer)
        return {name: TensorRef(prefix + name, key.expert) for name in self._stored()}

    def logical(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bias = stored["gate_up_proj_bias"]  # (2F,) interleaved
        out = {
            "gate_bias": bias[0::2],
            "up_bias": bias[1::2],
            "down_bias": stored["down_proj_bias"],
        }
        if self.quant is None:
            gate_up = stored["gate_up_proj"]  # (D, 2F) interleaved columns
            out.update(gate=gate_up[:, 0::2].t(), up=gate_up[:, 1::2].t())
            out["down"] = stored["down_proj"].t()  # (D, F)
            return out
        for part in ("blocks", "scales"):
            rows = stored[f"gate_up_proj_{part}"]  # (2F, ...) interleaved rows
            out.update({f"gate.{part}": rows[0::2], f"up.{part}": rows[1::2]})
            out[f"down.{part}"] = stored[f"down_proj_{part}"]
        return out

    def stored(
        self, layer: int, experts: Iterator[dict[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """MXFP4 experts (what `quantize` writes) in the release's fused layout."""
        assert self.quant is not None, "float GPT-OSS experts are not written here"
        parts = list(experts)
        prefix = EXPERTS.format(layer=layer)

        def fused(gate: str, up: str) -> torch.Tensor:  # (E, 2F, ...) interleaved rows
            return torch.stack([_interleave(p[gate], p[up]) for p in parts])

        def stacked(name: str) -> torch.Tensor:
            return torch.stack([p[name] for p in parts])

        yield prefix + "gate_up_proj_bias", fused("gate_bias", "up_bias")
        yield prefix + "down_proj_bias", stacked("down_bias")
        for part in ("blocks", "scales"):
            yield prefix + f"gate_up_proj_{part}", fused(f"gate.{part}", f"up.{part}")
            yield prefix + f"down_proj_{part}", stacked(f"down.{part}")


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Rows (F, ...) of gate and up -> (2F, ...), gate's row i at 2i and up's at 2i + 1."""
    return torch.stack((gate, up), dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])


def spec(cfg: GptOssConfig, present: frozenset) -> CheckpointSpec:
    dense = dense_shapes(cfg, NAMES, present)
    for layer in range(cfg.num_hidden_layers):
        dense[f"model.layers.{layer}.self_attn.sinks"] = (cfg.num_attention_heads,)
        dense[f"model.layers.{layer}.mlp.router.bias"] = (cfg.experts_per_layer,)
    if cfg.quantization is not None and cfg.quantization.scheme != "mxfp4":
        raise ConfigError(
            f"GPT-OSS experts are read as released (MXFP4) or in float; "
            f"quantization scheme {cfg.quantization.scheme!r} is not supported for them"
        )
    layout = GptOssLayout(cfg.grid, cfg.hidden_size, cfg.moe_intermediate_size, cfg.quantization)
    return CheckpointSpec(cfg, dense, layout, dtype_probe="model.embed_tokens.weight")


def build(
    cfg: GptOssConfig,
    get: Callable[[str], torch.Tensor],
    present: frozenset,
    backend: ExpertBackend,
    device: torch.device,
    prefetcher: ExpertPrefetcher | None,
) -> DecoderModel:
    weights = dense_weights(cfg, NAMES, get, present)
    layers = []
    for i, lw in enumerate(weights.layers):
        assert isinstance(lw.mlp, MoEWeights)
        p = f"model.layers.{i}."
        attn = replace(lw.attn, sinks=get(p + "self_attn.sinks"))
        mlp = replace(lw.mlp, router_bias=get(p + "mlp.router.bias"))
        layers.append(replace(lw, attn=attn, mlp=mlp))
    attention = AttentionSpec(
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    )
    router = RouterSpec(cfg.num_experts_per_tok, renormalize=True)
    spec = DecoderSpec(attention, router, ring_windows=cfg.ring_windows)
    rope = RopeTables.build(
        cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, device, cfg.yarn
    )
    return MoEDecoder(cfg, spec, replace(weights, layers=layers), backend, rope, prefetcher)


def demo(vocab_size: int) -> dict[str, Any]:
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "sliding_window": 32,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "attention_bias": True,
        "swiglu_limit": 7.0,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "float32",
    }


@dataclass(frozen=True)
class GptOssFamily:
    model_type: str = "gpt_oss"
    architectures: tuple[str, ...] = ("GptOssForCausalLM",)

    def parse(self, r: ConfigReader) -> GptOssConfig:
        return parse(r)

    def spec(self, cfg: GptOssConfig, present: frozenset) -> CheckpointSpec:
        return spec(cfg, present)

    def build(self, cfg: GptOssConfig, *args: Any) -> DecoderModel:
        return build(cfg, *args)

    def demo_config(self, vocab_size: int) -> dict[str, Any]:
        return demo(vocab_size)


FAMILY = GptOssFamily()
