"""Tests of the fake Hub (tests/hub_server.py) driven by the REAL huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import types

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub import constants as hf_constants  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url  # noqa: E402

from hub_fixtures import FAKE_USER, hub_server  # noqa: E402,F401
from hub_server import HubServer, git_blob_sha1  # noqa: E402

REPO = f"{FAKE_USER}/tiny"
CONFIG = json.dumps({"model_type": "llama", "hidden_size": 8}).encode()
BIG = bytes(range(256)) * 4500 + b"tail"  # ~1.1 MiB => LFS path


@pytest.fixture
def fast_sleep(monkeypatch):
    """Make the client's retry back-off instantaneous; records the requested sleeps."""
    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    slept: list[float] = []
    fake = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake.sleep = slept.append
    monkeypatch.setattr(_http, "time", fake)
    monkeypatch.setattr(file_download, "time", fake)
    return slept


@pytest.fixture(params=["xet-env-unset", "xet-env-set"])
def xet_env(request, monkeypatch):
    """Caller's environment before the hub fixture: HF_HUB_DISABLE_XET unset or set."""
    if request.param == "xet-env-set":
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    else:
        monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", False)
    return request.param


def _push_initial(api: HfApi, repo_id: str = REPO, **kw) -> str:
    api.create_repo(repo_id, **kw)
    info = api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("config.json", CONFIG),
            CommitOperationAdd("weights/model.safetensors", BIG),
        ],
        commit_message="first",
    )
    return info.oid


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --------------------------------------------------------------------------- round trip


def test_roundtrip_regular_and_lfs(xet_env, hub_server, tmp_path):
    from huggingface_hub.utils._runtime import is_package_available, is_xet_available

    # hf_xet may well be installed; the fixture must force the plain LFS path anyway.
    assert not is_xet_available()
    assert os.environ["HF_ENDPOINT"] == hub_server.url
    api = HfApi()
    oid = _push_initial(api)
    assert len(oid) == 40

    # regular file went inline in the NDJSON commit, big one through LFS batch + PUT + verify
    assert hub_server.count("POST", r"/info/lfs/objects/batch$") == 1
    assert hub_server.count("PUT", r"^/_lfs/upload/") == 1
    assert hub_server.count("POST", r"/info/lfs/objects/verify$") == 1
    assert hub_server.count("GET", r"xet-") == 0 and hub_server.count("POST", r"xet-") == 0
    tree = {f.path: f for f in api.list_repo_tree(REPO, recursive=True) if hasattr(f, "blob_id")}
    assert tree["config.json"].lfs is None
    assert tree["config.json"].blob_id == git_blob_sha1(CONFIG)
    assert tree["weights/model.safetensors"].lfs.sha256 == hashlib.sha256(BIG).hexdigest()
    assert tree["weights/model.safetensors"].size == len(BIG)

    cache = tmp_path / "fresh-cache"
    p_cfg = hf_hub_download(REPO, "config.json", cache_dir=cache)
    p_big = hf_hub_download(REPO, "weights/model.safetensors", cache_dir=cache)
    assert open(p_cfg, "rb").read() == CONFIG
    assert open(p_big, "rb").read() == BIG
    assert oid in p_big  # cached under snapshots/<commit>

    snap = snapshot_download(REPO, cache_dir=tmp_path / "snap-cache")
    assert open(os.path.join(snap, "weights", "model.safetensors"), "rb").read() == BIG
    assert sorted(os.listdir(snap)) == [".gitattributes", "config.json", "weights"]
    assert is_package_available("hf_xet") in (True, False)  # documented: either way works
    assert hub_server.errors == []


def test_upload_folder_uses_lfs_path(xet_env, hub_server, tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_bytes(CONFIG)
    (folder / "sub" / "model.safetensors").write_bytes(BIG)
    api = HfApi()
    api.create_repo(REPO)
    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="folder")
    assert hub_server.count("PUT", r"^/_lfs/upload/") == 1
    out = tmp_path / "local"
    snapshot_download(REPO, local_dir=out, cache_dir=tmp_path / "c")
    assert (out / "sub" / "model.safetensors").read_bytes() == BIG
    assert (out / "config.json").read_bytes() == CONFIG
    assert api.model_info(REPO).sha == info.oid


