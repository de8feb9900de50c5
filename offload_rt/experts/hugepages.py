"""Large CPU buffers on transparent huge pages (2 MiB), where Linux offers them.

A batch-1 decode step streams every weight it uses once; on 4 KiB pages that is a TLB miss
every 4 KiB, which costs an int8 expert's product a fifth of its speed on this project's
machine (w13 (5632, 1024): 255 µs on 4 KiB pages, 206-213 on huge pages; llama.cpp's weights
sit in the page cache, which the kernel backs with huge pages where it can). Linux hands out
huge pages to memory marked `MADV_HUGEPAGE` when its THP mode is `madvise` (the default of
most distributions) or `always`; torch's own allocator does so only with
`THP_MEM_ALLOC_ENABLE=1` set before torch is imported, which a library cannot rely on. So the
buffers that hold weights (the expert pool, the CPU set's and the host tier's experts, the
dense weights on a CPU) are allocated here and marked before their first touch: a buffer of
`PAD_FROM` bytes or more (the pool) over-allocated by 2 MiB and aligned, so all of it can be
huge, a smaller one (one expert) only for the huge pages wholly inside it. Elsewhere (not
Linux, THP off, a failed call) they are plain torch buffers.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

HUGE = 2 << 20  # bytes of a huge page on x86-64 and most arm64 kernels
MIN_BYTES = 2 * HUGE  # smaller buffers: plain allocations
PAD_FROM = 16 * HUGE  # buffers this large are padded to start on a huge page (1/16 at most)
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory is marked for huge pages (untouched, so its
    first writes fault huge pages in); a plain `torch.empty` where that does not apply.
    Buffers of `PAD_FROM` bytes or more are over-allocated by a huge page and aligned to one,
    so every byte can sit on huge pages; smaller ones (one expert of a host tier) mark the
    aligned huge pages inside them, to spare a 2 MiB pad each."""
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * dtype.itemsize
    madvise = _madvise()
    if madvise is None or nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    pad = HUGE if nbytes >= PAD_FROM else 0
    raw = torch.empty(nbytes + pad, dtype=torch.uint8)
    skip = -raw.data_ptr() % HUGE if pad else 0
    start = raw.data_ptr() + skip
    first = start + (-start % HUGE)  # the huge pages wholly inside the buffer
    last = (raw.data_ptr() + skip + nbytes) // HUGE * HUGE
    if last > first and madvise(first, last - first, _MADV_HUGEPAGE) != 0 and pad:
        skip = 0  # refused (THP off, an old kernel): the plain buffer serves
    return raw[skip : skip + nbytes].view(dtype).view(shape)


def copy(t: torch.Tensor) -> torch.Tensor:
    """A large CPU tensor moved into huge-page memory (a copy); others as they are."""
    if t.device.type != "cpu" or t.numel() * t.element_size() < MIN_BYTES:
        return t
    out = empty(t.shape, t.dtype)
    out.copy_(t)
    return out
