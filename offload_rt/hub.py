"""Model ids from the Hugging Face hub: `org/name` or `org/name@revision` to a local folder.

A path that exists is always a local folder and is never looked up. Anything else shaped like
a hub id is resolved with `huggingface_hub.snapshot_download`, fetching only the files the
runtime reads (config, tokenizer, chat template, generation config, safetensors and their
index) into the hub's own cache, so that transformers and other tools share the download.

huggingface_hub reads HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE once, when it is first
imported; `HubSettings.from_env` reads them again at each call and passes them explicitly,
so a process (or a test) that sets them later is still honoured.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Only what the runtime opens: a repo often carries other formats beside (GGUF, .bin, the
# original release in original/), which would multiply the download.
ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
    "*.safetensors",
)
IGNORE_PATTERNS = ("*/*",)  # the repo's top folder only: fnmatch's `*` crosses `/`
# owner/name as the hub allows them (letters, digits, `-`, `_`, `.`), then an optional
# @revision: a branch, tag or commit hash, which may itself hold `/` (e.g. refs/pr/1)
HUB_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
TRUE = ("1", "on", "yes", "true")


class HubError(OSError):
    """A hub id that cannot be resolved: not cached while offline, unknown, gated, no
    network. The message names the id."""


@dataclass(frozen=True)
class HubSettings:
    cache_dir: Path | None  # the hub cache (HF_HUB_CACHE, or HF_HOME/hub); None: the library's
    offline: bool  # HF_HUB_OFFLINE: resolve from the cache only, never reach the network
    token: str | None  # HF_TOKEN for gated and private repos; None: the stored login, if any

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HubSettings:
        env = os.environ if env is None else env
        cache = env.get("HF_HUB_CACHE") or (
            str(Path(env["HF_HOME"]) / "hub") if env.get("HF_HOME") else None
        )
        offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").lower()
        return cls(
            cache_dir=Path(cache).expanduser() if cache else None,
            offline=offline in TRUE,
            token=env.get("HF_TOKEN") or None,
        )


@dataclass(frozen=True)
class HubId:
    repo: str  # owner/name
    revision: str | None  # branch, tag or commit; None: the default branch

    def __str__(self) -> str:
        return self.repo if self.revision is None else f"{self.repo}@{self.revision}"


def parse_hub_id(spec: str | Path) -> HubId | None:
    """The hub id `spec` names, or None when it is a local path: one that exists, is absolute,
    starts with `.` or `~`, or is not shaped `owner/name[@revision]`."""
    text = str(spec)
    if Path(text).expanduser().exists() or text.startswith((".", "~", "/")):
        return None
    match = HUB_ID.fullmatch(text)
    if match is None:
        return None
    return HubId(match["repo"], match["revision"])


def resolve_model(spec: str | Path, settings: HubSettings | None = None) -> Path:
    """The local folder of `spec`: the path itself when it is one, else the snapshot of the
    hub id in the cache, downloaded first unless offline (HubError when that fails)."""
    hub_id = parse_hub_id(spec)
    if hub_id is None:
        return Path(spec).expanduser()
    return download(hub_id, settings or HubSettings.from_env())


def download(hub_id: HubId, settings: HubSettings) -> Path:
    """The snapshot folder of `hub_id`, holding the files of ALLOW_PATTERNS that it has;
    huggingface_hub draws its progress bars (HF_HUB_DISABLE_PROGRESS_BARS=1: none)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        folder = snapshot_download(
            hub_id.repo,
            revision=hub_id.revision,
            cache_dir=settings.cache_dir,
            local_files_only=settings.offline,
            token=settings.token,
            allow_patterns=list(ALLOW_PATTERNS),
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as e:
        raise HubError(_explain(hub_id, settings, e)) from e
    return Path(str(folder))


def _explain(hub_id: HubId, settings: HubSettings, error: Exception) -> str:
    cache = settings.cache_dir or "the default hub cache (~/.cache/huggingface/hub)"
    where = f"{hub_id} is not a local folder, and the hub cache {cache}"
    if settings.offline:
        return (
            f"{where} has no complete snapshot of it, and HF_HUB_OFFLINE is set, so it was not "
            f"downloaded: unset HF_HUB_OFFLINE to download it, or give a local folder "
            f"({type(error).__name__}: {error})"
        )
    return f"{where} could not get it from the hub ({type(error).__name__}: {error})"
