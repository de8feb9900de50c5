"""Tier 3: a quantized checkpoint served by Ray expert actors: the same store, the same bytes,
the same outputs as the local backend on it."""

from __future__ import annotations

import torch

import offload_rt
from offload_rt.experts.formats import expert_nbytes
from offload_rt.models import read_config
from offload_rt.tools.quantize import quantize_checkpoint
from tests.ray.helpers import assert_same_as_local, local_outputs_of, ray


def test_quantized_checkpoint_on_local_ray_matches_local(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-int4") / "model"
    quantize_checkpoint(reference[0], folder, 4, 32, progress=False)
    # codes, scales and offsets: the compute dtype does not enter
    per_expert = expert_nbytes(read_config(folder), torch.float32)
    local = local_outputs_of(folder)
    with offload_rt.load(folder, backend="ray", expert_actors=2) as m:
        assert m.backend.cluster.plan.expert_bytes == per_expert
        assert_same_as_local(m, local)
        s = m.stats()
        assert s["misses"] > 0 and s["bytes_loaded"] == s["misses"] * per_expert
    assert not ray.is_initialized()
