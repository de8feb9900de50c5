"""Compute on a miss: serve a missing expert by copying it to the device, or by running it on
the CPU from the host tier, whichever the measured rates say finishes first.

A copy costs the link's wait (loads ahead of it, then bytes / bandwidth) and then the device's
compute; the CPU costs its own compute: about bytes / host memory bandwidth at a few rows,
growing with rows × flops / CPU throughput. Both CPU terms are measured once, on the first
miss considered, by timing the expert FFN on the missing expert's own host buffer at 1 and at
`CALIBRATION_ROWS` rows. A GPU's compute is taken as free beside a copy (microseconds against
milliseconds), and the CPU's queue counts: the experts of the call already given to it (a
fixed CPU set's, earlier misses) run first. On a CPU device the "device" is this CPU: the
same compute follows either choice, so the CPU wins whenever the link has any wait at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from offload_rt.experts.store import ExpertStore
from offload_rt.experts.transport import Transport
from offload_rt.model.ffn import ExpertFFN
from offload_rt.model.moe import ExpertKey

CALIBRATION_ROWS = 16  # enough rows to see the per-row cost past the weight-reading cost
CALIBRATION_REPEATS = 3  # best of: the first run also warms the CPU's caches and BLAS


@dataclass
class MissCost:
    device_is_host: bool  # a CPU device: the copy's compute costs what the CPU's would
    host_fixed_s: float | None = None  # CPU seconds of one expert at 1 row (None: unmeasured)
    host_row_s: float = 0.0  # CPU seconds per row beyond the first

    def prefer_host(
        self,
        rows: int,
        link_wait_s: float | None,
        weights: Callable[[], ExpertFFN],
        ahead_rows: Sequence[int] = (),
    ) -> bool:
        """True when computing `rows` rows on the CPU, after the experts of `ahead_rows` rows
        already given to it, beats a copy that would finish in `link_wait_s` (None: the
        link's speed is not known yet, so copy and learn it). `weights` gives the expert's
        host FFN, for the one-time calibration."""
        if link_wait_s is None:
            return False
        if self.device_is_host:
            return link_wait_s > 0.0
        if self.host_fixed_s is None:
            self.calibrate(weights())
        ahead = sum(self.host_seconds(n) for n in ahead_rows)
        return ahead + self.host_seconds(rows) < link_wait_s

    def host_seconds(self, rows: int) -> float:
        if self.host_fixed_s is None:
            raise RuntimeError("the CPU's expert throughput has not been measured yet")
        return self.host_fixed_s + (rows - 1) * self.host_row_s

    def calibrate(self, ffn: ExpertFFN) -> None:
        """Time the expert FFN on the CPU on these weights."""
        one = cycle_seconds([ffn], 1)
        many = cycle_seconds([ffn], CALIBRATION_ROWS)
        self.host_fixed_s = one
        self.host_row_s = max(0.0, (many - one) / (CALIBRATION_ROWS - 1))


class MissPlanner:
    """Per missing expert of a layer call: its host weights to run on the CPU, or None to
    wait for its copy (`MissCost` on the transport's estimate of when the copy ends)."""

    def __init__(self, store: ExpertStore, transport: Transport, cost: MissCost) -> None:
        self.store = store
        self.transport = transport
        self.cost = cost
        self.host_computed = 0  # missing experts run on the CPU instead of loaded

    def choose(
        self,
        key: ExpertKey,
        rows: int,
        load: Future | None,
        copies_ahead: int = 0,
        ahead_rows: Sequence[int] = (),
    ) -> ExpertFFN | None:
        """The expert's host weights when computing it on the CPU beats waiting for its copy
        (`load` in flight, or a new one queued after `copies_ahead` more), the CPU having
        experts of `ahead_rows` rows to compute first; None to copy."""
        weights = self.store.host_weights(key)
        if weights is None:
            return None
        wait = self.transport.eta(load, nbytes=(copies_ahead + 1) * self.store.nbytes)
        prefer = self.cost.prefer_host(rows, wait, lambda: weights, ahead_rows)
        return weights if prefer else None

    def run(self, x: torch.Tensor, ffn: ExpertFFN) -> torch.Tensor:
        """The expert on the CPU: x (n, D) from the device and back."""
        self.host_computed += 1
        return ffn(x.to("cpu")).to(x.device)


def cycle_seconds(
    ffns: list[ExpertFFN], rows: int = 1, repeats: int = CALIBRATION_REPEATS
) -> float:
    """Seconds per expert of `ffns` run in turn on `rows` random rows, on their weights'
    device, best of `repeats` passes (the first also compiles and warms; synchronised on
    CUDA). The experts' FFNs may share scratch (quantized ones): each runs before the next."""
    w13 = ffns[0].w13
    x = torch.randn(rows, w13.shape[1], dtype=w13.dtype, device=w13.device)  # (rows, D)
    cuda = x.device.type == "cuda"
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            for ffn in ffns:
                ffn(x)
            if cuda:
                torch.cuda.synchronize(x.device)
            best = min(best, (time.perf_counter() - start) / len(ffns))
    return best
