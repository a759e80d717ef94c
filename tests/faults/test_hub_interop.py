"""Hub interoperability (issue 9, part 7): olah (a third-party read-only Hub mirror) in front of the
project's test Hub, explicit revisions, 404s that are not "repository not found", failed Xet
uploads, ``push --base-repo`` checks, offline pulls from the HF cache, ``refs/<branch>`` after a
pull, huggingface_hub's progress bars, the card's links, and the huggingface-hub floor.

Everything goes through the real ``huggingface_hub`` client (and, for olah, a real olah server)."""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from click.testing import CliRunner  # noqa: E402
from huggingface_hub import CommitOperationDelete, HfApi  # noqa: E402
from huggingface_hub import constants as hf_constants  # noqa: E402

import deltahub  # noqa: E402
from conftest import snapshot_store  # noqa: E402
from deltahub.cli import cli, exit_code_for  # noqa: E402
from deltahub.errors import HubConnectionError, HubError, HubNotFoundError  # noqa: E402
from deltahub.hub.card import render_card  # noqa: E402
from fault_report import record  # noqa: E402
from hub_fixtures import FAKE_TOKEN, FAKE_USER, _patch_client, hub_server  # noqa: E402,F401

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE = f"{FAKE_USER}/tiny-base"
DELTA = f"{FAKE_USER}/tiny-delta"
BAR = re.compile(r"\d+%\|")  # a tqdm bar: "model.safetensors: 100%|█████| ..."


@pytest.fixture
def published(tmp_path, model_dirs, hub_server):
    """Store A pushed its base to BASE and a delta on it to DELTA (which names BASE at main)."""
    dirs = model_dirs["llama"]
    with deltahub.Store(tmp_path / "a") as a:
        a.add(dirs["base"], name="base")
        a.compress(dirs["ft"], base="base", name="ft")
        base_push = a.push("base", BASE)
        delta_push = a.push("ft", DELTA, base_repo=f"{BASE}@main")
        manifest = a.show("ft")["manifest_id"]
    hub_server.requests.clear()
    return {"base_commit": base_push.base_commit, "delta_commit": delta_push.commit, "manifest": manifest}


def _fresh_hf_cache(monkeypatch, path: Path) -> Path:
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.setattr(hf_constants, name, str(path))
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    return path


def _offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def _cli(home: Path, *args: str):
    return CliRunner().invoke(cli, ["--home", str(home), *args])


