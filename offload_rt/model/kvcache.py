"""The KV cache: keys and values of every layer for B rows, and the masks that go with it.

A full-attention layer keeps every position: row b's token at position p sits at index p, so
rows of different lengths share one tensor, and attention masks each row by its own positions,
never by padding. A sliding-window layer (GPT-OSS's every other layer) keeps only its last W
positions, in a ring: position p at slot p mod W. Every ring layer of a model holds the same
positions (each forward writes the same tokens into each), so one (B, W) table of the position
in each slot serves them all; a step attends over the ring's old keys and its own new ones
(`RingStep`), then writes the new ones into the ring.
Shape legend: B rows, T new tokens per row, S key positions, K key/value heads, Hd head width,
W window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY = -1  # ring_pos of a slot that holds no position yet


@dataclass(frozen=True)
class RingStep:
    """One forward's view of the ring layers, the same for each of them."""

    mask: torch.Tensor  # (B, 1, T, W + T): query t may see ring slot s / new token s - W
    rows: torch.Tensor  # (n,) the row of each new token written into the ring
    tokens: torch.Tensor  # (n,) its index among the T new tokens
    slots: torch.Tensor  # (n,) its ring slot


class KVCache:
    def __init__(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        windows: tuple[int | None, ...] | None = None,
        ring_pos: torch.Tensor | None = None,
    ) -> None:
        self.keys = keys  # per layer: (B, K, S, Hd), or (B, K, W, Hd) for a ring layer
        self.values = values
        self.windows = windows or (None,) * len(keys)  # per layer: W of a ring layer, or None
        self.ring_pos = ring_pos  # (B, W) position held in each ring slot; None: no ring

    @classmethod
    def allocate(
        cls,
        layers: int,
        batch: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        windows: tuple[int | None, ...] | None = None,
        value_dim: int | None = None,
    ) -> KVCache:
        """`windows`: per layer, the window W of a sliding layer kept as a ring, or None.
        `value_dim`: a value's width when not a key's (MLA's rotary keys beside latents)."""
        windows = windows or (None,) * layers
        rings = {w for w in windows if w is not None}
        if len(rings) > 1:
            raise ValueError(f"ring layers must share one window, got {sorted(rings)}")

        def tensor(w: int | None, width: int = head_dim) -> torch.Tensor:
            shape = (batch, kv_heads, max_len if w is None else w, width)
            return torch.zeros(shape, device=device, dtype=dtype)

        vd = value_dim or head_dim

        ring_pos = None
        if rings:
            ring_pos = torch.full((batch, rings.pop()), EMPTY, dtype=torch.long, device=device)
        return cls(
            [tensor(w) for w in windows], [tensor(w, vd) for w in windows], tuple(windows), ring_pos
        )

    def rows(self, n: int) -> KVCache:
        """The first n rows, as views: writes go to this cache."""
        ring = None if self.ring_pos is None else self.ring_pos[:n]
        return KVCache([k[:n] for k in self.keys], [v[:n] for v in self.values], self.windows, ring)

    def copy_rows(
        self, index: torch.Tensor, other: KVCache, pick: torch.Tensor | None = None
    ) -> None:
        """Rows `index` of this cache <- rows `pick` of `other` (default: every row, in order;
        a cache of the same layers, as long or shorter)."""
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for layer, t in zip(mine, theirs):  # (B, K, S, Hd) <- (k, K, width, Hd)
                layer[index, :, : t.shape[2]] = t if pick is None else t[pick]
        if self.ring_pos is not None and other.ring_pos is not None:
            ring = other.ring_pos
            self.ring_pos[index] = ring if pick is None else ring[pick]

    def write(
        self,
        layer: int,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int | None,
    ) -> None:
        """A full layer's k, v: (B, K, T, Hd) for the tokens at `positions` (B, T). `start`:
        when every row holds positions start .. start+T-1, one slice copy, not a scatter."""
        t = k.shape[2]
        if start is not None:
            self.keys[layer][:, :, start : start + t] = k
            self.values[layer][:, :, start : start + t] = v
            return
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
        self.keys[layer][rows, :, positions] = k.transpose(1, 2)
        self.values[layer][rows, :, positions] = v.transpose(1, 2)

    def ring_step(self, positions: torch.Tensor, live: torch.Tensor | None) -> RingStep:
        """The ring layers' mask and writes for new tokens at `positions` (B, T); `live`
        (B, T) False on padding, which is never written. Of a row's new tokens only the last
        W are written (the earlier ones would be overwritten within the step)."""
        assert self.ring_pos is not None
        w = self.ring_pos.shape[1]
        q = positions[:, :, None]  # (B, T, 1)
        old = self.ring_pos[:, None, :]  # (B, 1, W)
        see_old = (old != EMPTY) & (old < positions[:, :1, None]) & (q - old < w)
        new = positions[:, None, :]  # (B, 1, T)
        see_new = (new <= q) & (q - new < w)
        mask = torch.cat((see_old.expand(-1, q.shape[1], -1), see_new), dim=-1)[:, None]
        keep = torch.ones_like(positions, dtype=torch.bool) if live is None else live
        last = torch.where(keep, positions, EMPTY).amax(dim=1, keepdim=True)  # (B, 1)
        rows, tokens = torch.nonzero(keep & (positions > last - w), as_tuple=True)
        return RingStep(mask, rows, tokens, positions[rows, tokens] % w)

    def ring_write(self, layer: int, step: RingStep, k: torch.Tensor, v: torch.Tensor) -> None:
        """A ring layer's new k, v (B, K, T, Hd) into its slots."""
        self.keys[layer][step.rows, :, step.slots] = k[step.rows, :, step.tokens]
        self.values[layer][step.rows, :, step.slots] = v[step.rows, :, step.tokens]

    def ring_advance(self, step: RingStep, positions: torch.Tensor) -> None:
        """After every ring layer has written: record the positions now in the ring."""
        assert self.ring_pos is not None
        self.ring_pos[step.rows, step.slots] = positions[step.rows, step.tokens]


def attention_mask(
    positions: torch.Tensor, kv_len: int, sliding_window: int | None, start: int | None
) -> torch.Tensor | None:
    """A full layer's (B, 1, T, S) mask: True where the query at positions[b, t] may see key
    position s; None when it may see every key, as in a decode step of rows all at position
    kv_len - 1. `sliding_window`: a window applied by mask (Mixtral's), not by a ring."""
    t = positions.shape[1]
    window_open = sliding_window is None or kv_len <= sliding_window
    if start is not None and t == 1 and start == kv_len - 1 and window_open:
        return None
    keys = torch.arange(kv_len, device=positions.device)  # (S,)
    q = positions[:, :, None]  # (B, T, 1)
    mask = keys[None, None, :] <= q
    if sliding_window is not None:
        mask &= q - keys[None, None, :] < sliding_window
    return mask[:, None]
