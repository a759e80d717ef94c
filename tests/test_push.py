"""``deltahub push`` against the in-process fake Hub, checked through the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

huggingface_hub = pytest.importorskip("huggingface_hub")

from click.testing import CliRunner  # noqa: E402
from huggingface_hub import HfApi, ModelCard, hf_hub_download  # noqa: E402
from huggingface_hub import constants as hf_constants  # noqa: E402
from safetensors import safe_open  # noqa: E402

from deltahub.cli import cli, exit_code_for  # noqa: E402
from deltahub.errors import HubAuthError, HubConnectionError, HubError, InputError  # noqa: E402
from deltahub.formats.manifest import parse_manifest  # noqa: E402
from hub_fixtures import FAKE_USER, hub_server, plant_repo  # noqa: E402,F401

REPO = f"{FAKE_USER}/tiny-delta"
BASE_REPO = "someone/tiny-base"
BASE_REV = "a" * 40


@pytest.fixture
def filled(store, model_dirs, hub_server):
    plant_repo(hub_server, BASE_REPO, BASE_REV)  # push checks that --base-repo exists
    dirs = model_dirs["llama"]
    store.add(dirs["base"], name="base")
    store.compress(dirs["ft"], base="base", name="ft")
    return store


def _commits(api: HfApi, revision: str = "main") -> list[str]:
    return [c.commit_id for c in api.list_repo_commits(REPO, revision=revision)]


def test_push_layout_card_and_hashes(filled, hub_server, tmp_path):
    result = filled.push("ft", REPO, base_repo=f"{BASE_REPO}@{BASE_REV}")
    assert result.uploaded and len(result.commit) == 40 and result.revision == "main"
    api = HfApi()
    tree = {f.path: f for f in api.list_repo_tree(REPO, recursive=True) if hasattr(f, "blob_id")}
    assert set(result.files) <= set(tree)
    assert {"deltahub.json", "README.md", "config.json", "tokenizer.json", "delta.safetensors"} <= set(result.files)
    assert result.bytes == sum(tree[f].size for f in result.files)
    # plain path for small files, LFS for the safetensors
    assert tree["deltahub.json"].lfs is None and tree["README.md"].lfs is None
    assert tree["delta.safetensors"].lfs is not None
    assert hub_server.count("PUT", r"^/_lfs/upload/") >= 1

    hub = json.loads(open(hf_hub_download(REPO, "deltahub.json", cache_dir=tmp_path / "c"), "rb").read())
    assert hub["format"] == "deltahub.hub" and hub["format_version"] == 1 and hub["kind"] == "delta"
    assert hub["base"]["hub"] == {"repo_id": BASE_REPO, "revision": BASE_REV}
    show = filled.show("ft")
    assert hub["manifest"] == show["manifest_id"]
    stored = parse_manifest(filled._ctx.objects.read(show["manifest_id"]))
    assert hub["base"]["tensors"] == stored.base.tensors
    codecs = set()
    for name, spec in hub["tensors"].items():
        codecs.add(spec["codec"])
        rec = stored.tensors[name]
        assert spec["shape"] == list(rec.shape) and spec["dtype"] == rec.dtype
        if spec["codec"] == "same":
            assert "file" not in spec
            continue
        assert spec["sha256"] == rec.object
        path = hf_hub_download(REPO, spec["file"], cache_dir=tmp_path / "c")
        with safe_open(path, framework="pt") as f:
            t = f.get_tensor(spec["key"])
        assert list(t.shape) == spec["stored_shape"]
        assert hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest() == spec["sha256"]
        if spec["codec"] == "sign1":
            assert spec["stored_dtype"] == "int32" and spec["stored_shape"][1] == -(-spec["shape"][1] // 32)
            assert isinstance(spec["scale"], float)
    assert codecs == {"sign1", "dense", "same"}
    for fname, info in hub["files"].items():
        data = open(hf_hub_download(REPO, fname, cache_dir=tmp_path / "c"), "rb").read()
        assert hashlib.sha256(data).hexdigest() == info["sha256"]

    card = ModelCard.load(REPO)
    assert card.data.base_model == BASE_REPO
    assert card.data.library_name == "deltahub"
    assert {"deltahub", "bitdelta", "llama"} <= set(card.data.tags)
    for needle in ("deltahub pull", "deltahub materialize", "deltahub.load_model"):
        assert needle in card.text


def test_push_twice_is_one_commit_and_deterministic(filled, hub_server):
    api = HfApi()
    first = filled.push("ft", REPO, base_repo=BASE_REPO)
    n = len(_commits(api))
    second = filled.push("ft", REPO, base_repo=BASE_REPO)
    assert not second.uploaded and second.commit is None and second.files == first.files
    assert len(_commits(api)) == n and _commits(api)[0] == first.commit
    # a different base pin changes deltahub.json and the card only
    third = filled.push("ft", REPO, base_repo=f"{BASE_REPO}@{BASE_REV}", message="pin the base")
    assert third.uploaded and sorted(third.changed) == ["README.md", "deltahub.json"]
    commits = api.list_repo_commits(REPO)
    assert commits[0].commit_id == third.commit and commits[0].title == "pin the base"


def test_sharding_and_stale_shards_deleted(filled, hub_server):
    api = HfApi()
    sharded = filled.push("ft", REPO, base_repo=BASE_REPO, max_shard_size="2kB")
    shards = [f for f in sharded.files if f.startswith("delta-")]
    assert len(shards) > 1 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    single = filled.push("ft", REPO, base_repo=BASE_REPO)
    assert single.uploaded and set(single.deleted) == set(shards)
    files = set(api.list_repo_files(REPO))
    assert "delta.safetensors" in files and not any(f.startswith("delta-") for f in files)


def test_refusals_upload_nothing(filled, hub_server):
    with pytest.raises(HubError, match="--base-repo"):
        filled.push("ft", REPO)
    with pytest.raises(InputError, match="with-base"):
        filled.push("base", REPO, base_repo=BASE_REPO)
    with pytest.raises(InputError):
        filled.push("ft", REPO, base_repo="x@")
    assert not HfApi().repo_exists(REPO)
    assert hub_server.count("POST", r"/api/repos/create") == 0


def test_revision_branch_and_private(filled, hub_server):
    api = HfApi()
    result = filled.push("ft", REPO, revision="dev", private=True, base_repo=BASE_REPO)
    assert result.revision == "dev" and result.uploaded
    assert api.model_info(REPO).private is True
    assert "deltahub.json" in api.list_repo_files(REPO, revision="dev")
    assert "deltahub.json" not in api.list_repo_files(REPO, revision="main")
    assert _commits(api, "dev")[0] == result.commit


def test_cli_push_json_and_text(filled, hub_server, home):
    runner = CliRunner()
    args = ["--home", str(home), "push", "ft", REPO, "--base-repo", f"{BASE_REPO}@{BASE_REV}"]
    res = runner.invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data) == {"repo_id", "revision", "commit", "uploaded", "files", "bytes"}
    assert data["uploaded"] is True and data["repo_id"] == REPO and data["bytes"] > 0
    res = runner.invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0 and "nothing pushed" in res.stdout

    res = runner.invoke(cli, ["--home", str(home), "push", "ft", REPO])
    assert res.exit_code == exit_code_for(HubError("x"))
    assert res.stderr.startswith("Error: ") and len(res.stderr.strip().splitlines()) == 1


def test_offline_mode_is_a_clear_error(filled, hub_server, home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubConnectionError, match="HF_HUB_OFFLINE"):
        filled.push("ft", REPO, base_repo=BASE_REPO)
    res = CliRunner().invoke(cli, ["--home", str(home), "push", "ft", REPO, "--base-repo", BASE_REPO])
    assert res.exit_code == exit_code_for(HubConnectionError("x")) == 14
    assert "HF_HUB_OFFLINE" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert hub_server.requests == []  # refused before any request


def test_bad_token_and_unreachable_hub(filled, hub_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubAuthError, match="token"):
        filled.push("ft", REPO, base_repo=BASE_REPO)
    monkeypatch.setenv("HF_TOKEN", hub_server.DEFAULT_TOKEN)
    url = hub_server.url
    hub_server.stop()
    with pytest.raises(HubConnectionError, match="cannot reach"):
        filled.push("ft", REPO, base_repo=BASE_REPO)
    assert url
