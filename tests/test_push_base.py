"""Pushing bases: ``deltahub push BASE REPO`` and ``deltahub push DELTA REPO --with-base``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from click.testing import CliRunner  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402
from huggingface_hub import constants as hf_constants  # noqa: E402

import deltahub  # noqa: E402
from deltahub.cli import cli  # noqa: E402
from deltahub.errors import HubError, InputError  # noqa: E402
from hub_fixtures import FAKE_USER, hub_server  # noqa: E402,F401

DELTA = f"{FAKE_USER}/tiny-delta"


def _fresh_hf_cache(monkeypatch, path: Path) -> None:
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.setattr(hf_constants, name, str(path))
    monkeypatch.setenv("HF_HUB_CACHE", str(path))


def _commits(repo: str) -> int:
    return len(HfApi().list_repo_commits(repo))


def test_with_base_pushes_base_then_delta_and_pull_rebuilds_both(tmp_path, model_dirs, hub_server, monkeypatch):
    dirs = model_dirs["llama"]
    with deltahub.Store(tmp_path / "a") as a:
        a.add(dirs["base"], name="base")  # a local base: no Hub id known
        a.compress(dirs["ft"], base="base", name="ft")
        with pytest.raises(HubError, match="no Hub id") as err:
            a.push("ft", DELTA)
        assert "--with-base" in err.value.hint
        result = a.push("ft", DELTA, with_base=True)
        base_repo = f"{DELTA}-base"
        assert result.uploaded and result.base is not None and result.base.repo_id == base_repo
        assert result.base.uploaded and len(result.base.base_commit) == 40
        base_files = set(HfApi().list_repo_files(base_repo))
        assert {"config.json", "model.safetensors", "README.md"} <= base_files
        hub = json.loads(Path(huggingface_hub.hf_hub_download(DELTA, "deltahub.json")).read_bytes())
        assert hub["base"]["hub"] == {"repo_id": base_repo, "revision": result.base.base_commit}
        # the store now knows where the base lives; pushing again changes nothing anywhere
        n_base, n_delta = _commits(base_repo), _commits(DELTA)
        again = a.push("ft", DELTA, with_base=True)
        assert not again.uploaded and not again.base.uploaded
        assert again.base.base_commit == result.base.base_commit
        assert a.push("ft", DELTA).uploaded is False  # no --with-base / --base-repo needed any more
        assert (_commits(base_repo), _commits(DELTA)) == (n_base, n_delta)
        a.materialize("ft", tmp_path / "out_a")
        base_manifest = a.show("base")["manifest_id"]
    # a fresh machine: pull fetches the pushed base, which must be byte-for-byte the same base
    _fresh_hf_cache(monkeypatch, tmp_path / "hf_b")
    with deltahub.Store(tmp_path / "b") as b:
        pulled = b.pull(DELTA, name="ft")
        assert pulled.base_fetched is not None
        assert b.show(pulled.base_fetched)["manifest_id"] == base_manifest
        b.materialize("ft", tmp_path / "out_b")
    for f in (tmp_path / "out_a").iterdir():
        assert f.read_bytes() == (tmp_path / "out_b" / f.name).read_bytes(), f.name


def test_push_base_alone_records_its_hub_location(tmp_path, model_dirs, hub_server):
    dirs = model_dirs["gpt2"]
    repo = f"{FAKE_USER}/gpt2-base"
    with deltahub.Store(tmp_path / "a") as a:
        a.add(dirs["base"], name="base")
        res = a.push("base", repo, max_shard_size="100KB")  # sharded like transformers does
        assert res.uploaded and any(f.startswith("model-00001-of-") for f in res.files)
        assert "model.safetensors.index.json" in res.files
        assert a.show("base")["info"]["hub"] == {"repo_id": repo, "revision": res.base_commit}
        # re-pushed unsharded: the old shards are deleted in the same commit
        res2 = a.push("base", repo)
        assert res2.uploaded and "model.safetensors" in res2.files
        assert all(not f.startswith("model-0") for f in HfApi().list_repo_files(repo))
        with pytest.raises(InputError, match="base model"):
            a.push("base", repo, with_base=True)
        base_manifest = a.show("base")["manifest_id"]
    # the pushed base is an ordinary checkpoint: adding it from the Hub gives the same manifest
    with deltahub.Store(tmp_path / "b") as b:
        assert b.add(f"{repo}@{res2.base_commit}", name="hubbase").manifest_id == base_manifest


def test_cli_push_with_base_json(tmp_path, model_dirs, hub_server):
    dirs = model_dirs["llama"]
    home = str(tmp_path / "s")
    runner = CliRunner()
    for args in (["add", str(dirs["base"]), "--name", "base"], ["compress", str(dirs["ft"]), "--base", "base", "--name", "ft"]):
        assert runner.invoke(cli, ["--home", home, *args], catch_exceptions=False).exit_code == 0
    res = runner.invoke(
        cli,
        ["--home", home, "push", "ft", DELTA, "--with-base", "--base-repo", f"{FAKE_USER}/the-base", "--json"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["base"]["repo_id"] == f"{FAKE_USER}/the-base" and data["base"]["uploaded"] is True
    assert len(data["base"]["commit"]) == 40 and data["uploaded"] is True
    res = runner.invoke(cli, ["--home", home, "push", "ft", DELTA, "--with-base", "--base-repo", f"{FAKE_USER}/the-base"])
    assert res.exit_code == 0 and "base already there" in res.stdout and "nothing pushed" in res.stdout


def test_sharded_delta_and_sharded_base_round_trip(tmp_path, model_dirs, hub_server, monkeypatch):
    """Both repos sharded (delta-0000i-of-N and model-0000i-of-N + index): a fresh store pulls the
    delta, fetches the sharded base, and materializes the same bytes."""
    dirs = model_dirs["gpt2"]
    with deltahub.Store(tmp_path / "a") as a:
        a.add(dirs["base"], name="base")
        a.compress(dirs["ft"], base="base", name="ft", embeddings="dense")
        res = a.push("ft", DELTA, with_base=True, max_shard_size="40KB")
        assert sum(f.startswith("delta-0") for f in res.files) > 1
        assert sum(f.startswith("model-0") for f in res.base.files) > 1
        a.materialize("ft", tmp_path / "out_a")
    _fresh_hf_cache(monkeypatch, tmp_path / "hf_b")
    with deltahub.Store(tmp_path / "b") as b:
        pulled = b.pull(DELTA, name="ft")
        assert pulled.base_fetched and sum(f.startswith("delta-0") for f in pulled.downloaded) > 1
        b.materialize("ft", tmp_path / "out_b")
        assert b.verify().ok
    for f in (tmp_path / "out_a").iterdir():
        assert f.read_bytes() == (tmp_path / "out_b" / f.name).read_bytes(), f.name
