"""The original release's `params.json` -> a Hugging Face `config.json` for Mixtral.

The torrent's params.json reads
`{"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
"n_kv_heads": 8, "norm_eps": 1e-05, "vocab_size": 32000, "moe": {"num_experts_per_tok": 2,
"num_experts": 8}}`: no rope_theta and no context length, which the model card gives (1e6 and
32k, the "32kseqlen" of the release) and the defaults below fill in. Later releases add
`rope_theta`. A field not listed here is an error: silently dropping one could change the math.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offload_rt.config import ConfigError, read_json_object
from offload_rt.models import parse_config


class ConvertError(ValueError):
    """An original-format checkpoint that cannot be converted; names the file and field."""


# the Mixtral 8x7B release was trained with these; its params.json leaves them out
DEFAULT_ROPE_THETA = 1e6
DEFAULT_MAX_POSITIONS = 32768
_REQUIRED = {  # params.json field -> config.json field
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "hidden_dim": "intermediate_size",
    "n_heads": "num_attention_heads",
    "vocab_size": "vocab_size",
}
_OPTIONAL = {
    "head_dim": "head_dim",  # default: dim / n_heads
    "n_kv_heads": "num_key_value_heads",  # default: n_heads (no grouped-query attention)
    "max_seq_len": "max_position_embeddings",  # default: DEFAULT_MAX_POSITIONS
    "sliding_window": "sliding_window",  # default: none, full causal attention
}
_MOE = {"num_experts": "num_local_experts", "num_experts_per_tok": "num_experts_per_tok"}
_FLOATS = {"norm_eps": "rms_norm_eps", "rope_theta": "rope_theta"}
# fields of mistral's reference code that describe its serving, not the model
_IGNORED = {"max_batch_size"}
KNOWN_FIELDS = frozenset({*_REQUIRED, *_OPTIONAL, *_FLOATS, "moe", *_IGNORED})


def read_params(path: Path) -> dict[str, Any]:
    missing = "no params.json (the original release's model description)"
    return read_json_object(path, missing, ConvertError)


def config_from_params(
    params: dict[str, Any],
    source: Path,
    bos_token_id: int | None,
    eos_token_id: int | None,
    dtype: str,
) -> dict[str, Any]:
    """The config.json of the converted checkpoint; every error names the params.json field."""
    unknown = sorted(set(params) - KNOWN_FIELDS)
    if unknown:
        raise ConvertError(
            f"{source}: unknown fields {unknown}; known: {sorted(KNOWN_FIELDS)}. The converter "
            "does not guess what they change in the model"
        )
    config: dict[str, Any] = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
    for name, hf in _REQUIRED.items():
        config[hf] = _int(params, name, source, required=True)
    for name, hf in _OPTIONAL.items():
        value = _int(params, name, source, required=False)
        if value is not None:
            config[hf] = value
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("max_position_embeddings", DEFAULT_MAX_POSITIONS)
    config.setdefault("sliding_window", None)
    config.update(_moe(params, source))
    config["rms_norm_eps"] = _float(params, "norm_eps", source, default=None)
    config["rope_theta"] = _float(params, "rope_theta", source, default=DEFAULT_ROPE_THETA)
    config.update(
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        # transformers >= 5 reads "dtype", older releases "torch_dtype"
        dtype=dtype,
        torch_dtype=dtype,
    )
    try:
        parse_config(config, source=f"{source} (converted)")
    except ConfigError as e:
        raise ConvertError(str(e)) from e
    return config


def _moe(params: dict[str, Any], source: Path) -> dict[str, int]:
    moe = params.get("moe")
    if not isinstance(moe, dict):
        raise ConvertError(
            f"{source}: field 'moe' must be an object with num_experts and num_experts_per_tok, "
            f"got {moe!r}: without it this is not a mixture-of-experts model"
        )
    unknown = sorted(set(moe) - set(_MOE))
    if unknown:
        raise ConvertError(f"{source}: unknown fields in 'moe': {unknown}; known: {sorted(_MOE)}")
    where = Path(f"{source} moe")
    return {hf: _int(moe, name, where, required=True) for name, hf in _MOE.items()}


def _int(d: dict[str, Any], name: str, source: Path, required: bool) -> int | None:
    v = d.get(name)
    if v is None:
        if required:
            raise ConvertError(f"{source}: missing field {name!r}")
        return None
    # some releases write sliding_window as a string
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConvertError(f"{source}: field {name!r} must be a positive integer, got {v!r}")
    return v


def _float(d: dict[str, Any], name: str, source: Path, default: float | None) -> float:
    v = d.get(name, default)
    if v is None:
        raise ConvertError(f"{source}: missing field {name!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ConvertError(f"{source}: field {name!r} must be a positive number, got {v!r}")
    return float(v)
