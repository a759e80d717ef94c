"""Bases from the Hub: ``deltahub add REPO_ID[@REVISION]`` and the base step of ``deltahub pull``."""

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
from deltahub.cli import cli  # noqa: E402
from deltahub.errors import HubConnectionError, PickleCheckpointError, WrongBaseError  # noqa: E402
from deltahub.hub.source import EITHER, HUB, LOCAL, source_kind  # noqa: E402
from hub_fixtures import FAKE_USER, hub_server  # noqa: E402,F401

BASE = f"{FAKE_USER}/tiny-base"
DELTA = f"{FAKE_USER}/tiny-delta"
WEIGHTS_GETS = r"/resolve/.*/model\.safetensors$"


def _upload_base(folder: Path, repo: str = BASE) -> str:
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    return api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="base").oid


def _fresh_hf_cache(monkeypatch, path: Path) -> None:
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.setattr(hf_constants, name, str(path))
    monkeypatch.setenv("HF_HUB_CACHE", str(path))


def _same_tree(x: Path, y: Path) -> None:
    xs = sorted(p.relative_to(x) for p in x.rglob("*") if p.is_file())
    assert xs == sorted(p.relative_to(y) for p in y.rglob("*") if p.is_file()) and xs
    for rel in xs:
        assert filecmp.cmp(x / rel, y / rel, shallow=False), rel


def test_looks_like_hub_id(tmp_path):
    assert source_kind("meta-llama/Llama-3.2-1B") == EITHER and source_kind("a/b@main") == HUB
    assert source_kind("./a/b") == source_kind("/abs/dir") == source_kind("plain") == LOCAL
    (tmp_path / "x").mkdir()
    assert source_kind(tmp_path / "x") == LOCAL and source_kind(str(tmp_path / "x")) == LOCAL


def test_add_from_hub_records_source_and_uses_cache(tmp_path, model_dirs, hub_server, monkeypatch):
    folder = model_dirs["llama"]["base"]
    commit = _upload_base(folder)
    with deltahub.Store(tmp_path / "a") as a:
        local = a.add(folder, name="local")
        res = a.add(f"{BASE}@{commit}", name="hubbase")
        assert (res.hub_repo_id, res.hub_revision) == (BASE, commit)
        assert res.manifest_id == local.manifest_id  # the same bytes give the same base
        assert a.show("hubbase")["info"]["hub"] == {"repo_id": BASE, "revision": commit}
        # only what open_checkpoint needs was fetched, pinned to the commit
        fetched = [p for m, p in hub_server.requests if m == "GET" and "/resolve/" in p]
        assert fetched and all(f"/resolve/{commit}/" in p for p in fetched)
        assert hub_server.count("GET", WEIGHTS_GETS) == 1
    # a second store reuses the HF cache: no new weight download (default name: the repo's name part)
    with deltahub.Store(tmp_path / "b") as b:
        assert b.add(BASE).name == "tiny-base"
        assert hub_server.count("GET", WEIGHTS_GETS) == 1
    # offline: the cached snapshot is used, without any request
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub_server.requests)
    with deltahub.Store(tmp_path / "c") as c:
        res = c.add(BASE, name="off")
        assert res.hub_revision == commit and c.show("off")["info"]["hub"]["revision"] == commit
        assert c.add(f"{BASE}@{commit}", name="off2").manifest_id == res.manifest_id
        with pytest.raises(HubConnectionError, match="not in the HF cache"):
            c.add(f"{FAKE_USER}/never-downloaded", name="x")
    assert len(hub_server.requests) == before


