"""The public Python API: Store methods, deltahub.load_model and deltahub.load_tokenizer."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import read_json
from safetensors.torch import load_file

import deltahub
from deltahub.errors import InputError, InvalidNameError, NameExistsError, NameNotFoundError

EMBEDDING_RE = re.compile(r"(embed_tokens|lm_head|wte|wpe)\.weight$")


def input_ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids()).logits


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def expected_codecs(base_dir, ft_dir, embeddings: str = "sign1") -> dict[str, str]:
    """The codec each tensor should get (default: sign1 embeddings), from the checkpoints."""
    base, ft = load_file(base_dir / "model.safetensors"), load_file(ft_dir / "model.safetensors")
    out = {}
    for name, t in ft.items():
        b = base.get(name)
        if b is not None and bits_equal(b, t):
            out[name] = "same"
        elif b is not None and t.ndim == 2 and b.shape == t.shape and (
            embeddings == "sign1" or not EMBEDDING_RE.search(name)
        ):
            out[name] = "sign1"
        else:
            out[name] = "dense"
    return out


@pytest.fixture(scope="module")
def astore(tmp_path_factory, model_dirs):
    home = tmp_path_factory.mktemp("api-store")
    with deltahub.Store(home) as store:
        for arch, dirs in model_dirs.items():
            store.add(dirs["base"], name=f"{arch}-base")
            store.compress(dirs["ft"], base=f"{arch}-base", name=f"{arch}-ft")
        yield store


# ---------------------------------------------------------------------------------------- load_model
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_model_equals_the_materialized_model(astore, arch, dtype, tmp_path):
    from transformers import AutoModelForCausalLM

    model = deltahub.load_model(f"{arch}-ft", dtype=dtype, home=astore.home)
    want = getattr(torch, dtype)
    assert model.dtype == want
    assert {p.dtype for p in model.parameters()} == {want}
    assert not model.training
    astore.materialize(f"{arch}-ft", tmp_path / "out", dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert ref.dtype == want
    got = logits_of(model)
    assert torch.isfinite(got.float()).all()
    assert torch.equal(got, logits_of(ref))
    # Same weights, name for name.
    ref_state = ref.state_dict()
    for name, t in model.state_dict().items():
        assert bits_equal(t, ref_state[name]), name


def test_load_model_accepts_a_torch_dtype_and_defaults_to_the_stored_dtype(astore):
    m16 = deltahub.load_model("gpt2-ft", dtype=torch.float16, home=astore.home)
    assert m16.dtype == torch.float16
    default = deltahub.load_model("gpt2-ft", home=astore.home)
    assert default.dtype == torch.float32
    assert torch.equal(logits_of(default), logits_of(astore.load_model("gpt2-ft", dtype="float32")))


def test_load_model_of_a_base_equals_the_original(astore, model_dirs, arch):
    from transformers import AutoModelForCausalLM

    model = astore.load_model(f"{arch}-base")
    ref = AutoModelForCausalLM.from_pretrained(model_dirs[arch]["base"])
    assert type(model) is type(ref)
    assert torch.equal(logits_of(model), logits_of(ref))


def test_load_model_is_not_the_base(astore, arch):
    ft = logits_of(astore.load_model(f"{arch}-ft"))
    base = logits_of(astore.load_model(f"{arch}-base"))
    assert not torch.equal(ft, base)


def test_load_model_uses_deltahub_home_by_default(astore, monkeypatch):
    monkeypatch.setenv("DELTAHUB_HOME", str(astore.home))
    model = deltahub.load_model("llama-ft", dtype="float32")
    assert torch.equal(logits_of(model), logits_of(astore.load_model("llama-ft", dtype="float32")))
    assert deltahub.Store().home == astore.home


def test_load_model_errors(astore):
    with pytest.raises(NameNotFoundError):
        deltahub.load_model("missing", home=astore.home)
    with pytest.raises(InvalidNameError):
        deltahub.load_model("../etc", home=astore.home)
    with pytest.raises(InputError, match="int8"):
        deltahub.load_model("llama-ft", dtype="int8", home=astore.home)


# ---------------------------------------------------------------------------------------- tokenizer
def test_load_tokenizer_encodes_like_the_original(astore, model_dirs, arch):
    from transformers import AutoTokenizer

    tok = deltahub.load_tokenizer(f"{arch}-ft", home=astore.home)
    ref = AutoTokenizer.from_pretrained(model_dirs[arch]["ft"])
    for text in ("w1 w2 w3", "w100 zzz w5 </s>", ""):
        assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.eos_token == ref.eos_token == "</s>"
    assert len(tok) == len(ref)
    assert astore.load_tokenizer(f"{arch}-base")("w7")["input_ids"] == ref("w7")["input_ids"]


def test_load_tokenizer_without_tokenizer_files(astore, model_dirs, tmp_path):
    import shutil

    src = tmp_path / "notok"
    shutil.copytree(model_dirs["gpt2"]["base"], src)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    with deltahub.Store(tmp_path / "s") as store:
        store.add(src, name="notok")
        with pytest.raises(InputError, match="tokenizer"):
            store.load_tokenizer("notok")


# ---------------------------------------------------------------------------------------- list / show
def test_list(astore):
    rows = {r["name"]: r for r in astore.list()}
    assert set(rows) == {"llama-base", "llama-ft", "gpt2-base", "gpt2-ft"}
    assert [r["name"] for r in astore.list()] == sorted(rows)
    for arch in ("llama", "gpt2"):
        base, ft = rows[f"{arch}-base"], rows[f"{arch}-ft"]
        assert base["kind"] == "base" and base["base"] is None
        assert ft["kind"] == "delta" and ft["base"] == f"{arch}-base"
        assert ft["model_type"] == arch and ft["dtype"] == "float32"
        assert ft["ratio"] > 1
        assert ft["stored_bytes"] < base["stored_bytes"]
        assert base["fp16_bytes"] == ft["fp16_bytes"] > 0
        assert base["ratio"] == pytest.approx(base["fp16_bytes"] / base["stored_bytes"], rel=1e-2)
        assert re.fullmatch(r"[0-9a-f]{64}", ft["manifest_id"])


def test_show_delta(astore, model_dirs, arch):
    dirs = model_dirs[arch]
    info = astore.show(f"{arch}-ft")
    assert info["name"] == f"{arch}-ft"
    assert info["kind"] == "delta"
    assert info["model_type"] == arch
    assert info["architectures"] == read_json(dirs["ft"] / "config.json")["architectures"]
    assert info["base"]["names"] == [f"{arch}-base"]
    assert info["base"]["manifest_id"] == astore.show(f"{arch}-base")["manifest_id"]
    assert info["ratio"] > 1
    assert info["ratio"] == pytest.approx(info["fp16_bytes"] / info["stored_bytes"], rel=1e-2)
    assert info["fp16_bytes"] == 2 * info["params"]

    want = expected_codecs(dirs["base"], dirs["ft"])
    counts: dict[str, int] = {}
    for c in want.values():
        counts[c] = counts.get(c, 0) + 1
    assert {c: v["tensors"] for c, v in info["codecs"].items()} == counts
    assert info["codecs"]["same"]["stored_bytes"] == 0
    sign1 = info["codecs"]["sign1"]
    # One bit per parameter, padded to 32-bit words per row.
    assert sign1["params"] / 8 <= sign1["stored_bytes"] < sign1["params"] / 8 * 1.5
    assert sum(v["params"] for v in info["codecs"].values()) == info["params"]
    assert info["n_tensors"] == len(want)
    assert {"config.json", "tokenizer.json"} <= set(info["files"])
    assert info["packing"]["zero_delta_sign"] == "+1"

    stats = info["statistics"]
    assert stats["sign1_tensors"] == counts["sign1"]
    assert 0 < stats["mean_rel_delta_norm"] <= stats["max_rel_delta_norm"] < 0.1
    assert 0 < stats["mean_rel_recon_error"] <= stats["max_rel_recon_error"] < 1
    assert "tensors" not in info


def test_show_tensors(astore, model_dirs, arch):
    dirs = model_dirs[arch]
    info = astore.show(f"{arch}-ft", tensors=True)
    want = expected_codecs(dirs["base"], dirs["ft"])
    ft = load_file(dirs["ft"] / "model.safetensors")
    assert [t["name"] for t in info["tensors"]] == sorted(want)
    for t in info["tensors"]:
        assert t["codec"] == want[t["name"]], t
        assert t["shape"] == list(ft[t["name"]].shape)
        assert t["dtype"] == "float32"
        if t["codec"] == "sign1":
            assert t["scale"] > 0 and 0 < t["rel_recon_error"] < 1 and t["rel_delta_norm"] > 0
            rows, cols = t["shape"]
            assert t["stored_bytes"] >= rows * math.ceil(cols / 32) * 4
        else:
            assert t["scale"] is None
        if t["codec"] == "same":
            assert t["stored_bytes"] == 0 and t["rel_delta_norm"] == 0


def test_show_base(astore, model_dirs, arch):
    info = astore.show(f"{arch}-base")
    assert info["kind"] == "base"
    assert "base" not in info and "statistics" not in info
    assert list(info["codecs"]) == ["dense"]
    n = len(load_file(model_dirs[arch]["base"] / "model.safetensors"))
    assert info["codecs"]["dense"]["tensors"] == info["n_tensors"] == n
    assert info["ratio"] < 1  # an fp32 base is twice its fp16 size


def test_du_and_verify(astore):
    du = astore.du()
    assert du["reserve_bytes"] == 0  # the tests keep no reserve (DELTAHUB_RESERVE_BYTES=0, conftest)
    assert du["home"] == str(astore.home)
    assert du["objects"] > 0 and du["object_bytes"] > 0 and du["unreferenced_objects"] == 0
    assert du["total_bytes"] == du["object_bytes"] + du["index_bytes"] + du["tmp_bytes"] + du["reserve_bytes"]
    assert not (astore.home / "reserve").exists()
    assert du["tmp_entries"] == du["tmp_bytes"] == du["stale_tmp_entries"] == 0
    assert {m["name"] for m in du["models"]} == {r["name"] for r in astore.list()}
    report = astore.verify()
    assert report.ok and report.objects_checked == du["objects"] and report.manifests_checked == 4


# ---------------------------------------------------------------------------------------- writing
def test_compress_options_and_names(model_dirs, tmp_path):
    dirs = model_dirs["llama"]
    with deltahub.Store(tmp_path / "s") as store:
        assert store.home == tmp_path / "s"
        added = store.add(dirs["base"])  # default name: the folder's name
        assert added.name == "base" and added.n_tensors > 0
        dense = store.compress(dirs["ft"], base="base", name="ft", embeddings="dense")
        small = store.compress(dirs["ft"], base="base", name="ft-s1")  # default: sign1 embeddings
        assert small.ratio > dense.ratio > 1
        assert small.codecs["sign1"] == dense.codecs["sign1"] + 2  # embed_tokens and lm_head
        assert math.isclose(dense.ratio, dense.fp16_bytes / dense.stored_bytes)
        with pytest.raises(NameExistsError):
            store.compress(dirs["ft"], base="base", name="ft")
        again = store.compress(dirs["ft"], base="base", name="ft", embeddings="dense", force=True)
        assert again.manifest_id == dense.manifest_id
        with pytest.raises(InputError):  # a delta is not a base
            store.compress(dirs["ft"], base="ft", name="x")
        with pytest.raises(NameNotFoundError):
            store.compress(dirs["ft"], base="nope", name="x")
        with pytest.raises(InvalidNameError):
            store.add(dirs["base"], name="a/b")
        assert {r["name"] for r in store.list()} == {"base", "ft", "ft-s1"}
        assert store.verify().ok


def test_rm_and_gc(model_dirs, tmp_path):
    from deltahub.errors import InUseError

    dirs = model_dirs["gpt2"]
    with deltahub.Store(tmp_path / "s") as store:
        store.add(dirs["base"], name="b")
        store.compress(dirs["ft"], base="b", name="f")
        with pytest.raises(InUseError):
            store.rm("b")
        before = store.du()
        assert store.rm("f")["removed"] is True
        assert store.gc(dry_run=True).objects  # something to free, nothing freed yet
        assert store.du()["object_bytes"] == before["object_bytes"]
        report = store.gc()
        assert report.objects and report.bytes > 0 and not report.dry_run
        after = store.du()
        assert after["object_bytes"] == before["object_bytes"] - report.bytes
        assert after["unreferenced_objects"] == 0
        assert store.verify().ok
        assert [r["name"] for r in store.list()] == ["b"]
        with pytest.raises(NameNotFoundError):
            store.show("f")
