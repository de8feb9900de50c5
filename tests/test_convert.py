"""`offload-rt convert`: the original release format -> Hugging Face, against transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import offload_rt
from offload_rt.checkpoint import INDEX_FILE
from offload_rt.cli import main
from offload_rt.convert import ConvertError, convert_checkpoint, interleaved_to_half_split
from offload_rt.models import open_checkpoint
from tests.original_format import original_from_hf, write_original

PROMPTS = [[1, 17, 42, 99, 5, 63, 88, 12, 7, 101], [1, 11, 60, 3]]


@pytest.fixture(scope="module")
def original(tmp_path_factory, reference) -> Path:
    """The tiny reference model written in the original release's format."""
    return original_from_hf(tmp_path_factory.mktemp("original"), reference[0])


@pytest.fixture(scope="module")
def converted(tmp_path_factory, original) -> Path:
    out = tmp_path_factory.mktemp("converted-parent") / "converted"
    report = convert_checkpoint(original, out, max_shard_bytes=300_000, progress=False)
    assert report.out == out and not report.tokenizer_json
    return out


def test_converted_logits_match_transformers(converted, reference):
    _, hf = reference
    with offload_rt.load(converted) as model:
        for prompt in PROMPTS:
            with torch.no_grad():
                want = hf(torch.tensor([prompt])).logits[0]
            got = model.logits(prompt)
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-4


