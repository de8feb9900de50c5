"""Routing traces recorded from a real run equal the reference model's own routing."""

from __future__ import annotations

import pytest
import torch

import offload_rt
from offload_rt.analysis.traces import read_trace, write_trace


def test_recorded_trace_equals_the_reference_routing(reference, tmp_path):
    folder, hf = reference
    prompt, new = [1, 17, 42, 99, 5, 63], 8
    with offload_rt.load(folder, cache_experts=5, record_routing=True) as m:
        grid = m.model.grid  # a trace has one entry per MoE layer: every layer, in Mixtral
        assert grid.layers == tuple(range(m.config.num_hidden_layers))
        tokens = m.generate(prompt, max_new_tokens=new).token_ids
        trace = m.routing_trace()
    with offload_rt.load(folder) as m, pytest.raises(ValueError, match="record_routing=True"):
        m.routing_trace()
    write_trace(tmp_path / "t.msgpack", trace)
    assert read_trace(tmp_path / "t.msgpack") == trace
    # the prefill, then one pass per fed-back token
    assert len(trace.passes) == 1 + len(tokens) - 1 and trace.prompt_passes == {0}
    with torch.no_grad():
        out = hf(torch.tensor([prompt + tokens[:-1]]), output_router_logits=True)
    for layer, logits in enumerate(out.router_logits):  # (T, E) per layer
        top = torch.topk(logits.float().softmax(-1), 2, dim=-1).indices.tolist()
        assert trace.passes[0][layer] == tuple(sorted({e for t in top[: len(prompt)] for e in t}))
        for i, t in enumerate(top[len(prompt) :], start=1):
            assert trace.passes[i][layer] == tuple(sorted(t))
