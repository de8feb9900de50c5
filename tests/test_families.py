"""Tier 2 over the family registry: every family against its transformers reference, in both
checkpoint layouts (per-expert as the hub ships them, fused as transformers 5 writes them),
one file and sharded, at cache sizes of one expert, a third, and all."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload_rt
from offload_rt.checkpoint import CheckpointError
from offload_rt.models import FAMILIES
from tests.families import REFERENCES, save_family
from tests.test_exactness import PROMPTS, reference_greedy

NEW_TOKENS = 32
# each axis covered for every family without the full product: (fused, sharded)
LAYOUTS = [(False, False), (True, True)]
PACKAGE = Path(__file__).parent.parent / "offload_rt"


def test_every_registered_family_has_a_reference():
    assert sorted(REFERENCES) == sorted(FAMILIES)


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def family(request):
    return request.param


@pytest.fixture(scope="module", params=LAYOUTS, ids=["per-expert-single", "fused-sharded"])
def written(request, family, tmp_path_factory):
    fused, sharded = request.param
    folder = tmp_path_factory.mktemp(f"{family}-{'fused' if fused else 'hub'}")
    hf = save_family(family, folder, fused=fused, sharded=sharded)
    has_index = (folder / "model.safetensors.index.json").is_file()
    assert has_index == sharded
    with torch.no_grad():
        want_logits = hf(torch.tensor([PROMPTS[0]])).logits[0]
    want_tokens = [reference_greedy(hf, p, NEW_TOKENS) for p in PROMPTS[:2]]
    return folder, want_logits, want_tokens


@pytest.mark.parametrize("share", ["one", "third", "all"])
def test_family_matches_transformers(written, share):
    folder, want_logits, want_tokens = written
    with offload_rt.load(folder) as probe:
        total = probe.config.num_experts_total
    cache = {"one": 1, "third": total // 3, "all": None}[share]
    with offload_rt.load(folder, cache_experts=cache) as model:
        got = model.logits(PROMPTS[0])
        assert (got - want_logits).abs().max().item() <= 1e-4
        tokens = [r.token_ids for r in model.generate(PROMPTS[:2], max_new_tokens=NEW_TOKENS)]
        stats = model.stats()
    assert tokens == want_tokens
    if cache is not None:
        assert stats["resident_max"] <= cache and stats["evictions"] > 0


def test_dense_layers_are_not_experts(tmp_path):
    """Qwen3-MoE's mlp_only_layers: layer 0 has a dense MLP, so its experts are not in the
    grid, the cache never sees layer 0, and warm-up loads only MoE layers."""
    save_family("qwen3_moe", tmp_path)
    with offload_rt.load(tmp_path, cache_experts=4) as model:
        assert model.model.grid.layers == (1, 2)
        assert model.config.num_experts_total == 12
        seen: set[int] = set()
        run = model.backend.run
        model.backend.run = lambda groups: seen.update(k.layer for k in groups) or run(groups)
        model.generate(PROMPTS[0], max_new_tokens=4)
        assert seen == {1, 2}
        assert model.warm() == 4


def _rewrite(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("family_name", ["qwen3_moe", "qwen2_moe"])
def test_broken_checkpoints_name_what_is_wrong(tmp_path, family_name):
    def fresh(name: str) -> Path:
        folder = tmp_path / name
        save_family(family_name, folder)
        return folder

    expert = "model.layers.1.mlp.experts.4.up_proj.weight"
    missing = fresh("missing")
    _rewrite(missing, lambda t: t.pop(expert))
    with pytest.raises(CheckpointError, match=expert.replace(".", r"\.")):
        offload_rt.load(missing)

    shaped = fresh("shape")
    _rewrite(shaped, lambda t: t.update({expert: t[expert][:-1]}))
    with pytest.raises(CheckpointError, match=r"up_proj\.weight.*shape \[47, 64\]"):
        offload_rt.load(shaped)

    no_field = fresh("field")
    cfg = json.loads((no_field / "config.json").read_text())
    del cfg["moe_intermediate_size"]
    (no_field / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: missing field 'moe_intermediate_size'"):
        offload_rt.load(no_field)


def test_an_unknown_family_is_refused_naming_the_supported_ones(tmp_path):
    save_family("mixtral", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama4_text", ["Llama4ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown model_type 'llama4_text'.*qwen3_moe"):
        offload_rt.load(tmp_path)


def test_transformers_4_configs_are_read(tmp_path):
    """The hub's configs: rope_theta at top level, num_experts as Qwen names it."""
    hf = save_family("qwen3_moe", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"], cfg["rope_scaling"] = rope["rope_theta"], None
    cfg["num_experts"] = cfg.pop("num_local_experts", cfg.get("num_experts"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with offload_rt.load(tmp_path) as model, torch.no_grad():
        want = hf(torch.tensor([PROMPTS[1]])).logits[0]
        assert (model.logits(PROMPTS[1]) - want).abs().max().item() <= 1e-4


FAMILY_NAME_FRAGMENTS = (
    "block_sparse_moe",
    "gate_proj",
    "up_proj",
    "down_proj",
    "shared_expert",
    "self_attn",
    "embed_tokens",
    "layernorm",
    "experts.{",
    "lm_head.weight",
)


def _string_literals(tree: ast.AST) -> list[str]:
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_only_the_family_package_names_tensors_or_assumes_layer_0():
    """Outside offload_rt/models (and the converter of the original Mixtral release) no code
    names a family's tensors, and none treats layer 0 as the first MoE layer."""
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("models", "convert"):
            continue
        source = path.read_text()
        for literal in _string_literals(ast.parse(source)):
            hits = [f for f in FAMILY_NAME_FRAGMENTS if f in literal]
            assert not hits, f"{rel} names family tensors: {literal!r}"
        for pattern in ("layer == 0", "layer != 0", "layers=(0", "range(cfg.num_hidden_layers)"):
            assert pattern not in source, f"{rel} assumes MoE layers start at 0: {pattern!r}"


@pytest.mark.parametrize("family_name", ["qwen2_moe", "olmoe"])
def test_quantized_experts_of_a_fused_checkpoint(tmp_path, family_name):
    """`quantize` reads a fused checkpoint expert by expert and writes the family's
    per-expert names; int8 stays close to float, and each miss moves the quantized bytes."""
    from offload_rt.experts.formats import expert_nbytes
    from offload_rt.tools.quantize import quantize_checkpoint

    save_family(family_name, tmp_path / "float", fused=True)
    quantize_checkpoint(tmp_path / "float", tmp_path / "q8", 8, 16, progress=False)
    with offload_rt.load(tmp_path / "float") as model:
        want = model.logits(PROMPTS[0])
    with offload_rt.load(tmp_path / "q8", cache_experts=1) as model:
        got = model.logits(PROMPTS[0])
        stats = model.stats()
        per_expert = expert_nbytes(model.config, torch.float32)
    assert (got - want).abs().max().item() < 0.05
    assert per_expert < 3 * 48 * 64 * 4 / 3  # int8 codes + scales: under a third of float32
    assert stats["bytes_loaded"] == stats["misses"] * per_expert


@pytest.mark.parametrize("family_name", sorted(REFERENCES))
def test_demo_of_every_family(tmp_path, family_name, capsys):
    from offload_rt.cli import main

    argv = ["demo", "--family", family_name, "--cache-dir", str(tmp_path), "--max-new-tokens", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"demo-{family_name}" in out and "misses" in out


def test_prefetch_and_compute_on_miss_change_no_output_when_moe_starts_at_layer_1(tmp_path):
    """Qwen3-MoE with a dense layer 0: the guess for the first MoE layer, the guard on it and
    the loads behind a slow link are all by the grid; outputs equal, bit for bit."""
    from tests.test_prefetch import SLOW_LINK, decode_logits

    save_family("qwen3_moe", tmp_path)
    opts = dict(cache_experts=5, link_gbps=SLOW_LINK)

    def run(**more):
        with offload_rt.load(tmp_path, **opts, **more) as model:
            logits = decode_logits(model, PROMPTS[2], 12)
            tokens = [r.token_ids for r in model.generate(PROMPTS[:2], max_new_tokens=12)]
            return logits, tokens, model.stats()

    base = run(prefetch=False)
    for more in (dict(prefetch=True), dict(prefetch=True, compute_on_miss=True)):
        logits, tokens, stats = run(**more)
        assert torch.equal(logits, base[0]) and tokens == base[1], more
        assert stats["prefetch_loads"] > 0 and stats["resident_max"] <= 5
    assert stats["host_computed"] > 0


def test_a_trace_of_a_family_has_its_grid_and_replays(tmp_path, capsys):
    from offload_rt.cli import main

    save_family("qwen3_moe", tmp_path / "m")
    trace = tmp_path / "t.msgpack"
    argv = ["generate", str(tmp_path / "m"), "--token-ids", "1,17,42,99", "--max-new-tokens"]
    assert main([*argv, "6", "--cache-experts", "4", "--trace", str(trace)]) == 0
    capsys.readouterr()
    assert main(["cache-sim", str(trace), "--capacity", "2", "--global", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    from offload_rt.analysis.traces import read_trace

    recorded = read_trace(trace)
    assert (recorded.num_layers, recorded.num_experts) == (2, 6)  # MoE layers 1-2 only
    decode = sum(len(e) for p in recorded.passes[1:] for e in p)
    assert result["hits"] + result["misses"] == decode == 5 * 2 * 2


def test_gpt_oss_sliding_rings_under_continuous_batching(tmp_path):
    """GPT-OSS's sliding layers keep a ring of `sliding_window` positions. Requests longer
    than the window, joining a running batch at other positions (so rows are prefilled apart,
    copied into the batch and stepped at different positions), get the reference's tokens;
    each ring holds the window only."""
    from offload_rt.engine import SamplingParams
    from offload_rt.engine.scheduler import Scheduler, SchedulerConfig
    from tests.test_scheduler import Collector

    hf = save_family("gpt_oss", tmp_path)
    gen = torch.Generator().manual_seed(7)
    prompts = [[1] + torch.randint(3, 128, (n,), generator=gen).tolist() for n in (9, 2, 15, 5)]
    want = [reference_greedy(hf, p, 12) for p in prompts]
    with offload_rt.load(tmp_path, cache_experts=6) as model:
        cache = model.model.new_cache(2, 64)
        windows = [k.shape[2] for k in cache.keys]
        assert windows == [6, 64, 6]  # sliding, full, sliding
        sched = Scheduler(model.model, (), None, SchedulerConfig(max_batch=2))
        try:
            collectors = [Collector() for _ in prompts]
            for p, c in zip(prompts, collectors):
                sched.submit(p, SamplingParams(max_new_tokens=12, temperature=0.0), c)
            got = [c.wait()[-1].result.token_ids for c in collectors]
        finally:
            sched.close()
    assert got == want


def test_gpt_oss_prefetch_compute_on_miss_trace_and_plan(tmp_path, capsys):
    """The rest of the runtime on GPT-OSS's experts (biases, clamped SwiGLU): prefetch and
    compute on a miss behind a slow link change no output; a trace records its grid; `plan`
    sizes its experts with their biases."""
    from offload_rt.analysis.traces import read_trace
    from offload_rt.cli import main
    from offload_rt.experts.formats import expert_nbytes
    from tests.test_prefetch import SLOW_LINK, decode_logits

    save_family("gpt_oss", tmp_path / "m")
    opts = dict(cache_experts=5, link_gbps=SLOW_LINK)

    def run(**more):
        with offload_rt.load(tmp_path / "m", **opts, **more) as model:
            logits = decode_logits(model, PROMPTS[0], 10)
            return logits, model.stats(), model.config

    base = run(prefetch=False)
    logits, stats, cfg = run(prefetch=True, compute_on_miss=True)
    assert torch.equal(logits, base[0])
    assert stats["prefetch_loads"] > 0 and stats["host_computed"] > 0
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    assert expert_nbytes(cfg, torch.float32) == (3 * d * f + 2 * f + d) * 4
    trace = tmp_path / "t.msgpack"
    argv = ["generate", str(tmp_path / "m"), "--token-ids", "1,17,42,99", "--max-new-tokens"]
    assert main([*argv, "4", "--cache-experts", "4", "--trace", str(trace)]) == 0
    recorded = read_trace(trace)
    assert (recorded.num_layers, recorded.num_experts) == (3, 6)
    capsys.readouterr()
    assert main(["plan", str(tmp_path / "m"), "--expert-actors", "2"]) == 0
    assert "expert-1" in capsys.readouterr().out


def test_deepseek_v3_kv_cache_holds_the_latent_and_the_rotary_key(tmp_path):
    """MLA's cache: per token and layer, the kv_lora_rank latent and the qk_rope_head_dim
    rotary key, not H full keys and values; printed for DeepSeek-V3's own shapes."""
    import transformers

    from offload_rt.models import parse_config
    from offload_rt.models.deepseek import kv_bytes_per_token

    save_family("deepseek_v3", tmp_path)
    with offload_rt.load(tmp_path) as model:
        cfg = model.config
        cache = model.model.new_cache(2, 10)
        per_token = sum(k.numel() + v.numel() for k, v in zip(cache.keys, cache.values))
        per_token = per_token * 4 // (2 * 10 * cfg.num_hidden_layers)
    assert per_token == kv_bytes_per_token(cfg, torch.float32) == (32 + 8) * 4
    v3 = parse_config(transformers.DeepseekV3Config().to_dict())
    latent = kv_bytes_per_token(v3, torch.bfloat16)
    full = v3.num_attention_heads * (v3.nope_dim + v3.rope_dim + v3.v_dim) * 2
    print(
        f"DeepSeek-V3 KV cache per token and layer, bfloat16: {latent} B (MLA latent + rope "
        f"key: ({v3.kv_lora_rank} + {v3.rope_dim}) x 2); full keys and values: {full} B"
    )
    assert latent == (512 + 64) * 2 and full == 128 * (128 + 64 + 128) * 2


def test_layers_past_num_hidden_layers_are_not_read(tmp_path):
    """DeepSeek-V3 ships a multi-token-prediction layer after its last decoder layer: its
    tensors are in the files, not in the model."""
    hf = save_family("deepseek_v3", tmp_path)

    def add_mtp_layer(tensors):
        last = hf.config.num_hidden_layers - 1
        extra = {
            k.replace(f"layers.{last}.", f"layers.{last + 1}."): v.clone()
            for k, v in tensors.items()
            if f"layers.{last}." in k
        }
        tensors.update(extra)
        tensors[f"model.layers.{last + 1}.eh_proj.weight"] = torch.zeros(64, 128)

    _rewrite(tmp_path, add_mtp_layer)
    with offload_rt.load(tmp_path) as model, torch.no_grad():
        want = hf(torch.tensor([PROMPTS[0]])).logits[0]
        assert (model.logits(PROMPTS[0]) - want).abs().max().item() <= 1e-4
        assert model.config.num_hidden_layers == 3


@pytest.mark.parametrize("family_name", ["deepseek_v3", "glm4_moe"])
def test_grouped_router_families_prefetch_compute_on_miss_and_quantize(tmp_path, family_name):
    """DeepSeek-V3's block (grouped sigmoid router with a correction bias; dense layer 0):
    the guesses for prefetch go through the full router, and neither prefetch nor compute on
    a miss changes an output; its experts quantize to int8 and stay close to float."""
    from offload_rt.tools.quantize import quantize_checkpoint
    from tests.test_prefetch import SLOW_LINK, decode_logits

    save_family(family_name, tmp_path / "m")
    opts = dict(cache_experts=4, link_gbps=SLOW_LINK)

    def run(folder, **more):
        with offload_rt.load(folder, **opts, **more) as model:
            return decode_logits(model, PROMPTS[0], 10), model.stats()

    base = run(tmp_path / "m", prefetch=False)
    logits, stats = run(tmp_path / "m", prefetch=True, compute_on_miss=True)
    assert torch.equal(logits, base[0])
    assert stats["prefetch_loads"] > 0 and stats["host_computed"] > 0
    quantize_checkpoint(tmp_path / "m", tmp_path / "q8", 8, 16, progress=False)
    quantized, _ = run(tmp_path / "q8", prefetch=True)
    # the first step (later ones follow each model's own greedy tokens)
    assert (quantized[0] - base[0][0]).abs().max().item() < 0.05