def test_history_refs_tree_commits_and_old_revision(hub_server, tmp_path):
    api = HfApi()
    first = _push_initial(api)
    new_cfg = b'{"model_type": "llama", "hidden_size": 16}'
    second = api.create_commit(
        REPO,
        operations=[CommitOperationAdd("config.json", new_cfg), CommitOperationAdd("extra/notes.txt", b"hi")],
        commit_message="second",
        commit_description="more",
        parent_commit=first,
    ).oid
    assert second != first

    # old revision by commit id, new by branch name
    cache = tmp_path / "c"
    assert open(hf_hub_download(REPO, "config.json", revision=first, cache_dir=cache), "rb").read() == CONFIG
    assert open(hf_hub_download(REPO, "config.json", cache_dir=cache), "rb").read() == new_cfg
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "extra/notes.txt", revision=first, cache_dir=tmp_path / "c2")

    refs = api.list_repo_refs(REPO)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", second)]

    commits = api.list_repo_commits(REPO)
    assert [c.commit_id for c in commits[:2]] == [second, first]
    assert commits[0].title == "second" and commits[0].message == "more"
    assert commits[-1].title == "initial commit"

    files = set(api.list_repo_files(REPO))
    assert files == {".gitattributes", "config.json", "weights/model.safetensors", "extra/notes.txt"}
    top = {e.path for e in api.list_repo_tree(REPO)}
    assert top == {".gitattributes", "config.json", "weights", "extra"}
    assert {e.path for e in api.list_repo_tree(REPO, path_in_repo="weights")} == {"weights/model.safetensors"}
    assert {e.path for e in api.list_repo_tree(REPO, revision=first, recursive=True)} >= {"weights/model.safetensors"}

    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == second
    sib = {s.rfilename: s for s in info.siblings}
    assert sib["weights/model.safetensors"].lfs.sha256 == hashlib.sha256(BIG).hexdigest()
    assert api.model_info(REPO, revision=first).sha == first
    assert api.repo_info(REPO, revision=first).sha == first

    paths = api.get_paths_info(REPO, ["config.json", "weights", "missing"])
    assert {p.path for p in paths} == {"config.json", "weights"}
    assert api.file_exists(REPO, "config.json") and not api.file_exists(REPO, "nope.json")

    # stale parent commit is refused
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_commit(REPO, operations=[CommitOperationAdd("x", b"x")], commit_message="x", parent_commit=first)
    assert exc.value.response.status_code == 412

    # deletion
    third = api.create_commit(
        REPO, operations=[CommitOperationDelete("extra/")], commit_message="rm"
    ).oid
    assert "extra/notes.txt" not in api.list_repo_files(REPO, revision=third)


def test_create_repo_conflict_branches_and_tags(hub_server, tmp_path):
    api = HfApi()
    url = api.create_repo(REPO)
    assert url.repo_id == REPO
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo(REPO)
    assert exc.value.response.status_code == 409
    api.create_repo(REPO, exist_ok=True)  # no error

    api.create_branch(REPO, branch="dev")
    with pytest.raises(HfHubHTTPError):
        api.create_branch(REPO, branch="dev")
    api.create_branch(REPO, branch="dev", exist_ok=True)
    dev = api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id=REPO, revision="dev").oid
    api.create_tag(REPO, tag="v1", revision="dev")
    refs = api.list_repo_refs(REPO)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", dev)]
    assert "dev.txt" not in api.list_repo_files(REPO)
    assert open(hf_hub_download(REPO, "dev.txt", revision="v1", cache_dir=tmp_path / "c"), "rb").read() == b"dev only"
    api.delete_branch(REPO, branch="dev")
    assert {b.name for b in api.list_repo_refs(REPO).branches} == {"main"}
    api.delete_repo(REPO)
    assert not api.repo_exists(REPO)


# --------------------------------------------------------------------------- errors and auth


def test_missing_repo_revision_file_raise_specific_errors(hub_server, tmp_path):
    api = HfApi()
    _push_initial(api)
    cache = tmp_path / "c"
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{FAKE_USER}/nope", "config.json", cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{FAKE_USER}/nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch", cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="0" * 40, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.bin", cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="no-such-branch", cache_dir=cache)
    assert not api.repo_exists(f"{FAKE_USER}/nope")
    assert not api.revision_exists(REPO, "nope")


def test_private_repo_requires_token(hub_server, tmp_path, monkeypatch):
    api = HfApi()
    _push_initial(api, private=True)
    assert api.model_info(REPO).private is True
    # authenticated owner can read
    assert open(hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "a"), "rb").read() == CONFIG

    # anonymous: the Hub answers 401 + RepoNotFound => RepositoryNotFoundError
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RepositoryNotFoundError) as exc:
        HfApi(token=False).model_info(REPO)
    assert exc.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "b", token=False)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(REPO, cache_dir=tmp_path / "b2", token=False)
    # anonymous writes are refused too
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=REPO)

    # an unknown token => 401 "Invalid credentials" => plain HfHubHTTPError (not RepositoryNotFound)
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(token="hf_wrong").model_info(REPO)
    assert exc.value.response.status_code == 401
    assert not isinstance(exc.value, RepositoryNotFoundError)

    # another valid user sees 404 RepoNotFound
    hub_server.state.tokens["hf_other"] = "other"
    with pytest.raises(RepositoryNotFoundError) as exc:
        HfApi(token="hf_other").model_info(REPO)
    assert exc.value.response.status_code == 404


