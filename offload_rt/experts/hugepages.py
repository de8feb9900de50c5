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

import contextlib
import mmap
import sys

import torch

HUGE = 2 << 20  # bytes of a huge page on x86-64 and most arm64 kernels
MIN_BYTES = 2 * HUGE  # smaller buffers: plain allocations
PAD_FROM = 16 * HUGE  # buffers this large are padded to start on a huge page (1/16 at most)
_MARKS = sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory is marked for huge pages (untouched, so its
    first writes fault huge pages in); a plain `torch.empty` where that does not apply.
    The memory is a fresh private anonymous mapping of its own, never memory that malloc hands
    back after an earlier tensor touched it (Linux does not move touched small pages to huge
    ones until khugepaged comes by). Buffers of `PAD_FROM` bytes or more are over-allocated by
    a huge page and aligned to one, so every byte can sit on huge pages; smaller ones (one
    expert of a host tier) mark the aligned huge pages inside them, to spare a 2 MiB pad
    each."""
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * dtype.itemsize
    if not _MARKS or nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    pad = HUGE if nbytes >= PAD_FROM else 0
    try:
        mapping = mmap.mmap(-1, nbytes + pad, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping while it lives
    base = raw.data_ptr()
    skip = -base % HUGE if pad else 0
    first = base + skip + (-(base + skip) % HUGE)  # the huge pages wholly inside the buffer
    last = (base + skip + nbytes) // HUGE * HUGE
    # refused (THP off, an old kernel): the same buffer on small pages
    if last > first:
        with contextlib.suppress(OSError):
            mapping.madvise(mmap.MADV_HUGEPAGE, first - base, last - first)
    return raw[skip : skip + nbytes].view(dtype).view(shape)


def copy(t: torch.Tensor) -> torch.Tensor:
    """A large CPU tensor moved into huge-page memory (a copy); others as they are."""
    if t.device.type != "cpu" or t.numel() * t.element_size() < MIN_BYTES:
        return t
    out = empty(t.shape, t.dtype)
    out.copy_(t)
    return out
