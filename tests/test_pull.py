"""``deltahub pull`` from the in-process fake Hub, through the real huggingface_hub client."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from click.testing import CliRunner  # noqa: E402
from huggingface_hub import CommitOperationAdd, HfApi  # noqa: E402
from huggingface_hub import constants as hf_constants  # noqa: E402

import deltahub  # noqa: E402
from conftest import snapshot_store  # noqa: E402
from deltahub.cli import cli, exit_code_for  # noqa: E402
from deltahub.errors import (  # noqa: E402
    CorruptObjectError,
    HubConnectionError,
    HubNotFoundError,
    InputError,
    NameExistsError,
    UnsupportedFormatError,
    WrongBaseError,
)
from hub_fixtures import FAKE_USER, hub_server, plant_repo  # noqa: E402,F401

REPO = f"{FAKE_USER}/tiny-delta"
BASE_REPO = "someone/tiny-base"
BASE_REV = "b" * 40
RESOLVES = r"/resolve/"


@pytest.fixture
def pushed(tmp_path, model_dirs, hub_server):
    """Store A: base + delta pushed to REPO. Returns (store A, push result)."""
    dirs = model_dirs["llama"]
    a = deltahub.Store(tmp_path / "store_a")
    a.add(dirs["base"], name="base")
    a.compress(dirs["ft"], base="base", name="ft")
    plant_repo(hub_server, BASE_REPO, BASE_REV)  # push checks that --base-repo exists ...
    result = a.push("ft", REPO, base_repo=f"{BASE_REPO}@{BASE_REV}")
    hub_server.state.repos.pop(("model", BASE_REPO))  # ... and the base is gone by the time of the pulls
    yield a, result
    a.close()


@pytest.fixture
def store_b(tmp_path, model_dirs):
    b = deltahub.Store(tmp_path / "store_b")
    b.add(model_dirs["llama"]["base"], name="base")
    yield b
    b.close()


def _same_tree(x: Path, y: Path) -> None:
    xs = sorted(p.relative_to(x) for p in x.rglob("*") if p.is_file())
    ys = sorted(p.relative_to(y) for p in y.rglob("*") if p.is_file())
    assert xs == ys and xs
    for rel in xs:
        assert filecmp.cmp(x / rel, y / rel, shallow=False), rel


def test_round_trip_materializes_identical_files(pushed, store_b, tmp_path, hub_server):
    a, pushed_result = pushed
    result = store_b.pull(REPO)
    assert result.name == "tiny-delta" and result.commit == pushed_result.commit and not result.already_stored
    assert result.manifest_id == a.show("ft")["manifest_id"] == store_b.show("tiny-delta")["manifest_id"]
    assert "README.md" not in result.downloaded and "delta.safetensors" in result.downloaded
    # every download was pinned to the commit id
    resolves = [p for m, p in hub_server.requests if m == "GET" and "/resolve/" in p]
    assert resolves and all(f"/resolve/{result.commit}/" in p for p in resolves)
    a.materialize("ft", tmp_path / "out_a")
    store_b.materialize("tiny-delta", tmp_path / "out_b")
    _same_tree(tmp_path / "out_a", tmp_path / "out_b")
    shown = store_b.show("tiny-delta", tensors=True)
    assert shown["kind"] == "delta"
    assert store_b.verify().ok

    # pulling again downloads nothing but deltahub.json, and changes nothing
    before = snapshot_store(tmp_path / "store_b")
    n = hub_server.count("GET", RESOLVES)
    again = store_b.pull(REPO)
    assert again.already_stored and again.downloaded == ["deltahub.json"]
    assert hub_server.count("GET", RESOLVES) - n <= 1
    assert hub_server.count("GET", r"/resolve/.*\.safetensors$") == 1
    assert snapshot_store(tmp_path / "store_b") == before

    # the same manifest under a second name is fine; a taken name is refused unless --force
    store_b.pull(REPO, name="copy")
    with pytest.raises(NameExistsError):
        store_b.pull(REPO, name="base")
    store_b.pull(REPO, name="base", force=True)
    assert store_b.show("base")["manifest_id"] == result.manifest_id


def test_pull_older_revision_by_commit_id(pushed, store_b, model_dirs, tmp_path, hub_server):
    a, first = pushed
    old_manifest = a.show("ft")["manifest_id"]
    a.compress(model_dirs["llama"]["ft"], base="base", name="ft", embeddings="dense", force=True)
    plant_repo(hub_server, BASE_REPO, BASE_REV)
    second = a.push("ft", REPO, base_repo=f"{BASE_REPO}@{BASE_REV}")
    assert second.uploaded and second.commit != first.commit
    new_manifest = a.show("ft")["manifest_id"]
    assert new_manifest != old_manifest

    old = store_b.pull(f"{REPO}@{first.commit}", name="old")
    assert old.commit == first.commit and old.manifest_id == old_manifest
    new = store_b.pull(REPO, name="new")
    assert new.commit == second.commit and new.manifest_id == new_manifest
    # the old version materializes exactly as store A's delta did then
    a.compress(model_dirs["llama"]["ft"], base="base", name="ft-old", embeddings="sign1")
    a.materialize("ft-old", tmp_path / "out_a")
    store_b.materialize("old", tmp_path / "out_b")
    _same_tree(tmp_path / "out_a", tmp_path / "out_b")


@pytest.mark.parametrize("path", ["delta.safetensors", "config.json"])
def test_tampered_file_is_detected_and_store_unchanged(pushed, store_b, tmp_path, hub_server, path):
    hub_server.tamper(REPO, path)
    before = snapshot_store(tmp_path / "store_b")
    with pytest.raises(CorruptObjectError) as info:
        store_b.pull(REPO)
    assert (path if path == "config.json" else "tensor") in str(info.value)
    assert snapshot_store(tmp_path / "store_b") == before


def test_missing_base_is_a_clear_error(pushed, tmp_path, hub_server):
    empty = deltahub.Store(tmp_path / "store_c")
    before = snapshot_store(tmp_path / "store_c")
    with pytest.raises(WrongBaseError) as info:
        empty.pull(REPO)
    assert f"{BASE_REPO}@{BASE_REV}" in str(info.value) and "deltahub add" in str(info.value)
    assert hub_server.count("GET", r"/resolve/.*\.safetensors$") == 0
    assert snapshot_store(tmp_path / "store_c") == before
    empty.close()


def _commit_file(repo: str, path: str, data: bytes) -> str:
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    return api.create_commit(repo, [CommitOperationAdd(path, data)], commit_message="edit").oid


def test_unknown_format_version_and_not_a_delta(pushed, store_b, tmp_path, hub_server):
    hub = json.loads(Path(huggingface_hub.hf_hub_download(REPO, "deltahub.json")).read_bytes())
    hub["format_version"] = 3  # the next version, unknown to this deltahub
    _commit_file(REPO, "deltahub.json", json.dumps(hub).encode())
    with pytest.raises(UnsupportedFormatError, match="version 3.*upgrade deltahub"):
        store_b.pull(REPO)
    hub["format_version"], hub["format"] = 1, "deltahub.other"
    _commit_file(REPO, "deltahub.json", json.dumps(hub).encode())
    with pytest.raises(UnsupportedFormatError, match="deltahub.other"):
        store_b.pull(REPO)
    hub["format"] = "deltahub.hub"
    hub["tensors"]["model.norm.weight"]["shape"] = [1]  # no longer rebuilds the pushed manifest
    _commit_file(REPO, "deltahub.json", json.dumps(hub).encode())
    with pytest.raises(CorruptObjectError, match="does not rebuild"):
        store_b.pull(REPO)

    _commit_file(f"{FAKE_USER}/plain", "config.json", b"{}")
    with pytest.raises(InputError, match="not a deltahub delta"):
        store_b.pull(f"{FAKE_USER}/plain")
    with pytest.raises(HubNotFoundError):
        store_b.pull(f"{FAKE_USER}/nope")
    with pytest.raises(HubNotFoundError, match="revision"):
        store_b.pull(f"{REPO}@no-such-branch")
    assert store_b.list()[0]["name"] == "base" and len(store_b.list()) == 1


def test_offline_and_unreachable(pushed, store_b, hub_server, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    n = len(hub_server.requests)
    with pytest.raises(HubConnectionError, match="HF_HUB_OFFLINE"):
        store_b.pull(REPO)
    assert len(hub_server.requests) == n
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    hub_server.stop()
    with pytest.raises(HubConnectionError, match="cannot reach"):
        store_b.pull(REPO)


def test_cli_pull_json_and_errors(pushed, store_b, tmp_path, hub_server):
    runner = CliRunner()
    home = str(tmp_path / "store_b")
    res = runner.invoke(cli, ["--home", home, "pull", REPO, "--name", "ft", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["name"] == "ft" and data["repo_id"] == REPO and data["revision"] == "main"
    assert len(data["commit"]) == 40 and data["already_stored"] is False and data["bytes"] > 0
    res = runner.invoke(cli, ["--home", home, "pull", REPO, "--name", "ft"], catch_exceptions=False)
    assert res.exit_code == 0 and "already stored" in res.stdout
    res = runner.invoke(cli, ["--home", home, "pull", f"{FAKE_USER}/nope"])
    assert res.exit_code == exit_code_for(HubNotFoundError("x"))
    assert res.stderr.startswith("Error: ") and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(cli, ["--home", str(tmp_path / "empty"), "pull", REPO])
    assert res.exit_code == exit_code_for(WrongBaseError("x"))
    assert "deltahub add" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert os.environ.get("HF_ENDPOINT") == hub_server.url
