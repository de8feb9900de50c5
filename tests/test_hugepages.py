"""Tier 1: weight buffers on transparent huge pages (`experts/hugepages.py`), where Linux gives
them to memory marked for them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from offload_rt.experts import hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def mapped(t: torch.Tensor) -> tuple[int, int]:
    """Bytes of t's memory on huge pages, and bytes in mappings marked for them (VmFlags
    `hg`), over the mappings that overlap t."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    huge = marked = 0
    inside, size = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            start, end = (int(a, 16) for a in first.split("-"))
            inside, size = start < hi and lo < end, min(end, hi) - max(start, lo)
        elif inside and first == "AnonHugePages:":
            huge += int(line.split()[1]) * 1024
        elif inside and first == "VmFlags:" and "hg" in line.split()[1:]:
            marked += size
    return huge, marked


def test_buffers_are_plain_tensors_and_copies_equal():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(1536, 1024, generator=gen)
    moved = hugepages.copy(t)
    assert moved.data_ptr() != t.data_ptr() and torch.equal(moved, t) and moved.is_contiguous()
    small = torch.randn(4, 4, generator=gen)
    assert hugepages.copy(small) is small  # below MIN_BYTES: left as it is
    for shape in ((3, 5 << 20), (3, 12 << 20)):  # one expert's buffer; a pool (aligned)
        codes = hugepages.empty(shape, torch.uint8)
        assert codes.shape == shape and codes.dtype == torch.uint8
        codes.fill_(7)
        assert int(codes[2, -1]) == 7
    assert codes.data_ptr() % hugepages.HUGE == 0


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="no transparent huge pages here",
)
def test_buffers_sit_on_huge_pages():
    # memory an earlier tensor touched and freed, which malloc would hand back on small pages
    for _ in range(3):
        torch.empty(9 << 20, dtype=torch.uint8).fill_(0)
    # 40 MiB: padded and aligned, all of it marked; 9 MiB: the huge pages wholly inside it,
    # at least 3 wherever the mapping starts (4 when it starts within 1 MiB past a boundary)
    for nbytes, whole in ((40 << 20, 40 << 20), (9 << 20, 6 << 20)):
        buf = hugepages.empty((nbytes,), torch.uint8)
        assert mapped(buf)[1] >= whole  # marked before the first touch
        buf.fill_(1)  # the first touch faults the pages in
        huge = mapped(buf)[0]
        # at least half: a fragmented machine may fall back to small pages for some of them
        assert huge >= whole // 2, (nbytes, huge)
