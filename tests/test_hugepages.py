"""Tier 1: weight buffers on transparent huge pages (`experts/hugepages.py`), where Linux gives
them to memory marked for them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from offload_rt.experts import hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_bytes(t: torch.Tensor) -> int:
    """Bytes on huge pages in the mappings that overlap t's memory."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            start, end = (int(a, 16) for a in first.split("-"))
            inside = start < hi and lo < end
        elif inside and first == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


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
    # at least half: a fragmented machine may fall back to small pages for some of them
    for nbytes, least in ((40 << 20, 20 << 20), (9 << 20, 2 << 20)):  # padded; marked inside
        buf = hugepages.empty((nbytes,), torch.uint8)
        buf.fill_(1)  # the first touch faults the pages in
        assert huge_bytes(buf) >= least
