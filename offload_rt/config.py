"""Model configuration read from a Hugging Face `config.json`: the core every family shares.

Field names follow transformers' configs, so a hub checkpoint's config.json and one written by
`save_pretrained` are read as they are. Each family (`offload_rt/models/`) reads its own
fields with a `ConfigReader` and builds its subclass of `ModelConfig` with `core_fields`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from offload_rt.grid import ExpertGrid

DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANT_METHOD = "offload_rt"  # quantization_config.quant_method of `offload-rt quantize` output
QUANT_VERSION = 1  # bumped when the tensor layout of quantized experts changes
QUANT_BITS = (8, 4)
# "affine": offset + code · scale per group of G (`experts/quant.py`); "mxfp4": e2m1 codes times
# a power of two per 32 columns (`experts/mxfp4.py`), as OpenAI released GPT-OSS's experts
QUANT_SCHEMES = ("affine", "mxfp4", "fp8")
MXFP4_METHOD = "mxfp4"  # quantization_config.quant_method of the GPT-OSS release
# DeepSeek-V3's release: float8_e4m3fn weights, a float32 `weight_scale_inv` per block of
# weight_block_size (rows, columns); w = fp8 · scale
FP8_METHOD = "fp8"
MXFP4_GROUP = 32  # columns sharing one MXFP4 exponent
# MLX's and HQQ's default (GPTQ's is 128): a smaller group spans a smaller range, so a finer
# step, for 32 bits of float16 scale and offset per group: 0.5 bits per weight at 64
DEFAULT_GROUP_SIZE = 64


class ConfigError(ValueError):
    """A config.json that cannot describe a model this runtime runs."""


@dataclass(frozen=True)
class QuantConfig:
    """Group-wise quantization of the expert weights (`quantization_config` in config.json;
    `offload_rt/experts/quant.py` and `mxfp4.py` give the formats). Everything else stays float."""

    bits: int  # bits per weight code: 8, or 4 (two codes per byte)
    group_size: int  # consecutive input columns sharing one scale (and one offset: affine)
    scheme: str = "affine"  # one of QUANT_SCHEMES
    row_block: int = 1  # fp8: consecutive rows sharing one scale (weight_block_size[0])

    def __post_init__(self) -> None:
        if self.scheme not in QUANT_SCHEMES:
            raise ConfigError(
                f"quantization scheme must be one of {QUANT_SCHEMES}, got {self.scheme!r}"
            )
        if self.scheme == "mxfp4" and (self.bits, self.group_size) != (4, MXFP4_GROUP):
            raise ConfigError(
                f"mxfp4 has 4 bits and groups of {MXFP4_GROUP}, "
                f"got {self.bits} bits and groups of {self.group_size}"
            )
        if self.bits not in QUANT_BITS:
            raise ConfigError(f"quantization bits must be one of {QUANT_BITS}, got {self.bits!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 1 or (self.bits == 4 and g % 2):
            raise ConfigError(
                f"quantization group_size must be a positive integer (even for 4 bits), got {g!r}"
            )

    def codes_shape(self, rows: int, cols: int) -> tuple[int, int]:
        """Shape of the uint8 `qweight` of a (rows, cols) weight."""
        return rows, cols * self.bits // 8

    def groups_shape(self, rows: int, cols: int) -> tuple[int, int]:
        """Shape of its `scales` and `offsets` (float16; mxfp4: uint8 exponents, no offsets;
        fp8: float32 `weight_scale_inv`, a block of row_block rows and group_size columns)."""
        return rows // self.row_block, cols // self.group_size

    @property
    def group_nbytes(self) -> int:
        """Bytes of a group's scale and offset (affine: float16 each; mxfp4: one exponent;
        fp8: a float32 scale)."""
        return 1 if self.scheme == "mxfp4" else 4

    def nbytes(self, rows: int, cols: int) -> int:
        """Bytes of one quantized (rows, cols) weight: codes, scales and offsets."""
        groups = (rows // self.row_block) * (cols // self.group_size)
        return rows * cols * self.bits // 8 + self.group_nbytes * groups

    def check_widths(self, hidden: int, intermediate: int, source: str) -> None:
        """Groups split the input columns: w1, w3 have `hidden`, w2 `intermediate`; fp8's
        blocks split the rows too (an expert's blocks whole: its gate and up stack)."""
        for name, width in (("hidden_size", hidden), ("intermediate_size", intermediate)):
            if width % self.row_block:
                raise ConfigError(
                    f"{source}: weight_block_size rows {self.row_block} do not divide {name} "
                    f"{width}; expert weights must be whole blocks"
                )
            if width % self.group_size:
                raise ConfigError(
                    f"{source}: quantization group_size {self.group_size} does not divide "
                    f"{name} {width} (an expert weight's input columns); use a divisor of "
                    f"{math.gcd(hidden, intermediate)}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "version": QUANT_VERSION,
            "bits": self.bits,
            "group_size": self.group_size,
            "scheme": self.scheme,  # affine: w = offset + code * scale, per group
            "modules": "experts",  # only the expert FFN weights; the rest is float
        }

    @classmethod
    def from_dict(cls, d: Any, source: str) -> QuantConfig:
        where = f"{source} quantization_config"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: must be an object, got {d!r}")
        if d.get("quant_method") == MXFP4_METHOD:  # the GPT-OSS release's experts
            return cls(4, MXFP4_GROUP, "mxfp4")
        if d.get("quant_method") == FP8_METHOD:  # DeepSeek-V3's release
            block = d.get("weight_block_size")
            fmt = d.get("fmt", "e4m3")
            ok = isinstance(block, list) and len(block) == 2
            if not ok or not all(isinstance(b, int) and b > 0 for b in block) or fmt != "e4m3":
                raise ConfigError(
                    f"{where}: fp8 needs fmt 'e4m3' and weight_block_size [rows, columns] of "
                    f"positive integers, got fmt {fmt!r}, weight_block_size {block!r}"
                )
            return cls(8, block[1], "fp8", block[0])
        if d.get("quant_method") != QUANT_METHOD or d.get("version") != QUANT_VERSION:
            raise ConfigError(
                f"{where}: quant_method {d.get('quant_method')!r} version {d.get('version')!r} "
                f"is not supported; offload_rt reads {QUANT_METHOD!r} version {QUANT_VERSION} "
                f"(written by `offload-rt quantize`) and {MXFP4_METHOD!r} (GPT-OSS's release)"
            )
        try:
            scheme = d.get("scheme", "affine")
            return cls(d.get("bits"), d.get("group_size"), scheme)  # type: ignore[arg-type]
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e


@dataclass(frozen=True)
class YarnConfig:
    """YaRN rotary scaling (`model/rope.py`), as transformers' `_compute_yarn_parameters` reads
    it from `rope_parameters` / `rope_scaling`."""

    factor: float  # context extension factor
    original_max_position_embeddings: int  # the context the model was pretrained at
    beta_fast: float = 32.0  # rotations above which dimensions keep their frequency
    beta_slow: float = 1.0  # rotations below which dimensions are interpolated by `factor`
    truncate: bool = True  # round the ramp's ends to whole dimensions
    attention_factor: float | None = None  # cos and sin scale; None: from factor (and mscale)
    mscale: float | None = None  # DeepSeek's: the attention factor's numerator gain
    mscale_all_dim: float | None = None  # DeepSeek's: its denominator gain


@dataclass(frozen=True)
class ClampedSwiGLUConfig:
    """GPT-OSS's expert FFN (`model/ffn.py`): biases on every projection, gate clamped above
    at `limit`, up to ±limit, (up + 1) · gate · sigmoid(alpha · gate)."""

    limit: float  # swiglu_limit
    alpha: float  # swiglu_alpha


@dataclass(frozen=True)
class ModelConfig:
    """What every family shares; a family subclasses it with its own fields (with defaults)."""

    model_type: str  # config.json's model_type: names the family (`offload_rt/models/`)
    vocab_size: int  # tokens in the embedding and lm_head
    hidden_size: int  # model width D
    num_hidden_layers: int  # decoder layers, each with attention and an MoE block or dense MLP
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (grouped-query attention)
    head_dim: int  # width of one head; hidden_size / heads unless given
    experts_per_layer: int  # routed experts in each MoE layer
    num_experts_per_tok: int  # experts each token is routed to (top-k)
    moe_intermediate_size: int  # width F of one routed expert's FFN
    moe_layers: tuple[int, ...]  # decoder layers with routed experts, ascending
    rms_norm_eps: float  # epsilon inside RMSNorm
    rope_theta: float  # rotary embedding base
    max_position_embeddings: int  # context length in tokens
    sliding_window: int | None  # attention window in tokens; None: full causal attention
    tie_word_embeddings: bool  # lm_head shares the embedding matrix
    bos_token_id: int | None  # token prepended by the tokenizer, if any
    eos_token_ids: tuple[int, ...]  # tokens that end generation
    dtype: str | None  # checkpoint's dtype name ("bfloat16", ...); None: read from the tensors
    quantization: QuantConfig | None = None  # quantized experts; None: float experts
    clamped_swiglu: ClampedSwiGLUConfig | None = None  # GPT-OSS's experts; None: plain SwiGLU

    @cached_property
    def grid(self) -> ExpertGrid:
        return ExpertGrid(self.moe_layers, self.experts_per_layer)

    @property
    def expert_numel(self) -> int:
        """Parameters of one routed expert (gate, up: F x D; down: D x F)."""
        return 3 * self.moe_intermediate_size * self.hidden_size

    @property
    def num_experts_total(self) -> int:
        return len(self.moe_layers) * self.experts_per_layer


def core_fields(
    r: ConfigReader,
    experts_field: str,
    moe_intermediate_field: str,
    moe_layers: tuple[int, ...],
    sliding_window: int | None = None,
    rope_kinds: tuple[str, ...] = ("default",),
) -> dict[str, Any]:
    """The shared core of a family's config from `r`; the family names the fields that differ
    (experts per layer, expert width), says which layers are MoE and which rotary scalings it
    reads (`rope_kinds`)."""
    source = r.source
    heads = r.positive_int("num_attention_heads")
    hidden = r.positive_int("hidden_size")
    head_dim = r.optional_positive_int("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(
                f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
            )
        head_dim = hidden // heads
    kv_heads = r.positive_int("num_key_value_heads")
    if heads % kv_heads:
        raise ConfigError(
            f"{source}: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv_heads}"
        )
    experts = r.positive_int(experts_field)
    top_k = r.positive_int("num_experts_per_tok")
    if top_k > experts:
        raise ConfigError(
            f"{source}: num_experts_per_tok {top_k} exceeds {experts_field} {experts}"
        )
    layers = r.positive_int("num_hidden_layers")
    if not moe_layers or moe_layers[-1] >= layers:
        raise ConfigError(f"{source}: no MoE layer among the {layers} decoder layers")
    width = r.positive_int(moe_intermediate_field)
    return dict(
        model_type=r.d["model_type"],
        vocab_size=r.positive_int("vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        experts_per_layer=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=width,
        moe_layers=moe_layers,
        rms_norm_eps=r.positive_float("rms_norm_eps"),
        rope_theta=r.rope_theta(rope_kinds),
        max_position_embeddings=r.positive_int("max_position_embeddings"),
        sliding_window=sliding_window,
        tie_word_embeddings=r.boolean("tie_word_embeddings", default=False),
        bos_token_id=r.optional_int("bos_token_id"),
        eos_token_ids=r.token_ids("eos_token_id"),
        dtype=r.dtype_name(),
        quantization=_quantization(r.d, source, hidden, width),
    )


def read_json_object(path: Path, missing: str, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `path`; `error` naming the file when it is absent (`missing` says
    what it should be), not JSON, or not an object."""
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _quantization(d: dict[str, Any], source: str, hidden: int, width: int) -> QuantConfig | None:
    if d.get("quantization_config") is None:
        return None
    quant = QuantConfig.from_dict(d["quantization_config"], source)
    quant.check_widths(hidden, width, source)
    return quant


class ConfigReader:
    """Typed access to config fields; every error names the field and the file."""

    def __init__(self, d: dict[str, Any], source: str) -> None:
        self.d = d
        self.source = source

    def _fail(self, name: str, want: str) -> ConfigError:
        return ConfigError(f"{self.source}: field {name!r} must be {want}, got {self.d[name]!r}")

    def _require(self, name: str) -> Any:
        if name not in self.d:
            raise ConfigError(f"{self.source}: missing field {name!r}")
        return self.d[name]

    def positive_int(self, name: str) -> int:
        v = self._require(name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise self._fail(name, "a positive integer")
        return v

    def optional_positive_int(self, name: str) -> int | None:
        if self.d.get(name) is None:
            return None
        return self.positive_int(name)

    def optional_int(self, name: str) -> int | None:
        v = self.d.get(name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise self._fail(name, "a non-negative integer")
        return v

    def positive_float(self, name: str) -> float:
        v = self._require(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise self._fail(name, "a positive number")
        return float(v)

    def rope_theta(self, kinds: tuple[str, ...] = ("default",)) -> float:
        """The rotary base; the scaling (`rope_scaling`, or transformers 5's `rope_parameters`)
        must be one of `kinds` (a family that reads YaRN's fields allows "yarn")."""
        # transformers 5 nests it in rope_parameters; older configs and Mixtral's own keep it flat
        rope = self.d.get("rope_parameters")
        if rope is None:
            scaling = self.d.get("rope_scaling")
            kind = None
            if isinstance(scaling, dict):
                kind = scaling.get("rope_type", scaling.get("type"))
            if scaling is not None and kind not in kinds:
                raise ConfigError(
                    f"{self.source}: rope_scaling {scaling!r} is not supported "
                    f"(rotary embeddings of this family: {', '.join(map(repr, kinds))})"
                )
            return self.positive_float("rope_theta")
        if not isinstance(rope, dict):
            raise self._fail("rope_parameters", "an object")
        rope_type = rope.get("rope_type", "default")
        if rope_type not in kinds:
            raise ConfigError(
                f"{self.source}: rope_parameters.rope_type {rope_type!r} is not supported "
                f"(rotary embeddings of this family: {', '.join(map(repr, kinds))})"
            )
        return ConfigReader(rope, f"{self.source} rope_parameters").positive_float("rope_theta")

    def yarn(self) -> YarnConfig | None:
        """YaRN's fields from `rope_parameters` or `rope_scaling` when its type is yarn."""
        field = "rope_parameters" if self.d.get("rope_parameters") is not None else "rope_scaling"
        rope = self.d.get(field)
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) != "yarn":
            return None
        r = ConfigReader(rope, f"{self.source} {field}")
        return YarnConfig(
            factor=r.positive_float("factor"),
            original_max_position_embeddings=r.positive_int("original_max_position_embeddings"),
            beta_fast=r.optional_positive_float("beta_fast") or 32.0,
            beta_slow=r.optional_positive_float("beta_slow") or 1.0,
            truncate=r.boolean("truncate", default=True),
            attention_factor=r.optional_positive_float("attention_factor"),
            mscale=r.optional_positive_float("mscale"),
            mscale_all_dim=r.optional_positive_float("mscale_all_dim"),
        )

    def optional_positive_float(self, name: str) -> float | None:
        if self.d.get(name) is None:
            return None
        return self.positive_float(name)

    def int_list(self, name: str) -> tuple[int, ...]:
        """A list of non-negative integers; absent or null: empty."""
        v = self.d.get(name)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v
        ):
            raise self._fail(name, "a list of non-negative integers")
        return tuple(v)

    def first_present(self, *names: str) -> str:
        """The first of `names` that the config has (families name one field differently)."""
        for name in names:
            if self.d.get(name) is not None:
                return name
        raise ConfigError(f"{self.source}: missing field {names[0]!r}")

    def boolean(self, name: str, default: bool) -> bool:
        v = self.d.get(name, default)
        if not isinstance(v, bool):
            raise self._fail(name, "true or false")
        return v

    def token_ids(self, name: str) -> tuple[int, ...]:
        v = self.d.get(name)
        if v is None:
            return ()
        ids = v if isinstance(v, list) else [v]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise self._fail(name, "a token id or a list of token ids")
        return tuple(ids)

    def dtype_name(self) -> str | None:
        # transformers 5 writes "dtype", older releases "torch_dtype"
        name = "dtype" if "dtype" in self.d else "torch_dtype"
        v = self.d.get(name)
        if v is None:
            return None
        if v not in DTYPE_NAMES:
            raise self._fail(name, f"one of {DTYPE_NAMES}")
        return v
