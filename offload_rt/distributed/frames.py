"""A layer call's groups as Ray arguments: wire messages (`wire.py`) packed straight from the
groups, cut into `bytes` frames, and decoded back into groups.

Ray passes a `bytes` argument or return value as it is, where it pickles any other type; and
one under its inline limit (max_direct_call_object_size, 100 KiB by default) rides inside the
call's RPC, where a larger one goes through the object store (several milliseconds a trip on
the 3-node test cluster). So the backend cuts each request into frames under that limit, one
argument each, and the actor answers in as many frames. Each group's bytes are copied once,
from the tensor into its frame, in the memory order the tensor has: the experts' outputs of
4+ rows are transposed views, sent as such (the header's `transposed`) rather than copied
into row order first, and decoded into the same kind of view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import torch

from offload_rt.distributed.wire import (
    Buffer,
    WireError,
    check_groups,
    group_fields,
    is_uint,
    pack_header,
    payload_tensor,
    read_header,
    split_payload,
)
from offload_rt.dtypes import DTYPE_NAMES, DTYPES
from offload_rt.model.moe import ExpertKey


@dataclass(eq=False, slots=True)
class Packed:
    """One message as a gather list: the msgpack header, then each group's bytes."""

    buffers: list  # the header (bytes), then each group's C-contiguous numpy array
    nbytes: int  # the message's length

    def frames(self, n: int) -> list[bytes]:
        """The message cut into `n` consecutive frames of near-equal size (at most
        ceil(nbytes / n) each; the last ones empty when n exceeds the bytes)."""
        if n == 1:
            return [b"".join(self.buffers)]
        size = -(-self.nbytes // n)
        out: list[bytes] = []
        pieces: list[memoryview] = []
        room = size
        for buf in map(_flat_bytes, self.buffers):
            while len(buf) > room and len(out) < n - 1:
                pieces.append(buf[:room])
                buf = buf[room:]
                out.append(b"".join(pieces))
                pieces, room = [], size
            pieces.append(buf)
            room -= len(buf)
        out.append(b"".join(pieces))
        return out + [b""] * (n - len(out))


def pack_groups(kind: str, groups: Mapping[ExpertKey, torch.Tensor]) -> Packed:
    """The message of a layer call's groups (each (n, D), one layer), experts ascending, not
    yet copied: the hot path of every layer call, in the coordinator and in the actors."""
    if kind not in ("request", "response"):
        raise WireError(f"kind must be 'request' or 'response', got {kind!r}")
    if not groups:
        raise WireError("no expert groups to join: a message needs at least one expert")
    keys = sorted(groups)
    layer = keys[0].layer
    if keys[-1].layer != layer:
        layers = sorted({k.layer for k in keys})
        raise WireError(f"expert groups span layers {layers}; a message carries one layer")
    parts = [groups[k] for k in keys]
    dtype, width = parts[0].dtype, parts[0].shape[-1]
    name = DTYPE_NAMES.get(dtype)
    if name is None or any(t.dtype != dtype or t.dim() != 2 or t.shape[1] != width for t in parts):
        _refuse(parts)
    counts = [t.shape[0] for t in parts]
    experts = [k.expert for k in keys]
    if not (is_uint(layer) and all(map(is_uint, experts))):
        check_groups(layer, experts, counts, [sum(counts), width])  # raises, naming the value
    arrays, transposed = zip(*map(_in_memory_order, parts))
    header = pack_header(kind, layer, experts, counts, list(transposed), name, width)
    return Packed([header, *arrays], len(header) + sum(counts) * width * dtype.itemsize)


def encode_groups(kind: str, groups: Mapping[ExpertKey, torch.Tensor]) -> bytes:
    """`pack_groups` as one bytes object."""
    return pack_groups(kind, groups).frames(1)[0]


def decode_groups(kind: str, frames: Sequence[Buffer]) -> dict[ExpertKey, torch.Tensor]:
    """A request's or response's groups, from the message in one or more consecutive frames:
    expert -> (n, D), views into one tensor that owns its memory (transposed views where the
    group was sent transposed)."""
    header, payload = read_header(frames)
    if header["kind"] != kind:
        raise WireError(f"expected kind {kind!r}, got {header['kind']!r}")
    layer, experts, counts, transposed, shape = group_fields(header)
    parts = split_payload(payload_tensor(header, payload, shape), counts, transposed)
    return {ExpertKey(layer, e): part for e, part in zip(experts, parts)}


def _refuse(parts: list[torch.Tensor]) -> NoReturn:
    """The error for groups that one message cannot hold: mixed or unsupported dtypes, shapes
    other than (n, D) of one D."""
    dtypes = sorted({str(t.dtype) for t in parts})
    if len(dtypes) != 1 or parts[0].dtype not in DTYPE_NAMES:
        raise WireError(f"groups of dtypes {dtypes}: one of {list(DTYPES)}")
    raise WireError(f"groups must be (n, D) of one D, got {[list(t.shape) for t in parts]}")


def _in_memory_order(t: torch.Tensor) -> tuple[np.ndarray, bool]:
    """t (n, D) as a C-contiguous numpy array of its bytes, and whether that array is t's
    transpose (D, n); a copy only when t is neither row- nor column-major."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16: its bits travel as int16
    try:
        a = t.numpy()
    except (RuntimeError, TypeError):  # t needs grad, or lives on a device
        a = t.detach().cpu().numpy()
    if a.flags.c_contiguous:
        return a, False
    if a.flags.f_contiguous:
        return a.T, True
    return np.ascontiguousarray(a), False


def _flat_bytes(buf: bytes | np.ndarray) -> memoryview:
    """A flat byte view of a gather-list entry, for cutting it into frames."""
    if isinstance(buf, np.ndarray):
        return memoryview(buf.reshape(-1).view(np.uint8))
    return memoryview(buf)
