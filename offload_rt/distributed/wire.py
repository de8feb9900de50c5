"""Wire schema shared by the coordinator and the expert actors.

One message is a msgpack header followed by a tensor's raw bytes, as Petals does: msgpack for
the structure, no pickling, and the element bytes copied as they are, so bfloat16 travels
without a detour through numpy dtypes. The header is a map:

    version  int               WIRE_VERSION; any other value is refused
    kind     str               "request" | "response"
    layer    int               decoder layer
    experts  [int, ...]        expert ids within the layer, one group each
    counts   [int, ...]        tokens in each group; they sum to shape[0]
    transposed [bool, ...]     per group: its bytes hold the group's transpose
    dtype    str               "float32" | "bfloat16" | "float16"
    shape    [int, int]        (N, D)

The payload holds the groups one after another in `experts` order, counts[i] * D elements
each: group i's (counts[i], D) matrix row by row, or where transposed[i] its (D, counts[i])
transpose row by row. So a group travels in the memory order it has (the experts' outputs of
4+ rows are transposed views, `model.layers.linear`) without a transposing copy, and comes
back as the same kind of view. Decoding treats the bytes as untrusted: sizes are bounded
before anything is allocated, and every inconsistency raises `WireError` naming what is wrong.
The codec, straight from a layer call's groups to Ray frames and back, is `frames.py`; this
module holds the schema's header and its checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import torch

from offload_rt.dtypes import DTYPES

WIRE_VERSION = 2  # 2: the `transposed` field
MAX_HEADER_BYTES = 64 * 1024  # a header of 4096 experts is under 40 KiB
HEADER_STEP = 1024  # bytes of a message the decoder reads at a time until the header ends
MAX_GROUPS = 4096  # experts in one message; far above any MoE's experts per layer
MAX_DIM_SIZE = 2**40  # one dimension; bounds the arithmetic on declared shapes
_KINDS = ("request", "response")
_INCOMPLETE = object()  # a header that goes on past the bytes seen so far


class WireError(ValueError):
    """Bytes that are not a valid message of this wire version, or a message that cannot be sent."""


def pack_header(
    kind: str,
    layer: int,
    experts: list[int],
    counts: list[int],
    transposed: list[bool],
    dtype: str,
    width: int,
) -> bytes:
    """A request's or response's header (the fields checked by the caller)."""
    return msgpack.packb(
        {
            "version": WIRE_VERSION,
            "kind": kind,
            "layer": layer,
            "experts": experts,
            "counts": counts,
            "transposed": transposed,
            "dtype": dtype,
            "shape": [sum(counts), width],
        }
    )


Buffer = bytes | bytearray | memoryview


def read_header(frames: Sequence[Buffer]) -> tuple[dict[str, Any], list[memoryview]]:
    """Frames of one message -> (checked header, payload views in order)."""
    views = [memoryview(f).cast("B") for f in frames]
    unpacker = msgpack.Unpacker(
        raw=False,
        max_buffer_size=MAX_HEADER_BYTES,
        max_str_len=64,
        max_bin_len=0,
        max_ext_len=0,
        max_array_len=MAX_GROUPS,
        max_map_len=16,
    )
    start = 0  # offset of views[i] in the message
    for i, view in enumerate(views):
        header = _unpack_header(unpacker, view, start)
        if header is not _INCOMPLETE:
            _check_header(header)
            return header, [view[unpacker.tell() - start :], *views[i + 1 :]]
        start += len(view)
    raise WireError(f"header truncated or over {MAX_HEADER_BYTES} bytes (message is {start} bytes)")


def _unpack_header(unpacker: msgpack.Unpacker, view: memoryview, start: int) -> Any:
    """Feeds the frame at message offset `start` to the unpacker a step at a time (it copies
    what it is fed; a header is ~100 bytes); the header once complete, else _INCOMPLETE."""
    for at in range(0, min(len(view), MAX_HEADER_BYTES - start), HEADER_STEP):
        unpacker.feed(view[at : min(at + HEADER_STEP, MAX_HEADER_BYTES - start)])
        try:
            return unpacker.unpack()
        except msgpack.OutOfData:
            continue  # the header goes on further
        except (msgpack.UnpackException, ValueError, TypeError) as e:
            raise WireError(f"header is not valid msgpack within the wire's bounds: {e}") from None
    return _INCOMPLETE


def _check_header(header: Any) -> None:
    if not isinstance(header, dict):
        raise WireError(f"header must be a map, got {type(header).__name__}")
    if "version" not in header:
        raise WireError(f"header has no 'version' field (keys {sorted(map(str, header))})")
    version = header["version"]
    if type(version) is not int or version != WIRE_VERSION:
        raise WireError(
            f"wire version {version!r} is not supported; this runtime speaks {WIRE_VERSION}"
        )
    if header.get("kind") not in _KINDS:
        raise WireError(f"header kind {header.get('kind')!r} is not one of {list(_KINDS)}")


def group_fields(header: dict[str, Any]) -> tuple[int, list[int], list[int], list, list[int]]:
    """(layer, experts, counts, transposed, shape) of a request or response header, checked."""
    layer = _field(header, "layer")
    if not is_uint(layer):
        raise WireError(f"layer must be a non-negative integer, got {layer!r}")
    experts = _int_list(header, "experts")
    counts = _int_list(header, "counts")
    transposed = _field(header, "transposed")
    if type(transposed) is not list or not all(type(t) is bool for t in transposed):
        raise WireError(f"transposed must be a list of booleans, got {transposed!r}")
    if len(transposed) != len(counts):
        raise WireError(f"{len(counts)} groups but {len(transposed)} transposed flags")
    shape = _int_list(header, "shape")
    _check_structure(experts, counts, shape)
    return layer, experts, counts, transposed, shape


def split_payload(
    tensor: torch.Tensor, counts: list[int], transposed: list[bool]
) -> tuple[torch.Tensor, ...]:
    """The decoded (N, D) payload -> one (counts[i], D) view per group, a transposed one where
    the group's bytes are its transpose."""
    if not any(transposed):
        return tensor.split_with_sizes(counts) if len(counts) > 1 else (tensor,)
    width = tensor.shape[1]
    flat = tensor.view(-1).split_with_sizes([n * width for n in counts])
    return tuple(
        f.view(width, n).t() if t else f.view(n, width) for f, n, t in zip(flat, counts, transposed)
    )


