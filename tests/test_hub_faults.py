"""Network faults during ``pull`` and ``add REPO_ID`` (the fake Hub's fault hooks): the client's
retries/resume make transient faults invisible; anything else fails with a one-line deltahub error,
leaves the store as it was, and the next attempt finishes the job."""

from __future__ import annotations

import filecmp
import time
import types
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from huggingface_hub import HfApi  # noqa: E402

import deltahub  # noqa: E402
from conftest import snapshot_store  # noqa: E402
from deltahub.errors import DeltaHubError, HubConnectionError  # noqa: E402
from hub_fixtures import FAKE_USER, hub_server, plant_repo  # noqa: E402,F401

DELTA = f"{FAKE_USER}/tiny-delta"
BASE = f"{FAKE_USER}/tiny-base"
DELTA_GETS = r"/resolve/.*/delta\.safetensors$"
BASE_GETS = r"/resolve/.*/model\.safetensors$"


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
    from deltahub.hub import transfer

    monkeypatch.setattr(transfer, "time", fake)  # deltahub's own download retries
    return slept


@pytest.fixture
def pushed(tmp_path, model_dirs, hub_server):
    """Store A holds base + delta pushed to DELTA; its materialized delta is in tmp_path/out_a."""
    dirs = model_dirs["llama"]
    with deltahub.Store(tmp_path / "store_a") as a:
        a.add(dirs["base"], name="base")
        a.compress(dirs["ft"], base="base", name="ft")
        plant_repo(hub_server, BASE, "b" * 40)  # push checks that --base-repo exists ...
        a.push("ft", DELTA, base_repo=f"{BASE}@{'b' * 40}")
        hub_server.state.repos.pop(("model", BASE))  # ... the pulls never fetch it
        a.materialize("ft", tmp_path / "out_a")
    return tmp_path / "out_a"


@pytest.fixture
def store_b(tmp_path, model_dirs):
    with deltahub.Store(tmp_path / "store_b") as b:
        b.add(model_dirs["llama"]["base"], name="base")
        yield b


def _same_tree(x: Path, y: Path) -> None:
    xs = sorted(p.relative_to(x) for p in x.rglob("*") if p.is_file())
    assert xs == sorted(p.relative_to(y) for p in y.rglob("*") if p.is_file()) and xs
    for rel in xs:
        assert filecmp.cmp(x / rel, y / rel, shallow=False), rel


def _names(store) -> set[str]:
    return {m["name"] for m in store.list()}


def _pull_and_check(store, out_a: Path, out: Path) -> None:
    result = store.pull(DELTA)
    assert result.name == "tiny-delta" and "delta.safetensors" in result.downloaded
    store.materialize("tiny-delta", out)
    _same_tree(out_a, out)
    assert store.verify().ok


def _fails_cleanly(store, home: Path, call) -> DeltaHubError:
    before = snapshot_store(home)
    with pytest.raises(DeltaHubError) as info:
        call()
    assert "\n" not in info.value.message
    assert snapshot_store(home) == before
    return info.value


# ------------------------------------------------------------------------------------------ pull
def test_pull_500_twice_is_retried_and_succeeds(pushed, store_b, hub_server, fast_sleep, tmp_path):
    # huggingface_hub retries a file GET only on 408/429; deltahub retries 5xx with back-off.
    rule = hub_server.faults.fail(DELTA_GETS, times=2, method="GET")
    _pull_and_check(store_b, pushed, tmp_path / "out_b")
    assert rule.hits == 2 and fast_sleep[-2:] == [1.0, 2.0]


def test_pull_500_on_head_is_retried(pushed, store_b, hub_server, fast_sleep, tmp_path):
    rule = hub_server.faults.fail(DELTA_GETS.replace("$", ""), times=2, method="HEAD")
    _pull_and_check(store_b, pushed, tmp_path / "out_b")
    assert rule.hits == 2 and fast_sleep


def test_pull_dropped_connection_mid_file_resumes(pushed, store_b, hub_server, fast_sleep, tmp_path):
    rule = hub_server.faults.drop_connection(DELTA_GETS, times=1)
    _pull_and_check(store_b, pushed, tmp_path / "out_b")  # the client resumes with a Range request
    assert rule.hits == 1 and hub_server.count("GET", DELTA_GETS) == 2


