"""Loading keeps the experts on disk: the process's RSS grows by far less than their size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from offload_rt.demo import byte_level_tokenizer
from offload_rt.models import FAMILIES, parse_config
from offload_rt.tools.writer import write_checkpoint

MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch, offload_rt
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    before = rss()
    model = offload_rt.load(sys.argv[1])
    loaded = rss()
    model.generate([1, 5, 9], max_new_tokens=2)
    used = rss()
    print(json.dumps({"before": before, "loaded": loaded, "used": used,
                      "experts": model.checkpoint.expert_nbytes(), "stats": model.stats()}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux /proc")
def test_loading_leaves_experts_on_disk(tmp_path):
    import torch

    mixtral = FAMILIES["mixtral"]
    config = mixtral.demo_config(byte_level_tokenizer().get_vocab_size())
    # wide experts and a thin rest: 4 layers x 8 experts x 3 x 256 x 4096 x 4 bytes = 403 MB
    config.update(hidden_size=256, intermediate_size=4096, num_hidden_layers=4)
    spec = mixtral.spec(parse_config(config), frozenset())

    def tensors():
        experts = {name: shape for name, (shape, _) in spec.experts.tensors().items()}
        for name, shape in {**spec.dense, **experts}.items():
            yield name, torch.full(shape, 0.01)

    write_checkpoint(tmp_path, config, tensors(), max_shard_bytes=64 << 20)
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    assert m["experts"] > 400e6
    growth = m["loaded"] - m["before"]
    # the dense weights are ~10 MB; reading the experts would add 400 MB
    assert growth < 0.1 * m["experts"], m
    # two decode steps touch at most 4 layers x 2 experts per token (3 tokens + 1): bounded too
    assert m["used"] - m["before"] < m["experts"], m
    assert m["stats"]["resident"] < 32
