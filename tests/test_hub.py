"""Hub ids resolved offline from a cache laid out as huggingface_hub lays it out:
models--org--name/blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>,
refs/<branch> holding the commit."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import offload_rt
from offload_rt.cli import main
from offload_rt.hub import HubError, HubSettings, parse_hub_id, resolve_model
from tests.families import save_family

REPO = "tiny-org/tiny-qwen3-moe"
COMMITS = ("a" * 40, "b" * 40)  # main, then an older revision with other weights
PROMPT = [1, 5, 9, 2, 7]


def _cache_snapshot(cache: Path, repo: str, commit: str, source: Path, ref: str | None) -> None:
    """Put the files of `source` into the cache as snapshot `commit` of `repo`: each a
    symlink to its content-addressed blob, as huggingface_hub writes them."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hub_sources")
    folders = (root / "main", root / "old")
    for seed, folder in enumerate(folders):
        save_family("qwen3_moe", folder, seed=seed)
    return folders


@pytest.fixture()
def offline_home(tmp_path, monkeypatch, checkpoints) -> Path:
    """HF_HOME with REPO cached (refs/main -> COMMITS[0]; COMMITS[1] by hash only), offline."""
    home = tmp_path / "hf_home"
    for commit, folder, ref in zip(COMMITS, checkpoints, ("main", None)):
        _cache_snapshot(home / "hub", REPO, commit, folder, ref)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no folder named like the id under the working directory
    return home


def _logits(path: str | Path) -> torch.Tensor:
    with offload_rt.load(path, dtype="float32") as model:
        return model.logits(PROMPT)


def test_an_id_loads_the_snapshot_refs_main_names(offline_home, checkpoints):
    storage = offline_home / "hub" / f"models--{REPO.replace('/', '--')}"
    assert resolve_model(REPO) == storage / "snapshots" / COMMITS[0]
    torch.testing.assert_close(_logits(REPO), _logits(checkpoints[0]), rtol=0, atol=0)


def test_a_revision_picks_its_snapshot(offline_home, checkpoints):
    old = _logits(f"{REPO}@{COMMITS[1]}")
    torch.testing.assert_close(old, _logits(checkpoints[1]), rtol=0, atol=0)
    assert not torch.equal(old, _logits(REPO))


def test_a_missing_id_offline_is_an_error_naming_it(offline_home, capsys):
    with pytest.raises(HubError, match="tiny-org/absent-model.*HF_HUB_OFFLINE"):
        resolve_model("tiny-org/absent-model")
    with pytest.raises(OSError, match=f"{REPO}@v9"):
        offload_rt.load(f"{REPO}@v9")
    assert main(["generate", "tiny-org/absent-model", "--token-ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "offload-rt: error: tiny-org/absent-model is not a local folder" in err
    assert "Traceback" not in err


def test_the_cli_takes_an_id(offline_home, capsys):
    assert main(["generate", REPO, "--token-ids", "1,2,3", "--max-new-tokens", "2"]) == 0
    assert "tokens: 2 new" in capsys.readouterr().out


def test_a_local_folder_always_wins(offline_home, tmp_path, checkpoints):
    local = tmp_path / "tiny-org" / "tiny-qwen3-moe"  # the id's spelling, relative to the cwd
    local.parent.mkdir()
    local.symlink_to(checkpoints[1], target_is_directory=True)
    assert parse_hub_id(REPO) is None
    assert resolve_model(REPO) == Path(REPO)
    torch.testing.assert_close(_logits(REPO), _logits(checkpoints[1]), rtol=0, atol=0)


def test_what_is_an_id():
    assert parse_hub_id("Qwen/Qwen3-30B-A3B").repo == "Qwen/Qwen3-30B-A3B"
    assert parse_hub_id("Qwen/Qwen3-30B-A3B@refs/pr/1").revision == "refs/pr/1"
    for path in ("/abs/org/name", "./org/name", "~/org/name", "a/b/c", "name", "org/na me"):
        assert parse_hub_id(path) is None, path


def test_settings_come_from_the_environment_at_call_time():
    env = {"HF_HOME": "/h", "HF_TOKEN": "t", "HF_HUB_OFFLINE": "1"}
    assert HubSettings.from_env(env) == HubSettings(Path("/h/hub"), True, "t")
    env = {"HF_HOME": "/h", "HF_HUB_CACHE": "/c", "HF_HUB_OFFLINE": "0"}
    assert HubSettings.from_env(env) == HubSettings(Path("/c"), False, None)