def _one_line_error(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    return lines[0]


def _repo_info_paths(server) -> list[str]:
    return [p for m, p in server.requests if m == "GET" and re.match(r"^/api/models/[^/]+/[^/]+(/revision/.*)?$", p)]


# ------------------------------------------------------------------------------ explicit revisions
def test_pull_and_add_without_revision_ask_for_main(tmp_path, published, hub_server):
    """`pull REPO` / `add REPO` call repo_info with revision main, never the bare repo endpoint."""
    with deltahub.Store(tmp_path / "b") as b:
        assert b.pull(DELTA).commit == published["delta_commit"]
        assert b.add(BASE, name="again").hub_revision == published["base_commit"]
    paths = _repo_info_paths(hub_server)
    assert f"/api/models/{DELTA}/revision/main" in paths and f"/api/models/{BASE}/revision/main" in paths
    assert all("/revision/" in p for p in paths), paths


# ------------------------------------------------------------------------------------------ olah
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_olah(tmp_path: Path, upstream: str, offline: bool) -> tuple[subprocess.Popen, str]:
    """olah mirroring ``upstream`` (the test Hub), caching under tmp_path/olah_repos."""
    port = _free_port()
    host = upstream.split("://", 1)[1]
    config = tmp_path / f"olah-{'offline' if offline else 'online'}.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'hf-scheme = "http"\nhf-netloc = "{host}"\nhf-lfs-netloc = "{host}"\n'
        f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n'
        f'repos-path = "{tmp_path / "olah_repos"}"\n'
        "[accessibility]\n"
        f"offline = {'true' if offline else 'false'}\n",
        encoding="utf-8",
    )
    log = open(tmp_path / "olah.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "olah.server", "-c", str(config), "--log-path", str(tmp_path / "olah_logs")],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"olah exited: {(tmp_path / 'olah.log').read_text(errors='replace')[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("olah did not start in 30 s") from None
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
        proc.wait()


def test_pull_and_add_without_revision_through_olah(tmp_path, published, hub_server, monkeypatch):
    """olah serves `deltahub pull REPO` and `deltahub add REPO` (no @REV), online and then as an
    offline mirror from its own cache -- where olah only answers /api/models/REPO/revision/REV."""
    import olah  # noqa: F401 - in the `test` extra (scripts/setup.sh installs it)
    started = time.monotonic()
    results = {}
    for phase, offline in (("online", False), ("offline mirror", True)):
        proc, url = _start_olah(tmp_path, hub_server.url, offline=offline)
        try:
            hf_home = tmp_path / f"hf-{phase.replace(' ', '-')}"  # a fresh HF cache: everything via olah
            _patch_client(monkeypatch, url, str(hf_home))
            monkeypatch.setenv("HF_ENDPOINT", url)
            monkeypatch.setenv("HF_HOME", str(hf_home))
            monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
            home = tmp_path / f"store-{phase.replace(' ', '-')}"
            before = len(hub_server.requests)
            res = _cli(home, "pull", DELTA, "--json")
            assert res.exit_code == 0, f"{phase}: {res.stderr}"
            pulled = json.loads(res.stdout)
            assert pulled["commit"] == published["delta_commit"] and pulled["manifest_id"] == published["manifest"]
            assert pulled["base_fetched"] == "tiny-base"
            res = _cli(home, "add", BASE, "--name", "by-branch", "--json")
            assert res.exit_code == 0, f"{phase}: {res.stderr}"
            with deltahub.Store(home) as s:
                assert s.show("by-branch")["info"]["hub"] == {"repo_id": BASE, "revision": published["base_commit"]}
                assert s.verify().ok
            # olah's own start-up probe (a HEAD of a public dataset) does not count: only our repos
            results[phase] = sum(1 for _, path in hub_server.requests[before:] if f"/{FAKE_USER}/" in path)
        finally:
            _stop(proc)
    assert results["online"] > 0  # olah fetched from the test Hub ...
    assert results["offline mirror"] == 0  # ... and then served it all from its cache
    record("hub-interop/olah", olah_version=_olah_version(), seconds=round(time.monotonic() - started, 1),
           upstream_requests=results)


def _olah_version() -> str:
    from importlib.metadata import version

    return version("olah")


# ------------------------------------------------------------------------------------------- 404s
def test_a_404_elsewhere_keeps_the_server_message(tmp_path, model_dirs, published, hub_server):
    # /api/validate-yaml answering 404 (a mirror without it): not "repository not found"
    hub_server.faults.fail(r"^/api/validate-yaml$", status=404, times=10)
    with deltahub.Store(tmp_path / "a") as a:
        with pytest.raises(HubNotFoundError) as info:
            a.push("ft", f"{FAKE_USER}/other-delta", base_repo=f"{BASE}@main")
    text = str(info.value)
    assert "Injected fault (404)" in text and "/api/validate-yaml" in text and "repository" not in text
    hub_server.faults.clear()

    # a file missing from the repo: the server's "Entry not found" and the path, not the repo
    HfApi().create_commit(DELTA, [CommitOperationDelete("delta.safetensors")], commit_message="drop the shard")
    with deltahub.Store(tmp_path / "b") as b:
        b.add(model_dirs["llama"]["base"], name="base")
        before = snapshot_store(tmp_path / "b")
        with pytest.raises(HubNotFoundError) as info:
            b.pull(DELTA)
        assert snapshot_store(tmp_path / "b") == before
    text = str(info.value)
    assert "Entry not found" in text and "/resolve/" in text and "delta.safetensors" in text
    assert "repository" not in text

    # a missing repo still is "repository ... not found"
    res = _cli(tmp_path / "b", "pull", f"{FAKE_USER}/no-such-delta")
    assert res.exit_code == exit_code_for(HubNotFoundError("x"))
    assert f"repository {FAKE_USER}/no-such-delta not found" in _one_line_error(res)


# ------------------------------------------------------------------------------------------- Xet
def test_failed_xet_upload_names_xet_and_the_way_out(tmp_path, model_dirs, hub_server, monkeypatch):
    """Xet on in the client (hf_xet installed, HF_HUB_DISABLE_XET unset) against a Hub without Xet:
    the real client's Xet upload fails, and the error says Xet and HF_HUB_DISABLE_XET=1."""
    from huggingface_hub.utils._runtime import is_xet_available

    monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", False)
    assert is_xet_available()  # hf_xet is a dependency of huggingface_hub
    with deltahub.Store(tmp_path / "a") as a:
        a.add(model_dirs["llama"]["base"], name="base")
        with pytest.raises(HubError) as info:
            a.push("base", BASE)
        err = info.value
        assert "Xet" in err.message and "cannot reach" not in err.message
        assert "HF_HUB_DISABLE_XET=1" in err.hint
        assert hub_server.count("GET", r"/xet-write-token/") >= 1  # it did try Xet
        assert "model.safetensors" not in HfApi().list_repo_files(BASE)
        res = _cli(tmp_path / "a", "push", "base", BASE)
        line = _one_line_error(res)
        assert "Xet" in line and "HF_HUB_DISABLE_XET=1" in line
        # the way out works
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        assert a.push("base", BASE).uploaded


# ------------------------------------------------------------------------------- push --base-repo
def test_push_base_repo_is_checked_before_uploading(tmp_path, model_dirs, published, hub_server):
    target = f"{FAKE_USER}/checked-delta"
    home = tmp_path / "a"
    for bad, why in ((f"{FAKE_USER}/no-such-base", "not found"), (f"{BASE}@no-such-branch", "revision not found")):
        hub_server.requests.clear()
        res = _cli(home, "push", "ft", target, "--base-repo", bad)
        assert res.exit_code == exit_code_for(HubNotFoundError("x")), res.stderr
        line = _one_line_error(res)
        assert why in line and "--base-repo" in line and bad.partition("@")[0] in line
        assert hub_server.count("POST", r".") == 0  # nothing created, uploaded or committed
        assert len(_repo_info_paths(hub_server)) == 1  # one repo_info, at that revision
        assert not HfApi().repo_exists(target)
    hub_server.requests.clear()
    with deltahub.Store(home) as a:
        result = a.push("ft", target, base_repo=BASE)  # no revision: main
        assert result.uploaded and result.base_commit == published["base_commit"]
    assert _repo_info_paths(hub_server)[0] == f"/api/models/{BASE}/revision/main"


# ---------------------------------------------------------------------- offline pulls and refs
def test_offline_pull_and_add_from_the_hf_cache(tmp_path, published, hub_server, monkeypatch):
    cache = _fresh_hf_cache(monkeypatch, tmp_path / "hf_cache_b")
    with deltahub.Store(tmp_path / "b") as b:
        online = b.pull(DELTA)
        assert online.base_fetched == "tiny-base"
    # the online pull left the branch refs behind, for the delta and for the base it fetched at main
    for repo, commit in ((DELTA, published["delta_commit"]), (BASE, published["base_commit"])):
        ref = cache / f"models--{repo.replace('/', '--')}" / "refs" / "main"
        assert ref.read_text() == commit, repo
    assert not list(cache.rglob("refs/.*.tmp"))

    _offline(monkeypatch)
    hub_server.requests.clear()
    with deltahub.Store(tmp_path / "c") as c:  # a fresh store: everything comes from the HF cache
        result = c.pull(DELTA)
        assert (result.commit, result.manifest_id) == (published["delta_commit"], published["manifest"])
        assert result.base_fetched == "tiny-base" and c.verify().ok
        assert c.add(BASE, name="base-again").hub_revision == published["base_commit"]
        assert c.pull(f"{DELTA}@{published['delta_commit']}", name="pinned").already_stored
    with deltahub.Store(tmp_path / "b") as b:
        assert b.pull(DELTA).already_stored  # already in the store
    assert hub_server.requests == []  # never contacted

    # not in the cache: a clear error naming what is missing and HF_HUB_OFFLINE
    home = tmp_path / "d"
    res = _cli(home, "pull", f"{FAKE_USER}/never-pulled")
    assert res.exit_code == exit_code_for(HubConnectionError("x"))
    line = _one_line_error(res)
    assert f"{FAKE_USER}/never-pulled@main" in line and "HF_HUB_OFFLINE" in line and "refs/main" in line
    # the ref is there but a file is not
    shard = next(cache.glob(f"models--{DELTA.replace('/', '--')}/snapshots/*/delta.safetensors"))
    shard.unlink()
    res = _cli(home, "pull", DELTA)
    line = _one_line_error(res)
    assert "delta.safetensors" in line and "not in the HF cache" in line and "unset HF_HUB_OFFLINE" in line
    assert hub_server.requests == []


def test_a_base_fetched_by_commit_gets_refs_main_when_it_is_main(tmp_path, model_dirs, hub_server, monkeypatch):
    """The usual flow: the base was pushed (or added) and is recorded at its commit id, so the pull
    fetches it by commit; deltahub asks once where main is and records refs/main when it is that
    commit, so that an offline `deltahub add org/base` works afterwards."""
    dirs = model_dirs["llama"]
    with deltahub.Store(tmp_path / "a") as a:
        a.add(dirs["base"], name="base")
        a.compress(dirs["ft"], base="base", name="ft")
        base_commit = a.push("base", BASE).base_commit
        a.push("ft", DELTA)  # the store knows the base's repo and commit: pinned by commit id
    cache = _fresh_hf_cache(monkeypatch, tmp_path / "hf_cache")
    with deltahub.Store(tmp_path / "b") as b:
        assert b.pull(DELTA).base_fetched == "tiny-base"
    ref = cache / f"models--{BASE.replace('/', '--')}" / "refs" / "main"
    assert ref.read_text() == base_commit
    _offline(monkeypatch)
    hub_server.requests.clear()
    with deltahub.Store(tmp_path / "c") as c:
        assert c.add(BASE, name="base").hub_revision == base_commit
    assert hub_server.requests == []


# -------------------------------------------------------------------------------- progress bars
def test_deltahub_variable_silences_huggingface_hub_bars(tmp_path, published, hub_server):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_OFFLINE")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    runs = {}
    for label, value in (("disabled", "1"), ("default", None)):
        run_env = dict(env, HF_HOME=str(tmp_path / f"hf-{label}"), HF_HUB_CACHE=str(tmp_path / f"hf-{label}" / "hub"))
        run_env.pop("DELTAHUB_DISABLE_PROGRESS_BARS", None)
        if value:
            run_env["DELTAHUB_DISABLE_PROGRESS_BARS"] = value
        proc = subprocess.run(
            [sys.executable, "-m", "deltahub.cli", "--home", str(tmp_path / f"store-{label}"), "pull", DELTA],
            env=run_env, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        runs[label] = proc.stderr
    assert not BAR.search(runs["disabled"]), runs["disabled"]
    assert BAR.search(runs["default"]), runs["default"]  # huggingface_hub does draw bars otherwise


# ----------------------------------------------------------------------------------------- card
def test_card_links_the_configured_endpoint(published, hub_server, tmp_path):
    card = Path(huggingface_hub.hf_hub_download(DELTA, "README.md")).read_text(encoding="utf-8")
    assert f"]({hub_server.url}/{BASE})" in card and "huggingface.co" not in card
    hub = json.loads(Path(huggingface_hub.hf_hub_download(DELTA, "deltahub.json")).read_bytes())
    same = render_card(DELTA, hub, local_name="ft", endpoint=hub_server.url)
    assert same == card == render_card(DELTA, hub, local_name="ft", endpoint=hub_server.url + "/")
    other = render_card(DELTA, hub, local_name="ft", endpoint="https://hub.example.org")
    assert "](https://hub.example.org/" in other and other.replace("https://hub.example.org", hub_server.url) == card


# --------------------------------------------------------------------------- huggingface-hub floor
#: The exception classes of huggingface_hub 0.25.0's ``huggingface_hub/errors.py`` (the first release
#: whose ``errors`` module holds RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError,
#: HfHubHTTPError, LocalEntryNotFoundError; 0.23/0.24 had only OfflineModeIsEnabled and
#: HFValidationError there).
ERRORS_0_25 = {
    "CacheNotFound", "CorruptedCacheException", "LocalTokenNotFoundError", "OfflineModeIsEnabled",
    "HfHubHTTPError", "InferenceTimeoutError", "InferenceEndpointError", "InferenceEndpointTimeoutError",
    "SafetensorsParsingError", "NotASafetensorsRepoError", "TemplateError", "TextGenerationError",
    "ValidationError", "GenerationError", "OverloadedError", "IncompleteGenerationError", "UnknownError",
    "HFValidationError", "FileMetadataError", "RepositoryNotFoundError", "GatedRepoError",
    "DisabledRepoError", "RevisionNotFoundError", "EntryNotFoundError", "LocalEntryNotFoundError",
    "BadRequestError",
}


def _hf_error_names_used() -> set[str]:
    """Every ``huggingface_hub.errors`` name deltahub uses (``from huggingface_hub.errors import X``
    and ``from huggingface_hub import errors as hf`` ... ``hf.X``)."""
    used: set[str] = set()
    for path in (REPO_ROOT / "deltahub").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "huggingface_hub.errors":
                used |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module == "huggingface_hub":
                aliases |= {a.asname or a.name for a in node.names if a.name == "errors"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                used.add(node.attr)
    return used


def test_huggingface_hub_floor_has_every_error_used():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    floor = re.search(r'"huggingface-hub>=([0-9.]+)"', pyproject)
    assert floor and tuple(int(x) for x in floor.group(1).split(".")) >= (0, 25)
    used = _hf_error_names_used()
    assert {"RepositoryNotFoundError", "GatedRepoError", "LocalEntryNotFoundError"} <= used
    assert used <= ERRORS_0_25, f"not in huggingface_hub 0.25's errors module: {used - ERRORS_0_25}; raise the floor"


def test_offline_add_of_a_cached_but_unusable_repo_says_what_is_wrong(tmp_path, published, hub_server, monkeypatch):
    """Offline, a repo that IS in the HF cache but is not a usable base (here: a pushed delta) gets
    the real reason, not "not in the HF cache"."""
    with deltahub.Store(tmp_path / "b") as b:
        b.pull(DELTA)  # puts the delta repo's files in the HF cache
    _offline(monkeypatch)
    res = _cli(tmp_path / "c", "add", DELTA)
    line = _one_line_error(res)
    assert "deltahub pull" in line and "not in the HF cache" not in line, line


def test_upload_errors_not_from_xet_keep_their_own_message(monkeypatch):
    """With Xet on, only failures of the Xet path are blamed on Xet: a 5xx of the commit endpoint
    keeps its message and stays retryable, a local error is not rewritten."""
    import httpx2 as httpx
    from huggingface_hub.errors import HfHubHTTPError

    from deltahub.hub.transfer import translate_hub_error

    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", False)
    request = httpx.Request("POST", "https://hub.example/api/models/me/x/commit/main")
    response = httpx.Response(503, request=request, text="busy")
    err = translate_hub_error(HfHubHTTPError("503 Server Error: busy", response=response), "me/x", upload=True)
    assert "Xet" not in err.message and err.transient
    assert translate_hub_error(ValueError("not a Hub failure"), "me/x", upload=True) is None
    xet_request = httpx.Request("GET", "https://hub.example/api/models/me/x/xet-write-token/main")
    xet = HfHubHTTPError("501 Server Error", response=httpx.Response(501, request=xet_request))
    assert "Xet" in translate_hub_error(xet, "me/x", upload=True).message
