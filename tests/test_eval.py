"""`offload-rt eval` and `offload_rt.engine.evaluate`: perplexity against transformers over
the same windows and scored tokens; KL and top-1 agreement against the model itself and an
int8 copy; bad input refused naming it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import offload_rt
from offload_rt.cli import main
from offload_rt.engine.evaluate import evaluate, split_windows
from offload_rt.tools.quantize import quantize_checkpoint
from tests.families import save_family

WINDOW = 24
TOKENS = 100  # four full windows and a remainder of four


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module, list[int], Path]:
    """A random qwen3_moe checkpoint, its transformers model, seeded token ids and their file."""
    root = tmp_path_factory.mktemp("eval")
    reference = save_family("qwen3_moe", root / "float", seed=3)
    ids = torch.randint(0, 128, (TOKENS,), generator=torch.Generator().manual_seed(7)).tolist()
    ids_file = root / "ids.txt"
    ids_file.write_text(" ".join(map(str, ids)) + "\n")
    return root / "float", reference, ids, ids_file


def _reference_perplexity(reference: torch.nn.Module, ids: list[int], window: int) -> float:
    """exp(mean NLL) from transformers' float32 logits: non-overlapping windows, every token
    but a window's first scored."""
    nll = []
    with torch.no_grad():
        for start in range(0, len(ids), window):
            w = torch.tensor(ids[start : start + window])
            if len(w) < 2:
                continue
            logits = reference(w[None]).logits[0, :-1].float()  # (T - 1, V)
            nll.append(torch.nn.functional.cross_entropy(logits, w[1:], reduction="none"))
    return math.exp(float(torch.cat(nll).double().mean()))


def test_perplexity_equals_transformers(tiny):
    folder, reference, ids, _ = tiny
    with offload_rt.load(folder, dtype="float32") as model:
        report = evaluate(model, ids, WINDOW, progress=False)
    assert (report.windows, report.scored) == (5, TOKENS - 5)
    expected = _reference_perplexity(reference, ids, WINDOW)
    assert report.perplexity == pytest.approx(expected, rel=1e-4)
    assert report.against is None and report.tokens_per_second > 0


def test_against_itself_is_kl_zero_and_full_agreement(tiny):
    folder, _, ids, _ = tiny
    with offload_rt.load(folder, dtype="float32") as a, offload_rt.load(folder) as b:
        c = evaluate(a, ids, WINDOW, b, progress=False).against
    assert (c.kl_mean, c.kl_p99, c.kl_max, c.top1_agreement) == (0.0, 0.0, 0.0, 1.0)


def test_against_an_int8_copy_is_small_positive_kl(tiny, tmp_path):
    folder, _, ids, _ = tiny
    quantize_checkpoint(folder, tmp_path / "int8", 8, 16, progress=False)
    with offload_rt.load(folder) as a, offload_rt.load(tmp_path / "int8") as b:
        report = evaluate(a, ids, WINDOW, b, progress=False)
    c = report.against
    assert 0 < c.kl_mean <= c.kl_p99 <= c.kl_max < 0.05
    assert c.top1_agreement > 0.9
    assert c.perplexity == pytest.approx(report.perplexity, rel=0.05)


def test_windows_are_cut_without_overlap():
    assert split_windows(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5]]  # a lone 6 scores nothing
    assert split_windows(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_the_command_prints_perplexity_kl_and_agreement(tiny, capsys):
    folder, reference, ids, ids_file = tiny
    args = ["eval", str(folder), "--token-ids", str(ids_file), "--window", str(WINDOW)]
    assert main([*args, "--against", "int8", "--group-size", "16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    printed = float(re.search(r"^perplexity: ([\d.]+) ", out, re.M).group(1))
    assert printed == pytest.approx(_reference_perplexity(reference, ids, WINDOW), rel=1e-4)
    assert "95 tokens scored (each window's first token is context only)" in out
    assert "KL(model || int8) per token, nats: mean " in out and "top-1 agreement: " in out
    assert "tok/s (both models)" in out


def test_the_command_reads_text_through_the_tokenizer(tmp_path, capsys):
    from offload_rt.demo import make_demo_checkpoint

    folder = make_demo_checkpoint(tmp_path / "demo", family="qwen3_moe")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    assert main(["eval", str(folder), "--text", str(text), "--no-progress"]) == 0
    assert "perplexity: " in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--token-ids", "{missing}"], "missing.txt: no such file"),
        (["--token-ids", "{empty}"], "empty.txt is empty"),
        (["--token-ids", "{words}"], "token ids must be integers"),
        (["--token-ids", "{one}"], "one.txt gives 1 token(s); perplexity needs at least 2"),
        (["--token-ids", "{ids}", "--window", "1"], "window must be at least 2"),
        (["--token-ids", "{ids}", "--window", "999"], "longer than"),
        (["--token-ids", "{big}"], "token id 500 is outside"),
        (["--text", "{ids}"], "no tokenizer.json"),
        (["--token-ids", "{ids}", "--against", "{missing}"], "missing.txt"),
    ],
)
def test_bad_input_is_an_error_naming_it(tiny, tmp_path, capsys, extra, message):
    folder, _, _, ids_file = tiny
    files = {"missing": tmp_path / "missing.txt", "ids": ids_file}
    for name, content in (
        ("empty", " \n"),
        ("words", "1 two 3"),
        ("one", "5\n"),
        ("big", "1 500 2"),
    ):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text(content)
    args = [a.format(**files) for a in extra]
    assert main(["eval", str(folder), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("offload-rt: error: ") and message in err, err
