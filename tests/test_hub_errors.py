"""The Hub errors of issue 3 through the real client: each a one-line message with the fix, and the
store unchanged."""

from __future__ import annotations

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from click.testing import CliRunner  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402

import deltahub  # noqa: E402
from conftest import snapshot_store  # noqa: E402
from deltahub.cli import cli, exit_code_for  # noqa: E402
from deltahub.errors import HubAuthError, HubNotFoundError  # noqa: E402
from hub_fixtures import FAKE_USER, hub_server, plant_repo  # noqa: E402,F401

PRIVATE = f"{FAKE_USER}/private-delta"
GATED = "gatekeeper/gated-base"


@pytest.fixture
def published(tmp_path, model_dirs, hub_server):
    """A private delta repo and a gated base repo (owned by another account) on the fake Hub."""
    dirs = model_dirs["llama"]
    with deltahub.Store(tmp_path / "a") as a:
        a.add(dirs["base"], name="base")
        a.compress(dirs["ft"], base="base", name="ft")
        plant_repo(hub_server, "someone/base", "c" * 40)  # push checks that --base-repo exists
        a.push("ft", PRIVATE, private=True, base_repo="someone/base@" + "c" * 40)
    repo = hub_server.create_repo(GATED)
    repo.gated = True
    hub_server.state.tokens["hf_gatekeeper"] = "gatekeeper"
    HfApi(token="hf_gatekeeper").upload_folder(repo_id=GATED, folder_path=str(dirs["base"]))
    with deltahub.Store(tmp_path / "b") as b:
        b.add(dirs["base"], name="base")
    return tmp_path / "b"


def _cli(home, *args):
    res = CliRunner().invoke(cli, ["--home", str(home), *args])
    # huggingface_hub's own download bars may precede it; the error itself is one line
    lines = [ln for ln in res.stderr.strip().splitlines() if "it/s]" not in ln]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    return res, lines[0]


def test_private_repo_without_token_is_not_found_with_login_hint(published, hub_server, monkeypatch):
    before = snapshot_store(published)
    monkeypatch.delenv("HF_TOKEN")
    res, line = _cli(published, "pull", PRIVATE)
    assert res.exit_code == exit_code_for(HubNotFoundError("x"))
    assert "not found" in line and "HF_TOKEN" in line
    # another account's token cannot see it either (the Hub answers 404, as for a missing repo)
    hub_server.state.tokens["hf_other"] = "other"
    monkeypatch.setenv("HF_TOKEN", "hf_other")
    res, line = _cli(published, "pull", PRIVATE)
    assert res.exit_code == exit_code_for(HubNotFoundError("x")) and "not visible with your token" in line
    assert snapshot_store(published) == before


def test_private_repo_with_the_owner_token_pulls(published):
    with deltahub.Store(published) as b:
        assert b.pull(PRIVATE, name="ft").name == "ft"


def test_gated_repo_says_request_access(published, hub_server, monkeypatch):
    before = snapshot_store(published)
    res, line = _cli(published, "add", GATED)  # the fake user was not granted access
    assert res.exit_code == exit_code_for(HubAuthError("x"))
    assert "gated" in line and "request access" in line
    monkeypatch.delenv("HF_TOKEN")
    res, line = _cli(published, "add", GATED)
    assert res.exit_code == exit_code_for(HubAuthError("x")) and "gated" in line
    assert snapshot_store(published) == before
    # once access is granted the same command works
    monkeypatch.setenv("HF_TOKEN", hub_server.DEFAULT_TOKEN)
    hub_server.state.get_repo("model", GATED).granted.add(FAKE_USER)
    res = CliRunner().invoke(cli, ["--home", str(published), "add", GATED, "--name", "gated"])
    assert res.exit_code == 0, res.output


def test_revision_not_found(published):
    before = snapshot_store(published)
    res, line = _cli(published, "pull", f"{PRIVATE}@no-such-branch")
    assert res.exit_code == exit_code_for(HubNotFoundError("x"))
    assert "revision not found" in line and "REPO_ID@REVISION" in line
    res, line = _cli(published, "add", f"{GATED}@{'0' * 40}")
    assert res.exit_code in (exit_code_for(HubNotFoundError("x")),)
    assert snapshot_store(published) == before