# --------------------------------------------------------------------------- faults


def test_fault_500_retried_then_succeeds(hub_server, fast_sleep):
    api = HfApi()
    api.create_repo(REPO)
    hub_server.faults.fail(r"/preupload/", times=2)
    hub_server.faults.fail(r"^/_lfs/upload/", times=1, method="PUT")
    oid = api.create_commit(
        REPO, operations=[CommitOperationAdd("model.safetensors", BIG)], commit_message="retry"
    ).oid
    assert hub_server.count("POST", r"/preupload/") == 3
    assert hub_server.count("PUT", r"^/_lfs/upload/") == 2
    assert len(fast_sleep) == 3
    assert api.model_info(REPO).sha == oid


def test_fault_500_persistent_fails_clearly(hub_server, fast_sleep):
    api = HfApi()
    api.create_repo(REPO)
    rule = hub_server.faults.fail(r"/preupload/", times=50)
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_commit(REPO, operations=[CommitOperationAdd("a.json", b"{}")], commit_message="x")
    assert exc.value.response.status_code == 500
    assert rule.hits == 6  # 1 try + 5 retries, bounded
    # non-retried route: commit endpoint
    hub_server.faults.clear()
    hub_server.faults.fail(r"/commit/main$", times=1)
    with pytest.raises(HfHubHTTPError):
        api.create_commit(REPO, operations=[CommitOperationAdd("a.json", b"{}")], commit_message="x")
    api.create_commit(REPO, operations=[CommitOperationAdd("a.json", b"{}")], commit_message="x")


def test_fault_500_on_download_head(hub_server, fast_sleep, tmp_path):
    api = HfApi()
    _push_initial(api)
    hub_server.faults.fail(r"/resolve/main/config\.json$", times=2, method="HEAD")
    p = hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "c")
    assert open(p, "rb").read() == CONFIG
    hub_server.faults.fail(r"/resolve/main/config\.json$", times=50, method="HEAD")
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "c2")


def test_fault_dropped_connection_resumes(hub_server, fast_sleep, tmp_path):
    api = HfApi()
    _push_initial(api)
    rule = hub_server.faults.drop_connection(r"/resolve/.*/model\.safetensors$", times=2)
    p = hf_hub_download(REPO, "weights/model.safetensors", cache_dir=tmp_path / "c")
    assert open(p, "rb").read() == BIG
    assert rule.hits == 2
    assert hub_server.count("GET", r"/resolve/.*/model\.safetensors$") == 3


def test_fault_dropped_connection_gives_up(hub_server, fast_sleep, tmp_path):
    api = HfApi()
    _push_initial(api)
    hub_server.faults.drop_connection(r"/resolve/.*/config\.json$", times=100, keep_bytes=0)
    with pytest.raises(Exception) as exc:
        hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "c")
    assert "RemoteProtocolError" in type(exc.value).__name__ or isinstance(exc.value, OSError)
    assert hub_server.count("GET", r"/resolve/.*/config\.json$") <= 7  # client retry loop is bounded


@pytest.mark.parametrize("filename", ["config.json", "weights/model.safetensors"])
def test_fault_truncated_body_raises(hub_server, tmp_path, filename):
    api = HfApi()
    _push_initial(api)
    hub_server.faults.truncate(r"/resolve/", times=1)
    with pytest.raises(OSError, match="Consistency check failed"):
        hf_hub_download(REPO, filename, cache_dir=tmp_path / "c")
    # nothing corrupt left in the cache: a retry gets the right bytes
    p = hf_hub_download(REPO, filename, cache_dir=tmp_path / "c")
    assert open(p, "rb").read() == (CONFIG if filename == "config.json" else BIG)


def test_fault_tampered_lfs_file_detectable_by_sha256(hub_server, tmp_path):
    api = HfApi()
    _push_initial(api)
    hub_server.tamper(REPO, "weights/model.safetensors")
    # the client itself does not hash downloads: it returns the tampered bytes...
    p = hf_hub_download(REPO, "weights/model.safetensors", cache_dir=tmp_path / "c")
    data = open(p, "rb").read()
    assert len(data) == len(BIG) and data != BIG
    # ...but a caller comparing with the advertised ETag / tree sha256 sees the mismatch
    meta = get_hf_file_metadata(hf_hub_url(REPO, "weights/model.safetensors"))
    assert meta.etag == hashlib.sha256(BIG).hexdigest()
    assert _sha256(p) != meta.etag
    (entry,) = api.get_paths_info(REPO, ["weights/model.safetensors"])
    assert entry.lfs.sha256 == meta.etag
    # regular files: ETag is the git blob sha1
    hub_server.tamper(REPO, "config.json", b'{"evil": 1}')
    p = hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "c3")
    assert git_blob_sha1(open(p, "rb").read()) != get_hf_file_metadata(hf_hub_url(REPO, "config.json")).etag


