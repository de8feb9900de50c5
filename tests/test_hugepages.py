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
    """Bytes of the mapping holding t's first element that sit on huge pages."""
    address, found = t.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            start, end = (int(a, 16) for a in first.split("-"))
            found = start <= address < end
        elif found and first == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return 0


def test_buffers_are_plain_tensors_and_copies_equal():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(1536, 1024, generator=gen)
    moved = hugepages.copy(t)
    assert moved.data_ptr() != t.data_ptr() and torch.equal(moved, t) and moved.is_contiguous()
    small = torch.randn(4, 4, generator=gen)
    assert hugepages.copy(small) is small  # below MIN_BYTES: left as it is
    codes = hugepages.empty((3, 5 << 20), torch.uint8)
    assert codes.shape == (3, 5 << 20) and codes.dtype == torch.uint8
    codes.fill_(7)
    assert int(codes[2, -1]) == 7 and codes.data_ptr() % hugepages.HUGE == 0


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="no transparent huge pages here",
)
def test_buffers_sit_on_huge_pages():
    buf = hugepages.empty((16 << 20,), torch.uint8)
    buf.fill_(1)  # the first touch faults the pages in
    assert huge_bytes(buf) >= 8 << 20
