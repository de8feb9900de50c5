"""Model families: one module each, and this registry by config.json's `model_type` (or its
`architectures`). Adding a family is its module plus one entry in `_REGISTERED`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from offload_rt.checkpoint import (
    CONFIG_FILE,
    FP8,
    Checkpoint,
    CheckpointError,
    CheckpointSpec,
    dequantize_blocks,
)
from offload_rt.config import ConfigError, ConfigReader, ModelConfig, read_json_object
from offload_rt.model import DecoderModel, ExpertBackend, ExpertPrefetcher
from offload_rt.models import deepseek, glm4_moe, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from offload_rt.models.family import Family

_REGISTERED: tuple[Family, ...] = (
    mixtral.FAMILY,
    qwen3_moe.FAMILY,
    qwen2_moe.FAMILY,
    olmoe.FAMILY,
    gpt_oss.FAMILY,
    glm4_moe.FAMILY,
    deepseek.V3,
    deepseek.V2,
)
FAMILIES: dict[str, Family] = {f.model_type: f for f in _REGISTERED}


def family_of(raw: dict[str, Any], source: str = CONFIG_FILE) -> Family:
    """The family of a config.json: by model_type, or by architectures when it has none (an
    unknown model_type is refused even beside a known architecture: it says another model)."""
    model_type = raw.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    architectures = raw.get("architectures") or []
    for arch in architectures if model_type is None and isinstance(architectures, list) else []:
        for family in _REGISTERED:
            if arch in family.architectures:
                return family
    raise ConfigError(f"{source}: unknown model_type {model_type!r}; supported: {sorted(FAMILIES)}")


def parse_config(raw: dict[str, Any], source: str = CONFIG_FILE) -> ModelConfig:
    """config.json (as a dict) -> its family's config; errors name the file and field."""
    family = family_of(raw, source)
    return family.parse(ConfigReader({**raw, "model_type": family.model_type}, source))


def read_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / CONFIG_FILE
    return parse_config(read_json_object(path, "no config.json in the model folder", ConfigError))


def _spec(raw: dict, source: str, present: frozenset) -> CheckpointSpec:
    family = family_of(raw, source)
    return family.spec(parse_config(raw, source), present)


def open_checkpoint(folder: str | Path) -> Checkpoint:
    """Open and validate a checkpoint of any registered family (headers only)."""
    return Checkpoint.open(folder, _spec)


def build_model(
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    backend: ExpertBackend,
    prefetcher: ExpertPrefetcher | None = None,
) -> DecoderModel:
    """The checkpoint's decoder: dense weights read onto `device` in `dtype`, routed experts
    behind `backend`."""

    def get(name: str) -> torch.Tensor:
        t = ckpt.get(name)
        if t.dtype == FP8:  # DeepSeek-V3's dense fp8 weights: dequantized once, here
            quant = ckpt.config.quantization
            if quant is None or quant.scheme != "fp8":
                raise CheckpointError(f"{name}: fp8 weights need quant_method 'fp8' in config")
            t = dequantize_blocks(t, ckpt.get(name + "_scale_inv"), quant)
        return t.to(device=device, dtype=dtype)

    family = FAMILIES[ckpt.config.model_type]
    present = frozenset(ckpt.tensors)
    return family.build(ckpt.config, get, present, backend, device, prefetcher)


def dense_nbytes(ckpt: Checkpoint, dtype: torch.dtype) -> int:
    """Device bytes of the checkpoint's dense weights (all but the routed experts) in `dtype`,
    as `build_model` puts them there (fp8 weights dequantized, their scales left behind)."""
    return sum(
        _numel(shape) * dtype.itemsize
        for name, shape in ckpt.spec.dense.items()
        if not name.endswith("_scale_inv")
    )


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """What one token of one row costs the KV cache over every layer in `dtype`: a latent
    and a rotary key (DeepSeek's latent attention), else keys and values of every KV head
    (a sliding layer's ring, which holds fewer, counted in full)."""
    if isinstance(cfg, deepseek.DeepseekConfig):
        return cfg.num_hidden_layers * deepseek.kv_bytes_per_token(cfg, dtype)
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


__all__ = [
    "FAMILIES",
    "Family",
    "build_model",
    "dense_nbytes",
    "family_of",
    "kv_bytes_per_token",
    "open_checkpoint",
    "parse_config",
    "read_config",
]
