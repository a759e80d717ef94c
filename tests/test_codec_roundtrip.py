"""Every registered codec of deltahub round-trips compress → push → pull → materialize and delta mode,
against an independent reference (issue 11's CI requirement).

``REFERENCES`` holds, per codec name, the options it is compressed with and a plain-torch
reconstruction written independently of the codec's code. A codec deltahub registers without an
entry here fails :func:`test_every_builtin_codec_has_a_reference`, so a new codec cannot skip this
test; codecs registered by tests (``tests/toy_codec.py``) have their own.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file

import deltahub
from deltahub import codec as codecs
from hub_fixtures import FAKE_USER, hub_server, plant_repo  # noqa: F401


def _signs(r: torch.Tensor) -> torch.Tensor:
    return torch.where(r >= 0, 1.0, -1.0)


def _sign1(base: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    d = ft.float() - base.float()
    return base.float() + float(d.abs().double().mean()) * _signs(d)


def _planes_rows(k: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def ref(base: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        r = ft.float() - base.float()
        acc = base.float().clone()
        for _ in range(k):
            s = r.abs().double().mean(dim=1, keepdim=True).float()
            step = s * _signs(r)
            acc, r = acc + step, r - step
        return acc

    return ref


def _rowsparse(base: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    out = base.float().clone()
    for r in range(ft.shape[0]):
        if torch.equal(ft[r].view(torch.uint8), base[r].to(ft.dtype).view(torch.uint8)):
            continue  # unchanged: the base row
        d = ft[r].float() - base[r].float()
        out[r] = base[r].float() + float(d.abs().double().mean()) * _signs(d)
    return out


def _exact(base: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    return ft


#: codec name -> (compress options, reference reconstruction of a matrix, exact?)
REFERENCES: dict[str, tuple[dict, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], bool]] = {
    "sign1": ({}, _sign1, False),
    "planes": ({"planes": 3, "scales": "row"}, _planes_rows(3), False),
    "lossless": ({}, _exact, True),
    "rowsparse": ({}, _rowsparse, False),
}
#: codecs that are never asked for: chosen per tensor by compress (identical tensors, everything else)
AUTOMATIC = {"same", "dense"}


def _builtin_delta_codecs() -> list[str]:
    return sorted(
        n for n in codecs.names()
        if type(codecs.get(n)).__module__.startswith("deltahub.") and n not in AUTOMATIC
    )


def test_every_builtin_codec_has_a_reference():
    missing = sorted(set(_builtin_delta_codecs()) - set(REFERENCES))
    assert not missing, f"registered codecs without a round-trip reference in this file: {missing}"


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_codec_round_trips_compress_push_pull_materialize_and_delta_mode(name, store, model_dirs, tmp_path, hub_server):
    options, reference, exact = REFERENCES[name]
    dirs = model_dirs["llama"]
    store.add(dirs["base"], name="base")
    store.compress(dirs["ft"], base="base", name="d", codec=name, codec_options=options or None)
    used = store.show("d")["codecs"]
    assert name in used, used
    plant_repo(hub_server, "someone/tiny-base", "e" * 40)
    repo = f"{FAKE_USER}/round-{name}"
    store.push("d", repo, base_repo="someone/tiny-base@" + "e" * 40)
    other = deltahub.Store(tmp_path / "other")
    try:
        other.add(dirs["base"], name="base")
        assert other.pull(repo, name="d").manifest_id == store.show("d")["manifest_id"]
        store.materialize("d", tmp_path / "here")
        other.materialize("d", tmp_path / "there")
        assert (tmp_path / "here" / "model.safetensors").read_bytes() == (tmp_path / "there" / "model.safetensors").read_bytes()
        got = load_file(tmp_path / "there" / "model.safetensors")
        base = load_file(dirs["base"] / "model.safetensors")
        ft = load_file(dirs["ft"] / "model.safetensors")
        manifest = deltahub.formats.manifest.parse_manifest(other._ctx.objects.read(other.show("d")["manifest_id"]))
        checked = 0
        for tname, rec in manifest.tensors.items():
            if rec.codec != name:
                continue
            want = reference(base[tname], ft[tname])
            if exact:
                assert torch.equal(got[tname].view(torch.uint8), want.view(torch.uint8)), tname
            else:
                assert torch.allclose(got[tname].float(), want.to(got[tname].dtype).float(), atol=1e-6, rtol=1e-5), tname
            checked += 1
        assert checked > 0
        ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
        from transformers import AutoModelForCausalLM

        ref_model = AutoModelForCausalLM.from_pretrained(tmp_path / "there").eval()
        with torch.no_grad():
            want_logits = ref_model(input_ids=ids).logits
            delta_logits = other.load_model("d", mode="delta")(input_ids=ids).logits
        assert torch.allclose(delta_logits, want_logits, atol=1e-4, rtol=1e-4)
        assert other.verify().ok
    finally:
        other.close()