def test_cli_add_from_hub(tmp_path, model_dirs, hub_server):
    commit = _upload_base(model_dirs["gpt2"]["base"])
    res = CliRunner().invoke(
        cli, ["--home", str(tmp_path / "s"), "add", f"{BASE}@main", "--json"], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["name"] == "tiny-base" and data["hub_repo_id"] == BASE and data["hub_revision"] == commit


def test_full_flow_push_without_base_repo_and_pull_fetches_base(tmp_path, model_dirs, hub_server, monkeypatch):
    dirs = model_dirs["llama"]
    commit = _upload_base(dirs["base"])
    with deltahub.Store(tmp_path / "a") as a:
        a.add(f"{BASE}@{commit}", name="base")
        a.compress(dirs["ft"], base="base", name="ft")
        a.push("ft", DELTA)  # no --base-repo: the index knows where the base lives
        hub = json.loads(Path(huggingface_hub.hf_hub_download(DELTA, "deltahub.json")).read_bytes())
        assert hub["base"]["hub"] == {"repo_id": BASE, "revision": commit}
        a.materialize("ft", tmp_path / "out_a")
    _fresh_hf_cache(monkeypatch, tmp_path / "hf_cache_b")
    weights_before = hub_server.count("GET", WEIGHTS_GETS)
    with deltahub.Store(tmp_path / "b") as b:
        result = b.pull(DELTA)
        assert result.base_fetched == "tiny-base" and result.name == "tiny-delta"
        assert hub_server.count("GET", WEIGHTS_GETS) == weights_before + 1  # fresh cache: downloaded again
        assert b.show("tiny-base")["info"]["hub"] == {"repo_id": BASE, "revision": commit}
        b.materialize("tiny-delta", tmp_path / "out_b")
        assert b.verify().ok
    _same_tree(tmp_path / "out_a", tmp_path / "out_b")
    assert os.path.isdir(tmp_path / "hf_cache_b")


def test_pull_with_wrong_base_revision_names_both_and_stores_no_delta(tmp_path, model_dirs, hub_server, monkeypatch):
    dirs = model_dirs["llama"]
    first = _upload_base(dirs["base"])
    with deltahub.Store(tmp_path / "a") as a:
        a.add(dirs["base"], name="base")
        a.compress(dirs["ft"], base="base", name="ft")
        a.push("ft", DELTA, base_repo=f"{BASE}@main")
    # main moves on to other tensors
    other = HfApi().create_commit(
        BASE,
        [CommitOperationAdd("model.safetensors", str(dirs["ft"] / "model.safetensors"))],
        commit_message="retrain",
    ).oid
    assert other != first
    with deltahub.Store(tmp_path / "b") as b:
        b.add(model_dirs["gpt2"]["base"], name="tiny-base")  # the default name is taken
        with pytest.raises(WrongBaseError) as info:
            b.pull(DELTA)
        text = str(info.value)
        assert f"{BASE}@main" in text and f"{BASE}@{other}" in text
        assert "not stored" in text and "'tiny-base-2'" in text
        names = {m["name"] for m in b.list()}
        assert "tiny-delta" not in names and "tiny-base-2" in names
        assert b.show("tiny-base-2")["info"]["hub"]["revision"] == other


def test_pickle_only_repo_is_refused_without_downloading_pickles(tmp_path, model_dirs, hub_server):
    repo = f"{FAKE_USER}/pickled"
    api = HfApi()
    api.create_repo(repo)
    api.create_commit(
        repo,
        [
            CommitOperationAdd("config.json", str(model_dirs["llama"]["base"] / "config.json")),
            CommitOperationAdd("pytorch_model.bin", b"\x80\x04not really a pickle" * 100),
        ],
        commit_message="pickles",
    )
    with deltahub.Store(tmp_path / "s") as s:
        before = snapshot_store(tmp_path / "s")
        with pytest.raises(PickleCheckpointError, match="pytorch_model.bin"):
            s.add(repo)
        assert snapshot_store(tmp_path / "s") == before
    assert hub_server.count("GET", r"\.bin$") == 0


def test_base_without_revision_is_fetched_from_main_and_checked(tmp_path, model_dirs, hub_server, monkeypatch):
    """``push --base-repo REPO_ID`` (no revision): pull tries the base's main branch, and a main that
    moved on to other weights is refused naming both, with no delta stored."""
    dirs = model_dirs["llama"]
    _upload_base(dirs["base"])
    with deltahub.Store(tmp_path / "a") as a:
        a.add(dirs["base"], name="base")
        a.compress(dirs["ft"], base="base", name="ft")
        a.push("ft", DELTA, base_repo=BASE)  # no @REVISION
        hub = json.loads(Path(huggingface_hub.hf_hub_download(DELTA, "deltahub.json")).read_bytes())
        assert hub["base"]["hub"] == {"repo_id": BASE, "revision": None}
    _fresh_hf_cache(monkeypatch, tmp_path / "hf_b")
    with deltahub.Store(tmp_path / "b") as b:
        assert b.pull(DELTA).base_fetched == "tiny-base"
    # main now holds other weights: refused, naming both revisions
    _upload_base(dirs["ft"])
    _fresh_hf_cache(monkeypatch, tmp_path / "hf_c")
    with deltahub.Store(tmp_path / "c") as c:
        with pytest.raises(WrongBaseError, match=f"{BASE}@main") as err:
            c.pull(DELTA)
        assert "does not match" in err.value.message
        assert "tiny-delta" not in [r["name"] for r in c.list()]
