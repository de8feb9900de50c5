"""Chat messages to a prompt, through the chat template of the checkpoint's
`tokenizer_config.json` (Jinja, as transformers renders it: a sandbox, `raise_exception`,
`bos_token`/`eos_token`, `add_generation_prompt`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from offload_rt.engine import RequestError

CONFIG_FILE = "tokenizer_config.json"


class ChatTemplate:
    def __init__(self, source: str, special: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(source)
        self.special = special  # bos_token, eos_token, ... as the template names them

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate | None:
        """None when the folder has no tokenizer_config.json or it has no chat_template."""
        path = folder / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            cfg = json.loads(path.read_text())
            source = cfg.get("chat_template")
            if isinstance(source, list):  # named templates: the default one
                source = next((t["template"] for t in source if t.get("name") == "default"), None)
            if source is None:
                return None
            return cls(source, _special_tokens(cfg))
        except (ValueError, TypeError, KeyError, jinja2.TemplateError) as e:
            raise ValueError(f"{path}: unreadable chat_template ({e})") from e

    def render(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=True, **self.special
            )
        except jinja2.TemplateError as e:  # the template's own raise_exception included
            raise RequestError(f"the chat template refused the messages: {e}") from e


def _special_tokens(cfg: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = cfg.get(name)
        if isinstance(value, dict):  # transformers' AddedToken form
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)
