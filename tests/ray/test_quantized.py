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


def test_release_mxfp4_gpt_oss_on_ray_matches_local(tmp_path):
    """GPT-OSS as released (MXFP4 experts with biases) in Ray actors: the packed bytes are what
    each actor's misses move, and the outputs are the local backend's."""
    from tests.families import save_family
    from tests.test_mxfp4_models import write_release_mxfp4

    hf = save_family("gpt_oss", tmp_path, intermediate_size=64)
    write_release_mxfp4(tmp_path, hf)
    per_expert = expert_nbytes(read_config(tmp_path), torch.float32)
    local = local_outputs_of(tmp_path)
    with offload_rt.load(tmp_path, backend="ray", expert_actors=2) as m:
        assert m.backend.cluster.plan.expert_bytes == per_expert
        assert_same_as_local(m, local)
    assert not ray.is_initialized()
