"""``deltahub compress REPO_ID[@REVISION]``: a fine-tune fetched from the Hub like ``add`` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from click.testing import CliRunner  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402

import deltahub  # noqa: E402
from deltahub.cli import cli  # noqa: E402
from deltahub.errors import HubConnectionError, PickleCheckpointError  # noqa: E402
from hub_fixtures import FAKE_USER, hub_server  # noqa: E402,F401

FT = f"{FAKE_USER}/tiny-ft"
WEIGHTS_GETS = r"/resolve/.*/model\.safetensors$"


def _upload(folder: Path, repo: str = FT) -> str:
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    return api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="ft").oid


def test_compress_from_hub_equals_local(tmp_path, model_dirs, hub_server, monkeypatch):
    dirs = model_dirs["llama"]
    commit = _upload(dirs["ft"])
    with deltahub.Store(tmp_path / "s") as s:
        s.add(dirs["base"], name="base")
        local = s.compress(dirs["ft"], base="base", name="local")
        assert local.hub_repo_id is None and local.hub_revision is None
        res = s.compress(f"{FT}@{commit}", base="base", name="hub")
        assert res.manifest_id == local.manifest_id and res.codecs == local.codecs
        assert (res.hub_repo_id, res.hub_revision) == (FT, commit)
        # every download pinned to the commit, the weights fetched once
        fetched = [p for m, p in hub_server.requests if m == "GET" and "/resolve/" in p]
        assert fetched and all(f"/resolve/{commit}/" in p for p in fetched)
        assert hub_server.count("GET", WEIGHTS_GETS) == 1
        # by branch: the HF cache is reused, no new weight download
        assert s.compress(FT, base="base", name="hub-main").manifest_id == local.manifest_id
        assert hub_server.count("GET", WEIGHTS_GETS) == 1
        # offline: the cached snapshot, no request at all
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        before = len(hub_server.requests)
        off = s.compress(FT, base="base", name="offline")
        assert off.manifest_id == local.manifest_id and off.hub_revision == commit
        with pytest.raises(HubConnectionError, match="not in the HF cache"):
            s.compress(f"{FAKE_USER}/never-downloaded", base="base", name="x")
        assert len(hub_server.requests) == before
        assert "x" not in {m["name"] for m in s.list()}
        assert s.verify().ok


def test_cli_compress_from_hub_json(tmp_path, model_dirs, hub_server):
    dirs = model_dirs["gpt2"]
    commit = _upload(dirs["ft"])
    home = str(tmp_path / "s")
    runner = CliRunner()
    assert runner.invoke(cli, ["--home", home, "add", str(dirs["base"]), "--name", "base"]).exit_code == 0
    res = runner.invoke(cli, ["--home", home, "compress", str(dirs["ft"]), "--base", "base", "--name", "local", "--json"])
    assert res.exit_code == 0, res.output
    local = json.loads(res.stdout)
    res = runner.invoke(
        cli, ["--home", home, "compress", f"{FT}@main", "--base", "base", "--name", "hub", "--json"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["manifest_id"] == local["manifest_id"] and data["name"] == "hub"
    assert data["hub_repo_id"] == FT and data["hub_revision"] == commit
    assert local["hub_repo_id"] is None


def test_compress_from_pickle_only_repo_refused(tmp_path, model_dirs, hub_server):
    from huggingface_hub import CommitOperationAdd

    repo = f"{FAKE_USER}/pickled-ft"
    api = HfApi()
    api.create_repo(repo)
    api.create_commit(
        repo,
        [
            CommitOperationAdd("config.json", str(model_dirs["llama"]["ft"] / "config.json")),
            CommitOperationAdd("pytorch_model.bin", b"\x80\x04not really a pickle" * 100),
        ],
        commit_message="pickles",
    )
    with deltahub.Store(tmp_path / "s") as s:
        s.add(model_dirs["llama"]["base"], name="base")
        with pytest.raises(PickleCheckpointError, match="pytorch_model.bin"):
            s.compress(repo, base="base", name="ft")
        assert "ft" not in {m["name"] for m in s.list()}
    assert hub_server.count("GET", r"\.bin$") == 0
