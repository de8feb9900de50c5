"""Text in and out through a checkpoint's `tokenizer.json` (the `tokenizers` package)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

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
