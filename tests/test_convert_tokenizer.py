"""`offload-rt convert`'s tokenizer: tokenizer.json from a SentencePiece model, against
sentencepiece itself; and a whole conversion with a tokenizer, through the CLI, to text."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

import offload_rt
from offload_rt.cli import main
from offload_rt.convert.tokenizer import SpmError, build_tokenizer, read_spm
from tests.conftest import save_reference
from tests.original_format import original_from_hf

spm = pytest.importorskip("sentencepiece")

CORPUS = """The quick brown fox jumps over the lazy dog. Mixture of experts route each token.
A coordinator runs attention and the router; experts live on other machines.
Numbers like 12345 and 2024 appear, as do words such as offloading, caching, placement.
Le renard brun saute par-dessus le chien paresseux. Der schnelle braune Fuchs springt.
    indented code: def f(x): return x * 2""".splitlines()
# Mistral's tokenizer.model was trained with these settings (its trainer_spec)
MISTRAL_LIKE = dict(
    model_type="bpe",
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
)
SAMPLES = [
    "The quick brown fox",
    "",
    " ",
    "  two leading spaces",
    "trailing  ",
    "a   b",
    "tab\there\nnewline",
    "naïve café 漢字 🙂",
    "12345 experts",
    "offloading caching placement",
    "    def f(x): return x",
]


def train(path: Path, vocab_size: int, **options) -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 40),
        model_writer=model,
        vocab_size=vocab_size,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("spm") / "tokenizer.model", 400, **MISTRAL_LIKE)


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = sorted(set("".join(CORPUS))) + list("  \n\tßø€字😀")
    return ["".join(rng.choices(alphabet, k=rng.randint(1, 40))) for _ in range(n)]


def test_reader_matches_sentencepiece(spm_model):
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    m = read_spm(spm_model)
    assert len(m.pieces) == sp.get_piece_size()
    for i, (piece, score, kind) in enumerate(m.pieces):
        assert piece == sp.id_to_piece(i)
        assert score == pytest.approx(sp.get_score(i))
        assert (kind == 6) == sp.is_byte(i) and (kind == 3) == sp.is_control(i)
        assert (kind == 2) == sp.is_unknown(i)
    assert (m.unk_id, m.bos_id, m.eos_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id())
    assert m.byte_fallback and m.add_dummy_prefix and not m.remove_extra_whitespaces


def test_tokenizer_json_encodes_and_decodes_as_sentencepiece(spm_model):
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tok = build_tokenizer(read_spm(spm_model), spm_model)
    for text in SAMPLES + random_texts(300):
        want = sp.encode(text)
        got = tok.encode(text).ids
        assert got == [sp.bos_id(), *want], text
        assert tok.decode(got, skip_special_tokens=True) == sp.decode(want), text
    # byte fallback was exercised: some sample has a character outside the pieces
    assert any(sp.is_byte(i) for text in SAMPLES for i in sp.encode(text))


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(model_type="unigram"), "model type 1"),
        (dict(model_type="bpe", normalization_rule_name="nmt_nfkc"), "normalization"),
        (dict(model_type="bpe", normalization_rule_name="identity"), "remove_extra_whitespaces"),
    ],
)
def test_models_without_an_equivalent_are_refused(tmp_path, options, fragment):
    path = train(tmp_path / "tokenizer.model", 120, **options)
    with pytest.raises(SpmError, match=fragment) as e:
        build_tokenizer(read_spm(path), path)
    assert str(path) in str(e.value)


def test_unreadable_model(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(SpmError, match="not a SentencePiece model"):
        read_spm(path)


def test_convert_with_tokenizer_generates_text(tmp_path, spm_model, capsys):
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    hf_folder = tmp_path / "hf"
    save_reference(hf_folder, seed=3, vocab_size=sp.get_piece_size())
    src = original_from_hf(tmp_path / "original", hf_folder)
    (src / "tokenizer.model").write_bytes(spm_model.read_bytes())
    out = tmp_path / "converted"
    assert main(["convert", str(src), str(out), "--no-progress"]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    assert (out / "tokenizer.model").read_bytes() == spm_model.read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    prompt = "The quick brown fox"
    with offload_rt.load(out) as model:
        result = model.generate(prompt, max_new_tokens=6)
        assert result.prompt_tokens == 1 + len(sp.encode(prompt))
        # random weights: the text is noise; tokenizers decodes a run of byte pieces that is
        # not valid UTF-8 as one replacement character per byte, where sentencepiece keeps the
        # valid bytes, so only the type is checked here (valid text: the test above)
        assert isinstance(result.text, str) and result.token_ids
    # transformers reads the same folder's tokenizer files and encodes as sentencepiece
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in SAMPLES[:4] + SAMPLES[6:]:
        assert hf_tok(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)], text
    assert hf_tok.decode(sp.encode(prompt)) == prompt
