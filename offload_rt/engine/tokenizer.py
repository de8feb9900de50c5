"""Text in and out through a checkpoint's `tokenizer.json` (the `tokenizers` package)."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, pre_tokenizers

TOKENIZER_FILE = "tokenizer.json"
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens
METASPACE = "\u2581"  # SentencePiece's word boundary, a space once decoded


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoders = _decoder_types(tokenizer)
        # a byte-level vocabulary spells each byte as one printable character: the way back
        self._byte_of = {c: b for b, c in enumerate(_byte_alphabet())}
        self.token_bytes = lru_cache(maxsize=1 << 16)(self._token_bytes)

    @classmethod
    def from_folder(cls, folder: Path) -> TextTokenizer | None:
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            return None
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # the tokenizers package raises a bare Exception on bad files
            raise ValueError(f"{path}: not a readable tokenizer ({e})") from e

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids with the tokenizer's own special tokens (Mixtral's: a leading <s>);
        without them for text that spells its own, as a rendered chat template does."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prefix_lengths(self, ids: list[int], first: int = 0) -> list[int]:
        """len(decode(ids[:i])) for i from `first` on: where each token's text starts in the
        decoded text (a prefix's own decoding, as a tokenizer may clean up around later
        tokens; one batch of decodes, in parallel)."""
        texts = self.tokenizer.decode_batch(
            [ids[:i] for i in range(first, len(ids))], skip_special_tokens=True
        )
        return [len(t) for t in texts]

    def _token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for; a special token's, its own spelling."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if "ByteLevel" in self._decoders and all(c in self._byte_of for c in piece):
            return bytes(self._byte_of[c] for c in piece)
        byte = BYTE_FALLBACK.fullmatch(piece)
        if byte and "ByteFallback" in self._decoders:
            return bytes([int(byte.group(1), 16)])
        if self._decoders & {"Metaspace", "Replace"}:
            piece = piece.replace(METASPACE, " ")
        return piece.encode()

    def token_text(self, token_id: int) -> str:
        """A token as OpenAI shows it: its text, or `bytes:\\xNN...` when its bytes are not
        text on their own (a part of a character)."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _decoder_types(tokenizer: Tokenizer) -> frozenset[str]:
    """The kinds of decoder the tokenizer chains (ByteLevel, ByteFallback, Metaspace...)."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return frozenset(str(p.get("type")) for p in parts if isinstance(p, dict))


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-character table, in byte order: printable bytes stand for themselves,
    the others are shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    table = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    return table