# --------------------------------------------------------------------------- protocol details


def test_resolve_headers_and_ranges(hub_server):
    import httpx2

    api = HfApi()
    first = _push_initial(api)
    url = hub_server.resolve_url(REPO, "weights/model.safetensors")
    with httpx2.Client() as client:
        head = client.head(url)
        assert head.status_code == 200
        assert head.headers["X-Repo-Commit"] == first
        assert head.headers["X-Linked-Etag"].strip('"') == hashlib.sha256(BIG).hexdigest()
        assert int(head.headers["X-Linked-Size"]) == len(BIG)
        assert int(head.headers["Content-Length"]) == len(BIG)
        r = client.get(url, headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == BIG[10:20]
        assert r.headers["Content-Range"] == f"bytes 10-19/{len(BIG)}"
        r = client.get(url, headers={"Range": "bytes=-4"})
        assert r.content == b"tail"
        r = client.get(url, headers={"Range": f"bytes={len(BIG)}-"})
        assert r.status_code == 416
        r = client.get(hub_server.resolve_url(REPO, "config.json", revision=first))
        assert r.content == CONFIG and r.headers["ETag"].strip('"') == git_blob_sha1(CONFIG)
        r = client.get(hub_server.resolve_url(REPO, "missing"))
        assert r.status_code == 404 and r.headers["X-Error-Code"] == "EntryNotFound"
        assert r.headers["X-Repo-Commit"] == first
        # Xet endpoints are explicitly unsupported
        r = client.get(f"{hub_server.url}/api/models/{REPO}/xet-write-token/main")
        assert r.status_code == 501


def test_lfs_put_verifies_sha_and_size(hub_server):
    import httpx2

    api = HfApi()
    api.create_repo(REPO)
    oid = hashlib.sha256(b"payload").hexdigest()
    with httpx2.Client(headers={"Authorization": f"Bearer {HubServer.DEFAULT_TOKEN}"}) as client:
        batch = client.post(
            f"{hub_server.url}/{REPO}.git/info/lfs/objects/batch",
            json={"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": 7}]},
        ).json()
        href = batch["objects"][0]["actions"]["upload"]["href"]
        assert client.put(href, content=b"payloaX").status_code == 400  # sha mismatch
        assert client.put(href, content=b"payload!").status_code == 400  # size mismatch
        assert client.put(href, content=b"payload").status_code == 200
        assert client.put(href, content=b"payload").status_code == 403  # ticket consumed
        again = client.post(
            f"{hub_server.url}/{REPO}.git/info/lfs/objects/batch",
            json={"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": 7}]},
        ).json()
        assert "actions" not in again["objects"][0]  # already present => client skips upload
        # a commit may not reference an LFS object that was never uploaded
        body = "\n".join(
            json.dumps(x)
            for x in [
                {"key": "header", "value": {"summary": "s"}},
                {"key": "lfsFile", "value": {"path": "f.bin", "algo": "sha256", "oid": "a" * 64, "size": 3}},
            ]
        )
        r = client.post(f"{hub_server.url}/api/models/{REPO}/commit/main", content=body)
        assert r.status_code == 400


def test_server_stops_cleanly_without_leaks(tmp_path):
    before = {t.ident for t in threading.enumerate()}
    server = HubServer().start()
    port = int(server.url.rsplit(":", 1)[1])
    # leave a keep-alive connection open: stop() must not hang on it
    idle = socket.create_connection(("127.0.0.1", port))
    idle.sendall(b"GET /api/models/a/b HTTP/1.1\r\nHost: x\r\n\r\n")
    idle.recv(4096)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 3
    idle.close()
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert leaked == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5)
    server.stop()  # idempotent


def test_xet_path_fails_fast_if_fixture_switch_bypassed(hub_server, monkeypatch):
    """With hf_xet installed and HF_HUB_DISABLE_XET forced back off, the client tries Xet:
    the fake Hub answers 501 on the xet token route, so the upload fails at once and clearly."""
    from huggingface_hub.utils._runtime import is_package_available

    if not is_package_available("hf_xet"):
        pytest.skip("hf_xet not installed: the client can only use the LFS path")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", False)
    api = HfApi()
    api.create_repo(REPO)
    with pytest.raises(Exception, match="xet-write-token"):
        api.create_commit(REPO, operations=[CommitOperationAdd("m.safetensors", BIG)], commit_message="c")
    assert hub_server.count("GET", r"/xet-write-token/") >= 1
    assert hub_server.count("PUT", r"^/_lfs/upload/") == 0
