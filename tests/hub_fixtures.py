"""Pytest fixture starting the in-process fake Hub (see ``hub_server.py``).

Usage in a test module::

    from hub_fixtures import hub_server  # noqa: F401

    def test_x(hub_server):
        api = huggingface_hub.HfApi()      # talks to hub_server.url
        ...

The fixture:
  * starts ``HubServer`` on 127.0.0.1, port 0, in a daemon thread;
  * sets ``HF_ENDPOINT``, ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_DISABLE_XET=1``, a fresh
    ``HF_HOME`` under ``tmp_path`` and a fake ``HF_TOKEN`` in ``os.environ`` (for subprocesses
    and for code that reads the environment at call time);
  * because ``huggingface_hub.constants`` is evaluated once at import, it ALSO patches the
    already-imported constants (ENDPOINT, URL template, cache paths, telemetry, Xet) and the
    module-level ``huggingface_hub.hf_api.api`` instance, so ``HfApi()``, ``hf_hub_download``,
    ``snapshot_download``... all reach the fake Hub even if imported earlier;
  * forces the plain LFS upload path: with ``hf_xet`` installed the client would otherwise
    upload through Xet (a client-side decision, see ``utils._runtime.is_xet_available``);
  * on teardown stops the server (joining handler threads) and closes the client's shared
    HTTP session so no pooled connection to the dead port survives.
"""

from __future__ import annotations

import os

import pytest

from hub_server import HubServer

FAKE_TOKEN = HubServer.DEFAULT_TOKEN
FAKE_USER = HubServer.DEFAULT_USER


def plant_repo(server: HubServer, repo_id: str, *commits: str):
    """A stand-in for a base repo that ``push --base-repo`` names (push checks it exists): ``repo_id``
    with its initial commit on main, and each of ``commits`` as a further commit id (same tree)."""
    import dataclasses

    repo = server.state.get_repo("model", repo_id) or server.create_repo(repo_id)
    with server.state.lock:
        head = repo.commits[repo.branches["main"]]
        for cid in commits:
            repo.commits[cid] = dataclasses.replace(head, id=cid)
    return repo


def _patch_client(monkeypatch: pytest.MonkeyPatch, url: str, hf_home: str) -> None:
    try:
        from huggingface_hub import constants, hf_api
        from huggingface_hub.utils import _http
    except ImportError:  # pragma: no cover - client not installed
        return
    hub_cache = os.path.join(hf_home, "hub")
    for name, value in {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HF_XET_CACHE": os.path.join(hf_home, "xet"),
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "CHECK_FOR_UPDATE_DONE_PATH": os.path.join(hf_home, ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": os.path.join(hf_home, ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": os.path.join(hf_home, ".agent_harnesses.json"),
    }.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    if hasattr(_http, "_HUB_ORIGINS"):
        monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(url)})


def _close_client_session() -> None:
    try:
        from huggingface_hub.utils._http import close_session
    except ImportError:  # pragma: no cover
        return
    close_session()


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A running fake Hub (``HubServer``); ``hub_server.url`` is the endpoint."""
    server = HubServer().start()
    hf_home = str(tmp_path / "hf_home")
    os.makedirs(hf_home, exist_ok=True)
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": os.path.join(hf_home, "hub"),
        "HF_TOKEN": FAKE_TOKEN,
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(k, raising=False)
    _patch_client(monkeypatch, server.url, hf_home)
    _close_client_session()
    try:
        yield server
    finally:
        _close_client_session()
        server.stop()
