"""Local folder or Hub repo? The one rule of :func:`deltahub.hub.source.resolve_source`, for ``add``,
``compress``, ``compress --calibrate`` and ``calibrate --finetune`` (local fake Hub)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from click.testing import CliRunner  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402

import deltahub  # noqa: E402
from conftest import snapshot_store  # noqa: E402
from deltahub.cli import cli, exit_code_for  # noqa: E402
from deltahub.errors import HubConnectionError, InputError  # noqa: E402
from deltahub.hub.source import EITHER, HUB, LOCAL, resolve_source, source_kind  # noqa: E402
from deltahub.ops.calibrate import resolve_finetune  # noqa: E402
from hub_fixtures import FAKE_USER, hub_server  # noqa: E402,F401

REPO = f"{FAKE_USER}/tiny-base"


def _upload(folder: Path, repo: str = REPO) -> str:
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    return api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="base").oid


def _hub_calls(server) -> list[tuple[str, str]]:
    return [(m, p) for m, p in server.requests if p.startswith("/api/") or "/resolve/" in p]


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("models/llama", EITHER),
        ("meta-llama/Llama-3.2-1B", EITHER),
        ("models/llama@main", HUB),
        ("gpt2@main", HUB),  # an explicit revision: a Hub repo without namespace
        ("org/name@refs/pr/1", HUB),
        ("./models/llama", LOCAL),
        ("../models/llama", LOCAL),
        ("/abs/models/llama", LOCAL),
        ("~/models/llama", LOCAL),
        ("models/llama/v2", LOCAL),  # more than one "/": a path
        ("models\\llama", LOCAL),
        ("plain", LOCAL),  # a bare name is a folder (NAME@main for a Hub repo without namespace)
        (".", LOCAL),
        ("models/llama@", LOCAL),  # no REPO_ID@REVISION
        ("a--b/c", LOCAL),  # not a repo id
    ],
)
def test_source_kind_rule(spec, kind):
    assert source_kind(spec) == kind


def test_existing_paths_and_path_objects_are_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "llama").mkdir(parents=True)
    assert source_kind("models/llama") == LOCAL  # exists: local, even though it reads as a repo id
    assert source_kind("models/llama@main") == HUB  # does not exist
    assert source_kind(Path("other/model")) == LOCAL  # a pathlib.Path is always a folder
    assert resolve_source(Path("other/model")) == resolve_source("./other/model")
    assert resolve_source("models/llama").path == Path("models/llama") and resolve_source("models/llama").hub is None


def test_a_mistyped_relative_path_is_an_error_naming_both_readings(tmp_path, model_dirs, hub_server, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with deltahub.Store(tmp_path / "store") as store:
        store.add(model_dirs["llama"]["base"], name="base")
        before = snapshot_store(store.home)
        for call in (
            lambda: store.add("models/llama"),
            lambda: store.compress("models/llama", base="base", name="ft"),
            lambda: store.compress("models/llama", base="base", name="ft", calibrate=True),
            lambda: resolve_finetune(store._ctx, "models/llama"),
        ):
            with pytest.raises(InputError) as err:
                call()
            text = str(err.value)
            assert "no folder 'models/llama'" in text and "no Hub repo models/llama" in text, text
            assert "./PATH" in (err.value.hint or "") and "HF_TOKEN" in (err.value.hint or "")
        assert snapshot_store(store.home) == before
    # the Hub was asked whether the repo exists, and nothing was downloaded
    assert hub_server.count("GET", r"^/api/models/models/llama") >= 1
    assert hub_server.count("GET", r"/resolve/") == 0


def test_a_private_repo_without_token_names_both_readings_and_how_to_log_in(tmp_path, model_dirs, hub_server, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub_server.create_repo(f"{FAKE_USER}/secret", private=True)
    monkeypatch.delenv("HF_TOKEN")
    with deltahub.Store(tmp_path / "store") as store:
        with pytest.raises(InputError, match=f"no Hub repo {FAKE_USER}/secret") as err:
            store.add(f"{FAKE_USER}/secret")
    assert "not visible with your token" in str(err.value) and "HF_TOKEN" in (err.value.hint or "")


def test_explicit_local_paths_never_reach_the_hub(tmp_path, model_dirs, hub_server, monkeypatch):
    """./NAMESPACE/NAME names a folder even when the Hub has that repo: no request, a local error."""
    _upload(model_dirs["llama"]["base"])
    monkeypatch.chdir(tmp_path)
    before = len(_hub_calls(hub_server))
    with deltahub.Store(tmp_path / "store") as store:
        for spec in (f"./{REPO}", f"{REPO}/extra", f"../{REPO}"):
            with pytest.raises(InputError, match="no such checkpoint directory"):
                store.add(spec)
        with pytest.raises(InputError, match="no such checkpoint directory"):
            store.add(Path(REPO))  # a Path from Python: a folder
    assert len(_hub_calls(hub_server)) == before
    # the CLI keeps what was typed: ./ means a folder there too
    res = CliRunner().invoke(cli, ["--home", str(tmp_path / "store"), "add", f"./{REPO}"])
    assert res.exit_code == exit_code_for(InputError("x")), res.output
    assert "no such checkpoint directory" in res.stderr
    assert len(_hub_calls(hub_server)) == before


def test_an_existing_folder_wins_over_the_hub_repo(tmp_path, model_dirs, hub_server, monkeypatch):
    _upload(model_dirs["llama"]["base"])
    monkeypatch.chdir(tmp_path)
    shutil.copytree(model_dirs["gpt2"]["base"], tmp_path / REPO)
    before = len(_hub_calls(hub_server))
    with deltahub.Store(tmp_path / "store") as store:
        local = store.add(REPO, name="local")
        assert local.hub_repo_id is None
        assert local.manifest_id == store.add(model_dirs["gpt2"]["base"], name="same").manifest_id
        # the repo exists on the Hub: without the folder, the same spec is the Hub repo
        hub = store.add(f"{REPO}@main", name="hub")
        assert hub.hub_repo_id == REPO and hub.manifest_id != local.manifest_id
    assert len(_hub_calls(hub_server)) > before
    # and through the CLI, by its bare NAMESPACE/NAME once the folder is gone
    shutil.rmtree(tmp_path / FAKE_USER)
    res = CliRunner().invoke(cli, ["--home", str(tmp_path / "store2"), "add", REPO])
    assert res.exit_code == 0, res.output


def test_offline_and_not_cached_names_both_readings(tmp_path, model_dirs, monkeypatch):
    """Offline (the tests' default), a NAMESPACE/NAME that is neither a folder nor cached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with deltahub.Store(tmp_path / "store") as store:
        with pytest.raises(HubConnectionError) as err:
            store.add("models/llama")
    text = str(err.value)
    assert "no folder 'models/llama'" in text and "not in the HF cache" in text and "HF_HUB_OFFLINE" in text
    with deltahub.Store(tmp_path / "store") as store:  # an explicit revision: the Hub reading only
        with pytest.raises(HubConnectionError, match="not in the HF cache") as err:
            store.add("models/llama@main")
    assert "no folder" not in str(err.value)
