"""The sharded checkpoint writer: config.json and safetensors in the Hugging Face layout, for
the offline tools (convert, quantize) and the demo checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from offload_rt.checkpoint import INDEX_FILE, SINGLE_FILE


def write_checkpoint(
    folder: str | Path,
    config: Mapping[str, object],
    tensors: Iterator[tuple[str, torch.Tensor]],
    max_shard_bytes: int | None = None,
) -> None:
    """Write config.json and safetensors in the Hugging Face layout, sharded with an index when
    `max_shard_bytes` is given. Tensors are consumed one at a time, so a caller that streams them
    never holds more than a shard in memory."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shard_names, total = 0, [], 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and max_shard_bytes is not None and shard_bytes + nbytes > max_shard_bytes:
            shard_names.append(_flush_shard(folder, shard, len(shard_names)))
            shard, shard_bytes = {}, 0
        shard[name] = tensor.contiguous()
        shard_bytes += nbytes
        total += nbytes
    if max_shard_bytes is None:
        save_file(shard, str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return
    shard_names.append(_flush_shard(folder, shard, len(shard_names)))
    _write_index(folder, shard_names, total)


def _flush_shard(folder: Path, shard: dict[str, torch.Tensor], i: int) -> tuple[str, list[str]]:
    name = f"model-{i + 1:05d}.safetensors"
    save_file(shard, str(folder / name), metadata={"format": "pt"})
    return name, list(shard)


def _write_index(folder: Path, shards: list[tuple[str, list[str]]], total: int) -> None:
    # the final shard count is known only now, so files are renamed to the -of-N convention
    n = len(shards)
    weight_map = {}
    for i, (tmp_name, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(folder / tmp_name, folder / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
