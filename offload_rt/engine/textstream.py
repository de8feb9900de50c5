"""Text pieces of a sequence as its tokens come, for streaming.

Decoding token by token breaks multi-byte characters and cannot know yet whether the text is
running into a stop string, so each piece is the newly decoded text minus what must be held
back: an unfinished character (U+FFFD at the end) and the last len(longest stop) - 1
characters, which may still become a stop string that the final text cuts off.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"  # what a decoder gives for the bytes of an unfinished character


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop_strings: tuple[str, ...]) -> None:
        self.decode = decode
        self.hold = max((len(s) for s in stop_strings), default=1) - 1
        self.sent = ""  # the text handed out so far; every piece extends it

    def piece(self, tokens: list[int]) -> str:
        """The new text that is safe to send after `tokens` (the whole sequence so far)."""
        # the unfinished character first, then the hold: a stop string may begin anywhere in
        # the last `hold` characters that are final, not in the last `hold` of any kind
        text = self.decode(tokens).rstrip(REPLACEMENT)
        safe = text[: len(text) - self.hold] if self.hold else text
        return self._extend(safe)

    def finish(self, final_text: str) -> str:
        """The rest of the final text (already cut at a stop string) once the sequence ends."""
        return self._extend(final_text)

    def _extend(self, text: str) -> str:
        # a prefix's decoding is not always a prefix of the longer decoding (a tokenizer may
        # clean up spaces around later tokens): then wait, and never take back what was sent
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new = text[len(self.sent) :]
        self.sent = text
        return new
