"""Calibration with the fine-tune (the teacher) given as a Hub ``REPO_ID[@REVISION]`` (local fake Hub)."""

from __future__ import annotations

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from calibrate_fixtures import one_thread, stored_pair, trained  # noqa: E402,F401
from huggingface_hub import HfApi  # noqa: E402

from deltahub.api import CalibrationOptions  # noqa: E402
from hub_fixtures import FAKE_USER, hub_server  # noqa: E402,F401

REPO = f"{FAKE_USER}/trained-ft"


def test_teacher_from_the_hub_gives_the_same_scales(store, trained, hub_server):
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    commit = api.upload_folder(repo_id=REPO, folder_path=str(trained["llama"]["ft"]), commit_message="ft").oid
    opts = CalibrationOptions(data=trained["calib"], samples=16, seq_len=32, steps=5, lr=0.05)
    stored_pair(store, trained, "llama", name="local")
    local = store.calibrate("local", trained["llama"]["ft"], opts)
    store.compress(trained["llama"]["ft"], base="base", name="hub")
    hub = store.calibrate("hub", f"{REPO}@{commit}", opts)
    assert hub.manifest_id == local.manifest_id and hub.teacher == f"hub:{REPO}@{commit}"
    # compress --calibrate straight from the Hub: the same delta, calibrated the same way
    res = store.compress(REPO, base="base", name="hub2", calibrate=True, calibration=opts)
    assert (res.hub_repo_id, res.hub_revision) == (REPO, commit)
    assert res.manifest_id == local.manifest_id == res.calibration.manifest_id
    assert res.calibration.teacher == f"hub:{REPO}@{commit}"
    assert store.verify().ok