def test_converted_folder_is_a_sharded_hf_checkpoint(converted, reference):
    index = json.loads((converted / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((converted / s).is_file() for s in shards)
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["rope_theta"] == 1e6
    # transformers itself reads the result and computes the same logits
    from transformers import MixtralForCausalLM

    again = MixtralForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([PROMPTS[0]])
        assert torch.allclose(again(ids).logits, reference[1](ids).logits, atol=1e-5)


def test_rotary_order_matches_the_original_rotary(reference):
    """Attention scores of the original math (rotary on adjacent pairs, as complex numbers)
    on original q/k weights equal transformers' (rotate_half) on the converted weights."""
    from transformers.models.mixtral.modeling_mixtral import (
        MixtralRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    heads, hd, d, t = 4, 16, 64, 6
    gen = torch.Generator().manual_seed(0)
    wq, wk = torch.randn(2, heads * hd, d, generator=gen)
    x = torch.randn(t, d, generator=gen)
    theta = reference[1].config.rope_parameters["rope_theta"]
    freqs = theta ** (-torch.arange(0, hd, 2).double() / hd)  # (hd/2,)
    turns = torch.polar(
        torch.ones(t, hd // 2), torch.outer(torch.arange(t).double(), freqs).float()
    )

    def original(w: torch.Tensor) -> torch.Tensor:  # (t, heads, hd), as mistral's reference
        pairs = torch.view_as_complex((x @ w.T).reshape(t, heads, hd // 2, 2))
        return torch.view_as_real(pairs * turns[:, None]).flatten(2)

    def hf(w: torch.Tensor) -> torch.Tensor:  # (1, heads, t, hd), before rotary
        return (x @ w.T).reshape(1, t, heads, hd).transpose(1, 2)

    want = torch.einsum("qhd,khd->hqk", original(wq), original(wk))
    cos, sin = MixtralRotaryEmbedding(reference[1].config)(x, torch.arange(t)[None])
    q, k = apply_rotary_pos_emb(
        hf(interleaved_to_half_split(wq, heads)), hf(interleaved_to_half_split(wk, heads)), cos, sin
    )
    assert torch.allclose(torch.einsum("hqd,hkd->hqk", q[0], k[0]), want, atol=1e-3)
    # and the order matters: unconverted weights give other scores
    q, k = apply_rotary_pos_emb(hf(wq), hf(wk), cos, sin)
    assert not torch.allclose(torch.einsum("hqd,hkd->hqk", q[0], k[0]), want, atol=1e-1)


def test_dtype_option_and_cli(tmp_path, original, capsys):
    out = tmp_path / "bf16"
    assert main(["convert", str(original), str(out), "--dtype", "bfloat16", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "no rope_theta" in printed and "no tokenizer" in printed and str(out) in printed
    ckpt = open_checkpoint(out)
    assert ckpt.dtype == torch.bfloat16
    assert {info.dtype for info in ckpt.tensors.values()} == {torch.bfloat16}


# --- bad input: every error names the file, tensor or field at fault -------------------------


def copy_original(original: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(original, tmp_path / "src"))


def edit_state(folder: Path, edit) -> None:
    path = folder / "consolidated.00.pth"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def edit_params(folder: Path, edit) -> None:
    path = folder / "params.json"
    params = json.loads(path.read_text())
    edit(params)
    path.write_text(json.dumps(params))


def convert_fails(src: Path, tmp_path: Path, *fragments: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as e:
        convert_checkpoint(src, out, progress=False)
    for fragment in fragments:
        assert fragment in str(e.value)
    assert not out.exists(), "a failed conversion left an output folder"
    assert not list(tmp_path.glob(".out.*")), "a failed conversion left its temporary folder"


def test_missing_params(tmp_path, original):
    src = copy_original(original, tmp_path)
    (src / "params.json").unlink()
    convert_fails(src, tmp_path, "params.json")


def test_missing_consolidated_file(tmp_path, original):
    src = copy_original(original, tmp_path)
    (src / "consolidated.00.pth").unlink()
    convert_fails(src, tmp_path, "consolidated.00.pth", str(src))


def test_missing_tensor(tmp_path, original):
    src = copy_original(original, tmp_path)
    edit_state(src, lambda s: s.pop("layers.1.block_sparse_moe.w3"))
    convert_fails(src, tmp_path, "'layers.1.block_sparse_moe.w3'", "consolidated.00.pth")


def test_wrong_shape(tmp_path, original):
    src = copy_original(original, tmp_path)

    def shrink(s):
        s["layers.0.attention.wk.weight"] = s["layers.0.attention.wk.weight"][:-1].clone()

    edit_state(src, shrink)
    convert_fails(src, tmp_path, "'layers.0.attention.wk.weight'", "[31, 64]", "[32, 64]")


def test_unknown_tensor(tmp_path, original):
    src = copy_original(original, tmp_path)
    edit_state(src, lambda s: s.update({"layers.0.attention.bq": torch.zeros(64)}))
    convert_fails(src, tmp_path, "'layers.0.attention.bq'")


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda p: p.update(use_biases=True), ["unknown fields ['use_biases']", "params.json"]),
        (lambda p: p["moe"].update(capacity_factor=1.0), ["'moe'", "capacity_factor"]),
        (lambda p: p.pop("moe"), ["'moe'"]),
        (lambda p: p.pop("hidden_dim"), ["missing field 'hidden_dim'"]),
        (lambda p: p.update(n_heads=0), ["'n_heads'", "positive integer", "0"]),
        (lambda p: p.update(n_kv_heads=3), ["num_key_value_heads 3"]),
    ],
)
def test_bad_params(tmp_path, original, edit, fragments):
    src = copy_original(original, tmp_path)
    edit_params(src, edit)
    convert_fails(src, tmp_path, *fragments)


def test_tensor_in_two_files(tmp_path, original):
    src = copy_original(original, tmp_path)
    state = torch.load(src / "consolidated.00.pth", weights_only=True)
    write_original(src, state, json.loads((src / "params.json").read_text()))
    torch.save({"norm.weight": state["norm.weight"]}, src / "consolidated.01.pth")
    convert_fails(src, tmp_path, "'norm.weight'", "consolidated.01.pth", "tensor parallel")


def test_refuses_to_overwrite(tmp_path, original):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not overwriting"):
        convert_checkpoint(original, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_reports_errors(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert "params.json" in capsys.readouterr().err
