"""A SentencePiece `tokenizer.model` (BPE, as Mistral's) -> `tokenizer.json` for the
`tokenizers` package, without sentencepiece, protobuf or transformers.

The .model file is a protobuf `ModelProto` (sentencepiece_model.proto); the few fields read
here are decoded from the wire format directly. The tokenizer built has the layout of the
`tokenizer.json` published with Hugging Face's Mixtral: normalizer prepend "▁" and replace
" " -> "▁", a BPE whose merges come from the piece scores (a piece made of two pieces is
merged in order of its score), byte fallback, and `<s>` prepended to every encoding.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

SPACE = "\u2581"  # "▁", SentencePiece's stand-in for a space
# SentencePiece piece types (ModelProto.SentencePiece.Type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_MODEL = 2  # TrainerSpec.ModelType.BPE


class SpmError(ValueError):
    """A tokenizer.model that cannot be read, or turned into an equivalent tokenizer.json."""


@dataclass(frozen=True)
class SpmModel:
    pieces: tuple[tuple[str, float, int], ...]  # (piece, score, type) by id
    model_type: int  # 1 unigram, 2 BPE, 3 word, 4 char
    byte_fallback: bool  # unknown characters become <0xNN> byte pieces
    unk_id: int
    bos_id: int  # -1: none
    eos_id: int  # -1: none
    add_dummy_prefix: bool  # a "▁" before the text, so a first word encodes as a later one
    remove_extra_whitespaces: bool  # collapse runs of spaces before encoding
    normalizer: str  # normalization rule's name; "identity": none
    has_charsmap: bool  # a compiled normalization table is present


def read_spm(path: Path) -> SpmModel:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpmError(f"{path}: cannot read ({e})") from e
    try:
        return _model(data)
    except (IndexError, UnicodeDecodeError, struct.error, SpmError) as e:
        raise SpmError(f"{path}: not a SentencePiece model ({e})") from e


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: varints as int, the rest as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield key >> 3, value
            continue
        if wire == 2:
            size, i = _varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise SpmError(f"unsupported protobuf wire type {wire} at byte {i}")
        if i + size > len(buf):
            raise SpmError(f"truncated field {key >> 3} at byte {i}")
        yield key >> 3, buf[i : i + size]
        i += size


def _int32(v: int | bytes) -> int:
    assert isinstance(v, int)
    return v - (1 << 64) if v >= 1 << 63 else v  # negative int32s are 10-byte varints


def _model(data: bytes) -> SpmModel:
    pieces, trainer, norm = [], {}, {}
    for num, value in _fields(data):
        if num == 1:
            pieces.append(_piece(value))  # type: ignore[arg-type]
        elif num == 2:
            trainer = dict(_fields(value))  # type: ignore[arg-type]
        elif num == 3:
            norm = dict(_fields(value))  # type: ignore[arg-type]
    if not pieces:
        raise SpmError("no pieces")
    name = norm.get(1, b"")
    return SpmModel(
        pieces=tuple(pieces),
        model_type=_int32(trainer.get(3, 1)),
        byte_fallback=bool(trainer.get(35, 0)),
        unk_id=_int32(trainer.get(40, 0)),
        bos_id=_int32(trainer.get(41, 1)),
        eos_id=_int32(trainer.get(42, 2)),
        add_dummy_prefix=bool(norm.get(3, 1)),
        remove_extra_whitespaces=bool(norm.get(4, 1)),
        normalizer=name.decode() if isinstance(name, bytes) else "",
        has_charsmap=bool(norm.get(2)),
    )


def _piece(buf: bytes) -> tuple[str, float, int]:
    piece, score, kind = "", 0.0, NORMAL
    for num, value in _fields(buf):
        if num == 1:
            piece = value.decode()  # type: ignore[union-attr]
        elif num == 2:
            score = struct.unpack("<f", value)[0]  # type: ignore[arg-type]
        elif num == 3:
            kind = _int32(value)
    return piece, score, kind


def _check_supported(m: SpmModel, path: Path) -> None:
    why = None
    if m.model_type != BPE_MODEL:
        why = f"model type {m.model_type} (only BPE, type 2, as Mistral's)"
    elif m.has_charsmap or m.normalizer not in ("", "identity"):
        why = f"text normalization {m.normalizer!r} (only 'identity', as Mistral's)"
    elif m.remove_extra_whitespaces:
        why = "remove_extra_whitespaces (Mistral's keeps spaces as they are)"
    elif not 0 <= m.bos_id < len(m.pieces):
        why = f"no beginning-of-sequence piece (bos_id {m.bos_id})"
    if why is not None:
        raise SpmError(f"{path}: cannot build an equivalent tokenizer.json for {why}")


def _merges(m: SpmModel) -> list[tuple[str, str]]:
    """BPE merges: every split of a normal piece into two normal pieces, the best-scored
    result first (SentencePiece merges the pair whose union scores highest)."""
    ids = {p: i for i, (p, _, kind) in enumerate(m.pieces) if kind == NORMAL}
    ranked = []
    for piece, i in ids.items():
        score = m.pieces[i][1]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(m: SpmModel, path: Path) -> Tokenizer:
    """The `tokenizers` equivalent of a SentencePiece BPE model; SpmError when there is none."""
    _check_supported(m, path)
    vocab = {piece: i for i, (piece, _, _) in enumerate(m.pieces)}
    if len(vocab) != len(m.pieces):
        raise SpmError(f"{path}: pieces repeat")
    unk = m.pieces[m.unk_id][0]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges(m),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=m.byte_fallback,
        )
    )
    prefix = [normalizers.Prepend(SPACE)] if m.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if m.add_dummy_prefix else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    bos = m.pieces[m.bos_id][0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, m.bos_id)]
    )
    special = [p for p, _, kind in m.pieces if kind in (UNKNOWN, CONTROL)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in special])
    user = [p for p, _, kind in m.pieces if kind == USER_DEFINED]
    tok.add_tokens([AddedToken(p, normalized=False) for p in user])
    return tok


def tokenizer_config(m: SpmModel, max_length: int) -> dict[str, object]:
    """tokenizer_config.json, for transformers' AutoTokenizer (offload_rt does not read it)."""

    def piece(i: int) -> str | None:
        return m.pieces[i][0] if 0 <= i < len(m.pieces) else None

    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": piece(m.bos_id),
        "eos_token": piece(m.eos_id),
        "unk_token": piece(m.unk_id),
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }


def write_tokenizer_files(src: Path, out: Path, max_length: int) -> tuple[SpmModel, bool, str]:
    """Copy tokenizer.model, write tokenizer_config.json and, where it can, tokenizer.json.
    Returns the model, whether tokenizer.json was written, and why not if it was not."""
    m = read_spm(src)
    (out / src.name).write_bytes(src.read_bytes())
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(m, max_length), indent=2) + "\n"
    )
    try:
        tok = build_tokenizer(m, src)
    except SpmError as e:
        return m, False, str(e)
    tok.save(str(out / "tokenizer.json"))
    return m, True, ""
