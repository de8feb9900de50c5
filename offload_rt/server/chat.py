"""Chat messages to a prompt, through the checkpoint's chat template: `chat_template.jinja`
(as transformers saves it, and GPT-OSS ships it) or else `chat_template` in
`tokenizer_config.json`. Rendered as transformers renders it: a sandbox, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text, loop controls, the `generation` tag,
`bos_token`/`eos_token`, `add_generation_prompt`."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from offload_rt.engine import RequestError

CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # wins over tokenizer_config.json's, as in transformers


class ChatTemplate:
    def __init__(self, source: str, special: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[jinja2.ext.loopcontrols, _GenerationTag],
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        self.template = env.from_string(source)
        self.special = special  # bos_token, eos_token, ... as the template names them

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate | None:
        """None when the folder has neither a chat_template.jinja nor a chat_template in its
        tokenizer_config.json."""
        path, jinja_file = folder / CONFIG_FILE, folder / TEMPLATE_FILE
        source, where = None, path
        try:
            cfg = json.loads(path.read_text()) if path.is_file() else {}
            if jinja_file.is_file():
                source, where = jinja_file.read_text(), jinja_file
            else:
                source = cfg.get("chat_template")
            if isinstance(source, list):  # named templates: the default one
                source = next((t["template"] for t in source if t.get("name") == "default"), None)
            if source is None:
                return None
            return cls(source, _special_tokens(cfg))
        except (ValueError, TypeError, KeyError, OSError, jinja2.TemplateError) as e:
            raise ValueError(f"{where}: unreadable chat template ({e})") from e

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


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own escapes HTML characters, which a prompt must keep as they are
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks an assistant's text for training masks;
    rendering a prompt keeps the text as it is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()