def check_groups(layer: Any, experts: list, counts: list, shape: list) -> None:
    if not is_uint(layer):
        raise WireError(f"layer must be a non-negative integer, got {layer!r}")
    for name, values in (("experts", experts), ("counts", counts)):
        bad = [v for v in values if not is_uint(v)]
        if bad:
            raise WireError(f"{name} must be non-negative integers, got {bad[0]!r} in {values}")
    _check_structure(experts, counts, shape)


def _check_structure(experts: list[int], counts: list[int], shape: list[int]) -> None:
    if len(set(experts)) != len(experts):
        raise WireError(f"expert ids repeat: {experts}")
    if len(experts) != len(counts):
        raise WireError(f"{len(experts)} experts but {len(counts)} counts ({experts}, {counts})")
    if len(shape) != 2:
        raise WireError(f"expert tensor must be (N, D), got shape {shape}")
    if sum(counts) != shape[0]:
        raise WireError(f"counts {counts} sum to {sum(counts)}, but the tensor has {shape[0]} rows")


def payload_tensor(
    header: dict[str, Any], payload: list[memoryview], shape: list[int]
) -> torch.Tensor:
    """The tensor of the header's dtype and `shape` (its checked list of sizes), from the
    payload's bytes (one view per frame)."""
    name = _field(header, "dtype")
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise WireError(f"dtype {name!r} is not one of {list(DTYPES)}")
    if any(d > MAX_DIM_SIZE for d in shape):
        raise WireError(f"shape {shape}: sizes of at most {MAX_DIM_SIZE} each")
    numel = 1
    for d in shape:
        numel *= d
    need = numel * dtype.itemsize
    got = sum(len(v) for v in payload)
    if got != need:
        what = "truncated" if got < need else "oversized"
        raise WireError(f"payload {what}: {got} bytes, but shape {shape} of {name} needs {need}")
    if need == 0:
        return torch.empty(shape, dtype=dtype)
    # one copy: the result owns aligned, writable memory, never a view of the caller's buffers
    data = bytearray(payload[0]) if len(payload) == 1 else bytearray().join(payload)
    return torch.frombuffer(data, dtype=dtype).view(shape)


def _field(header: dict[str, Any], name: str) -> Any:
    if name not in header:
        raise WireError(f"{header['kind']} header has no {name!r} field")
    return header[name]


def _int_list(header: dict[str, Any], name: str) -> list[int]:
    value = _field(header, name)
    if type(value) is not list or not all(map(is_uint, value)):
        raise WireError(f"{name} must be a list of non-negative integers, got {value!r}")
    return value


def is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