def test_pull_dropped_connection_every_time_fails_cleanly_then_succeeds(
    pushed, store_b, hub_server, fast_sleep, tmp_path
):
    rule = hub_server.faults.drop_connection(DELTA_GETS, times=100, keep_bytes=16)
    err = _fails_cleanly(store_b, tmp_path / "store_b", lambda: store_b.pull(DELTA))
    assert isinstance(err, HubConnectionError)
    assert "tiny-delta" not in _names(store_b)
    rule.remaining = 0
    _pull_and_check(store_b, pushed, tmp_path / "out_b")


def test_pull_truncated_file_is_retried_and_succeeds(pushed, store_b, hub_server, fast_sleep, tmp_path):
    rule = hub_server.faults.truncate(DELTA_GETS, times=1)
    _pull_and_check(store_b, pushed, tmp_path / "out_b")
    assert rule.hits == 1


def test_pull_truncated_every_time_fails_cleanly_then_succeeds(pushed, store_b, hub_server, fast_sleep, tmp_path):
    rule = hub_server.faults.truncate(DELTA_GETS, times=100)
    err = _fails_cleanly(store_b, tmp_path / "store_b", lambda: store_b.pull(DELTA))
    assert isinstance(err, HubConnectionError) and "incomplete download" in err.message
    assert "tiny-delta" not in _names(store_b)
    rule.remaining = 0
    _pull_and_check(store_b, pushed, tmp_path / "out_b")


def test_pull_persistent_500_fails_cleanly_then_succeeds(pushed, store_b, hub_server, fast_sleep, tmp_path):
    rule = hub_server.faults.fail(DELTA_GETS, times=100, method="GET")
    err = _fails_cleanly(store_b, tmp_path / "store_b", lambda: store_b.pull(DELTA))
    assert "500" in err.message
    rule.remaining = 0
    _pull_and_check(store_b, pushed, tmp_path / "out_b")


# ----------------------------------------------------------------------------------- add from Hub
@pytest.fixture
def base_repo(model_dirs, hub_server) -> str:
    api = HfApi()
    api.create_repo(BASE)
    return api.upload_folder(repo_id=BASE, folder_path=str(model_dirs["llama"]["base"]), commit_message="b").oid


def _add_and_check(tmp_path, model_dirs, commit) -> None:
    with deltahub.Store(tmp_path / "ref") as ref:
        expected = ref.add(model_dirs["llama"]["base"], name="local").manifest_id
    with deltahub.Store(tmp_path / "s") as s:
        res = s.add(BASE, name="hubbase")
        assert res.manifest_id == expected and res.hub_revision == commit
        assert s.verify().ok


def test_add_from_hub_500_twice_is_retried_and_succeeds(tmp_path, model_dirs, base_repo, hub_server, fast_sleep):
    rule = hub_server.faults.fail(BASE_GETS, times=2, method="GET")
    _add_and_check(tmp_path, model_dirs, base_repo)
    assert rule.hits == 2


def test_add_from_hub_persistent_500_fails_cleanly(tmp_path, model_dirs, base_repo, hub_server, fast_sleep):
    rule = hub_server.faults.fail(BASE_GETS, times=100, method="GET")
    with deltahub.Store(tmp_path / "s") as s:
        err = _fails_cleanly(s, tmp_path / "s", lambda: s.add(BASE, name="hubbase"))
        assert "500" in err.message
        assert _names(s) == set()
    rule.remaining = 0
    _add_and_check(tmp_path, model_dirs, base_repo)


def test_add_from_hub_dropped_connection_resumes(tmp_path, model_dirs, base_repo, hub_server, fast_sleep):
    rule = hub_server.faults.drop_connection(BASE_GETS, times=1)
    _add_and_check(tmp_path, model_dirs, base_repo)
    assert rule.hits == 1


@pytest.mark.parametrize("fault", ["truncate", "drop"])
def test_add_from_hub_failure_is_clean_then_succeeds(tmp_path, model_dirs, base_repo, hub_server, fast_sleep, fault):
    if fault == "truncate":
        rule = hub_server.faults.truncate(BASE_GETS, times=100)  # every attempt: retries give up
    else:
        rule = hub_server.faults.drop_connection(BASE_GETS, times=100, keep_bytes=16)
    with deltahub.Store(tmp_path / "s") as s:
        err = _fails_cleanly(s, tmp_path / "s", lambda: s.add(BASE, name="hubbase"))
        assert isinstance(err, HubConnectionError)
        assert _names(s) == set()
    rule.remaining = 0
    _add_and_check(tmp_path, model_dirs, base_repo)
