"""Codec ``rowsparse``: embeddings and LM heads as their changed rows (signs + a scale per row),
unchanged rows free, added tokens (a resized vocabulary) dense."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import fine_tune_like, make_model, save_checkpoint, snapshot_store
from safetensors.torch import load_file, save_file

import deltahub
from deltahub import codec as codecs
from deltahub.cli import cli
from deltahub.codec.rowsparse import RowSparseOperator, pack_row_mask, unpack_row_mask
from deltahub.errors import CodecError as DeltaCodecError
from deltahub.errors import CorruptObjectError, InputError
from deltahub.formats.manifest import Manifest, parse_manifest
from deltahub.runtime import DeltaEmbedding, DeltaLinear
from deltahub.store import Compression
from hub_fixtures import FAKE_USER, hub_server, plant_repo  # noqa: F401

RS = "rowsparse"
INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
EMB = ("model.embed_tokens.weight", "lm_head.weight")
CHANGED_IDS = list(range(3, 40))  # the tokens "seen in training": every other row is copied from the base
ADDED = 3


def reference(base: torch.Tensor, ft: torch.Tensor, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int]:
    """The codec's contract written out row by row in plain torch (no deltahub code): rows past the
    base's are the fine-tune's; a row bit-identical to the base row (cast to the fine-tune's dtype,
    and with a zero fp32 difference when the dtypes differ) is the base row; any other row is
    ``base.float() + mean|Δ_r|·sign(Δ_r)`` (a zero gets +1), rounded once. Returns it and the
    number of changed rows."""
    out_dtype = out_dtype or ft.dtype
    out = torch.empty(ft.shape, dtype=out_dtype)
    changed = 0
    for r in range(ft.shape[0]):
        if r >= base.shape[0]:
            out[r] = ft[r].to(out_dtype)
            continue
        b, f = base[r], ft[r]
        d = f.float() - b.float()
        same_bits = torch.equal(b.to(f.dtype).view(INT[f.dtype]), f.view(INT[f.dtype]))
        if same_bits and (b.dtype == f.dtype or not bool((d != 0).any())):
            out[r] = b.float().to(out_dtype)
            continue
        changed += 1
        s = torch.tensor(float(d.double().abs().sum()) / d.numel(), dtype=torch.float32)
        out[r] = (b.float() + s * torch.where(d >= 0, 1.0, -1.0)).to(out_dtype)
    return out, changed


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _table(dtype_base: torch.dtype, dtype_ft: torch.dtype, v: int = 70, h: int = 45, added: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(v, h, generator=g).to(dtype_base)
    base[5, :3] = -0.0  # negative zeros of an unchanged row must survive
    ft = base.to(dtype_ft).clone()
    rows = [0, 1, 31, 32, 33, 50, v - 1]
    ft[rows] = (ft[rows].float() + 0.05 * torch.randn(len(rows), h, generator=g)).to(dtype_ft)
    ft[33] = (base[33].float() + 1.0).to(dtype_ft)  # a constant delta: every sign +1
    extra = torch.randn(added, h, generator=g).to(dtype_ft)
    return base, torch.cat([ft, extra]), rows


# ------------------------------------------------------------------ the codec alone
@pytest.mark.parametrize("dtype_base, dtype_ft", [
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16),
])
@pytest.mark.parametrize("added", [0, 4])
def test_decode_matches_the_plain_reference_bit_for_bit(dtype_base, dtype_ft, added):
    base, ft, rows = _table(dtype_base, dtype_ft, added=added)
    rs = codecs.get(RS)
    enc = rs.encode(base, ft)
    want, n_changed = reference(base, ft)
    if dtype_base == dtype_ft:
        assert n_changed == len(rows)
    assert enc.params == {"base_rows": 70, "changed": n_changed}
    assert set(enc.parts) == {"rows", "signs", "scales"} | ({"added"} if added else set())
    assert enc.parts["signs"].shape == (n_changed, 2) and enc.parts["scales"].shape == (n_changed, 1)
    got = rs.decode(base, enc.parts, enc.params, ft.dtype)
    assert _bits_equal(got, want)
    unchanged = [r for r in range(70) if r not in rows]
    assert _bits_equal(got[unchanged], base[unchanged].to(ft.dtype)) or dtype_base != dtype_ft
    if added:
        assert _bits_equal(got[70:], ft[70:])  # added rows exact
    # in another output dtype, and into a given buffer: the same single rounding
    want32, _ = reference(base, ft, torch.float32)
    out = torch.empty(ft.shape, dtype=torch.float32)
    assert rs.decode(base, enc.parts, enc.params, torch.float32, out=out) is out and _bits_equal(out, want32)


def test_unchanged_rows_cost_nothing_but_their_bit():
    base, ft, rows = _table(torch.bfloat16, torch.bfloat16, v=4096, h=256, added=0)
    rs = codecs.get(RS)
    enc = rs.encode(base, ft)
    nbytes = rs.stored_nbytes(tuple(ft.shape), ft.dtype, enc.params)
    assert nbytes == 4096 // 8 + len(rows) * (256 // 8 + 4)
    assert nbytes < codecs.SIGN1.stored_nbytes(tuple(ft.shape), ft.dtype, {"scale": 1.0}) / 100


def test_all_rows_unchanged_stores_only_the_bitmap_and_the_added_rows():
    base, _, _ = _table(torch.float16, torch.float16, added=0)
    extra = torch.randn(2, base.shape[1], dtype=torch.float16)
    rs = codecs.get(RS)
    for ft, parts in ((base.clone(), {"rows"}), (torch.cat([base, extra]), {"rows", "added"})):
        enc = rs.encode(base, ft)
        assert enc.params["changed"] == 0 and set(enc.parts) == parts
        assert int(enc.parts["rows"].count_nonzero()) == 0
        assert _bits_equal(rs.decode(base, enc.parts, enc.params, torch.float16), ft)
        assert enc.rel_recon_error == 0.0
    op = rs.operator(rs.encode(base, base.clone()).parts, {"base_rows": 70, "changed": 0}, (70, 45))
    x = torch.randn(3, 45)
    assert torch.equal(op.matmul(x), torch.zeros(3, 70))


def test_operator_matches_the_decoded_delta_without_building_it():
    base, ft, rows = _table(torch.float32, torch.float32, added=0)
    rs = codecs.get(RS)
    enc = rs.encode(base, ft)
    op = rs.operator(enc.parts, enc.params, tuple(ft.shape))
    assert isinstance(op, RowSparseOperator) and (op.out_features, op.in_features) == (70, 45)
    delta = rs.decode(base, enc.parts, enc.params, torch.float32) - base
    x = torch.randn(6, 45, dtype=torch.float32)
    assert torch.allclose(op.matmul(x), x @ delta.t(), atol=1e-5)
    idx = torch.tensor([0, 5, 33, 5, 69, 2])
    assert torch.allclose(op.rows(idx), delta[idx], atol=1e-7)
    # a delta-mode embedding gives the decoded rows bit for bit, -0.0 of unchanged rows included
    emb = DeltaEmbedding(base.clone(), op)
    assert _bits_equal(emb(idx), rs.decode(base, enc.parts, enc.params, torch.float32)[idx])
    # a head: base GEMM + the changed rows only
    head = DeltaLinear(base.clone(), op)
    assert torch.allclose(head(x), x @ rs.decode(base, enc.parts, enc.params, torch.float32).t(), atol=1e-5)
    # a resized table has rows without a base row: delta mode uses it as decoded
    base2, ft2, _ = _table(torch.float32, torch.float32, added=3)
    enc2 = rs.encode(base2, ft2)
    assert rs.operator(enc2.parts, enc2.params, tuple(ft2.shape)) is None


def test_row_mask_packing_is_layout_v1():
    mask = torch.zeros(70, dtype=torch.bool)
    mask[[0, 31, 32, 69]] = True
    packed = pack_row_mask(mask)
    assert packed.dtype == torch.int32 and packed.shape == (3,)
    words = [int(w) & 0xFFFFFFFF for w in packed]
    assert words == [1 | (1 << 31), 1, 1 << 5]  # LSB first: bit j of word w is row 32w + j
    assert torch.equal(unpack_row_mask(packed, 70), mask)
    with pytest.raises(codecs.CodecError, match="past the base's last row"):
        unpack_row_mask(packed, 60)


def test_bad_input_to_the_codec_is_a_clear_error():
    rs = codecs.get(RS)
    base, ft, _ = _table(torch.float32, torch.float32, added=2)
    enc = rs.encode(base, ft)
    for b, f, match in ((base, ft[:60], "V <= V'"), (base, ft[:, :40], "V <= V'"), (None, ft, "needs the base"),
                        (base, ft.to(torch.int32), "floating")):
        with pytest.raises(codecs.CodecError, match=match):
            rs.encode(b, f)
    with pytest.raises(codecs.CodecError, match="takes no options"):
        rs.encode(base, ft, planes=2)
    nan_base = base.clone()
    nan_base[1, 0] = float("nan")  # row 1 changed: its delta is not finite
    with pytest.raises(codecs.NonFiniteDeltaError, match="row 1"):
        rs.encode(nan_base, ft)
    for params, match in (({"base_rows": 70}, "changed must be"), ({"base_rows": 0, "changed": 0}, "base_rows must"),
                          ({"base_rows": 80, "changed": 1}, "base_rows must"), ({"base_rows": 70, "changed": 71}, "changed must"),
                          ({"base_rows": True, "changed": 1}, "base_rows must"), ({"base_rows": 70, "changed": 1, "x": 1}, "no parameter 'x'")):
        with pytest.raises(codecs.CodecError, match=match):
            rs.check_params(params, (72, 45))
    with pytest.raises(codecs.CodecError, match="non-empty 2-D"):
        rs.check_params({"base_rows": 1, "changed": 0}, (72,))
    with pytest.raises(codecs.CodecError, match="floating point"):
        rs.part_specs((72, 45), torch.int8, enc.params)
    # parts that do not fit the parameters, and a bitmap that disagrees with them
    for broken, match in (({**enc.parts, "signs": enc.parts["signs"][:-1]}, "part 'signs'"),
                          ({k: v for k, v in enc.parts.items() if k != "scales"}, "needs its part 'scales'"),
                          ({**enc.parts, "rows": torch.zeros_like(enc.parts["rows"])}, "marks 0 changed rows"),
                          ({**enc.parts, "scales": enc.parts["scales"].clone().fill_(float("inf"))}, "not finite")):
        with pytest.raises(codecs.CodecError, match=match):
            rs.decode(base, broken, enc.params, torch.float32)
    with pytest.raises(codecs.CodecError, match="base table of 70 rows"):
        rs.decode(base[:69], enc.parts, enc.params, torch.float32)


# ------------------------------------------------------------------ through the store and the Hub
def _pair(root: Path, arch: str = "llama", added: int = 0) -> tuple[Path, Path]:
    """A base and a fine-tune whose embedding rows changed only for ``CHANGED_IDS`` (the others are
    copied back from the base, as for tokens never seen in training), optionally with ``added``
    new tokens (a resized vocabulary, deterministic rows)."""
    model = make_model(arch)
    base = save_checkpoint(model, root / f"{arch}-base")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fine_tune_like(model)
    keep = [i for i in range(model.config.vocab_size) if i not in CHANGED_IDS]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")):
                p[keep] = before[n][keep]
        if added:
            v = model.config.vocab_size
            model.resize_token_embeddings(v + added)
            g = torch.Generator().manual_seed(9)
            for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
                emb.weight[v:] = 0.02 * torch.randn(added, emb.weight.shape[1], generator=g)
    return base, save_checkpoint(model, root / f"{arch}-ft-{added}")


def _manifest(store, name: str) -> Manifest:
    return parse_manifest(store._ctx.objects.read(store.show(name)["manifest_id"]))


def _check_checkpoint(out: Path, base_dir: Path, ft_dir: Path, man: Manifest) -> None:
    """Every rowsparse tensor of a written checkpoint equals the plain reference, bit for bit."""
    base = load_file(base_dir / "model.safetensors")
    ft = load_file(ft_dir / "model.safetensors")
    got = load_file(out / "model.safetensors")
    checked = 0
    for name, rec in man.tensors.items():
        if rec.codec == RS:
            want, n_changed = reference(base[name], ft[name])
            assert rec.params["changed"] == n_changed
            assert _bits_equal(got[name], want), name
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("added", [0, ADDED])
def test_compress_push_pull_materialize_round_trip(store, tmp_path, hub_server, added):
    base_dir, ft_dir = _pair(tmp_path, added=added)
    store.add(base_dir, name="base")
    result = store.compress(ft_dir, base="base", name="rs", embeddings=RS)
    man = _manifest(store, "rs")
    assert man.version() == 2 and {n for n, r in man.tensors.items() if r.codec == RS} == set(EMB)
    for name in EMB:
        rec = man.tensors[name]
        assert rec.params == {"base_rows": 128, "changed": len(CHANGED_IDS)}
        assert rec.shape == (128 + added, 64) and ("added" in rec.parts) == bool(added)
        assert man.base.tensors[name] == _manifest(store, "base").tensors[name].object  # the base table is pinned
    assert result.codecs[RS] == 2
    store.materialize("rs", tmp_path / "a_out")
    _check_checkpoint(tmp_path / "a_out", base_dir, ft_dir, man)

    plant_repo(hub_server, "someone/tiny-base", "e" * 40)
    store.push("rs", f"{FAKE_USER}/rs-{added}", base_repo="someone/tiny-base@" + "e" * 40)
    b = deltahub.Store(tmp_path / "b")
    try:
        b.add(base_dir, name="base")
        assert b.pull(f"{FAKE_USER}/rs-{added}", name="rs").manifest_id == store.show("rs")["manifest_id"]
        b.materialize("rs", tmp_path / "b_out")
        assert (tmp_path / "b_out" / "model.safetensors").read_bytes() == (tmp_path / "a_out" / "model.safetensors").read_bytes()
        assert b.verify().ok
    finally:
        b.close()


def test_rowsparse_is_smaller_than_sign1_when_rows_stay_unchanged(store, tmp_path):
    base_dir, ft_dir = _pair(tmp_path)
    store.add(base_dir, name="base")
    store.compress(ft_dir, base="base", name="rs", embeddings=RS)
    store.compress(ft_dir, base="base", name="s1")
    stats = {n: {t["name"]: t for t in store.show(n, tensors=True)["tensors"]} for n in ("rs", "s1")}
    for name in EMB:
        assert stats["s1"][name]["codec"] == "sign1" and stats["rs"][name]["codec"] == RS
        assert stats["rs"][name]["stored_bytes"] < stats["s1"][name]["stored_bytes"] / 2
    # every other tensor is stored the same way
    others = set(stats["s1"]) - set(EMB)
    assert all(stats["rs"][n]["codec"] == stats["s1"][n]["codec"] for n in others)


@pytest.mark.parametrize("arch, added", [("llama", 0), ("llama", ADDED), ("gpt2", 0)])
def test_delta_mode_equals_materialize(store, tmp_path, arch, added):
    """Delta mode: an unresized table becomes a DeltaEmbedding (and head: DeltaLinear, tied on GPT-2)
    over the rowsparse operator; a resized one is used as decoded. Both give materialize's logits."""
    base_dir, ft_dir = _pair(tmp_path, arch, added)
    store.add(base_dir, name="base")
    store.compress(ft_dir, base="base", name="rs", embeddings=RS)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    ids[0, :4] = torch.tensor(CHANGED_IDS[:4])
    with torch.no_grad():
        mat = store.load_model("rs")(ids).logits
        model = store.load_model("rs", mode="delta")
        got = model(ids).logits
    emb = model.get_input_embeddings()
    if added:
        assert not isinstance(emb, DeltaEmbedding) and emb.weight.shape[0] == 128 + added
    else:
        assert isinstance(emb, DeltaEmbedding) and isinstance(emb.delta, RowSparseOperator)
        head = model.get_output_embeddings()
        assert isinstance(head, DeltaLinear) and isinstance(head.delta, RowSparseOperator)
    assert torch.allclose(got, mat, atol=1e-4, rtol=1e-4)
    # and materialize itself is the plain reference (the checkpoint's tensors, bit for bit)
    store.materialize("rs", tmp_path / "out")
    _check_checkpoint(tmp_path / "out", base_dir, ft_dir, _manifest(store, "rs"))


def test_multi_tenant_serves_rowsparse_next_to_sign1(store, tmp_path):
    base_dir, ft_dir = _pair(tmp_path)
    store.add(base_dir, name="base")
    store.compress(ft_dir, base="base", name="rs", embeddings=RS)
    store.compress(ft_dir, base="base", name="s1")
    ids = torch.tensor([CHANGED_IDS[:5] + [100, 101]])
    with torch.no_grad():
        mt = store.load_multi_tenant(["rs", "s1"])
        batch = mt(ids.repeat(2, 1), ["rs", "s1"]).logits
        rs = store.load_model("rs")(ids).logits
        s1 = store.load_model("s1")(ids).logits
    assert torch.allclose(batch[0], rs[0], atol=1e-4, rtol=1e-4)
    assert torch.allclose(batch[1], s1[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(rs, s1, atol=1e-4)


def test_cli_embeddings_rowsparse(store, tmp_path):
    base_dir, ft_dir = _pair(tmp_path, added=ADDED)
    store.add(base_dir, name="base")
    home = str(store._ctx.home)
    r = CliRunner().invoke(cli, ["--home", home, "compress", str(ft_dir), "--base", "base", "--name", "x",
                                 "--embeddings", RS, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["codecs"][RS] == 2
    r = CliRunner().invoke(cli, ["--home", home, "compress", str(ft_dir), "--base", "base", "--name", "y",
                                 "--embeddings", "sparse"])
    assert r.exit_code == 2 and "rowsparse" in r.output
    # today's modes keep working on a resized vocabulary: the table is stored dense
    store.compress(ft_dir, base="base", name="s1")
    assert {_manifest(store, "s1").tensors[n].codec for n in EMB} == {"dense"}


# ------------------------------------------------------------------ bad input changes nothing
def test_unknown_embeddings_mode_is_refused_and_changes_nothing(store, tmp_path):
    base_dir, ft_dir = _pair(tmp_path)
    store.add(base_dir, name="base")
    before = snapshot_store(store._ctx.home)
    with pytest.raises(InputError, match="unknown embeddings mode 'sparse'") as info:
        store.compress(ft_dir, base="base", name="x", embeddings="sparse")
    assert "rowsparse" in info.value.hint
    assert snapshot_store(store._ctx.home) == before


def test_nonfinite_embedding_is_refused_and_changes_nothing(store, tmp_path):
    base_dir, ft_dir = _pair(tmp_path)
    tensors = load_file(ft_dir / "model.safetensors")
    tensors["model.embed_tokens.weight"][7, 3] = float("nan")  # an unchanged row gets a NaN
    save_file(tensors, ft_dir / "model.safetensors", metadata={"format": "pt"})
    store.add(base_dir, name="base")
    before = snapshot_store(store._ctx.home)
    with pytest.raises(DeltaCodecError, match="NaN"):
        store.compress(ft_dir, base="base", name="x", embeddings=RS)
    assert snapshot_store(store._ctx.home) == before
    # allowed: that table cannot be a sign delta, so it is stored dense, bit for bit
    store.compress(ft_dir, base="base", name="x", embeddings=RS, allow_nonfinite=True)
    man = _manifest(store, "x")
    assert man.tensors["model.embed_tokens.weight"].codec == "dense" and man.tensors["lm_head.weight"].codec == RS


def _tampered(store, edit, objects=None) -> tuple[str, Exception | None]:
    """Store a copy of the ``rs`` manifest changed by ``edit`` (raw JSON) under the name ``t``;
    returns its id, or the parse error when the manifest reader refuses it."""
    raw = json.loads(store._ctx.objects.read(store.show("rs")["manifest_id"]))
    edit(raw["tensors"]["lm_head.weight"])
    data = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    try:
        man = parse_manifest(data)
    except Exception as exc:  # noqa: BLE001 - the test checks the type and message
        return "", exc
    ctx = store._ctx
    with ctx.writing():
        info = ctx.put(man.to_bytes(), Compression.AUTO)
        ctx.register(man, info, dict(objects or {}), [], "t", force=True)
    return info.sha256, None


def test_tampered_manifests_give_clear_errors(store, tmp_path):
    base_dir, ft_dir = _pair(tmp_path)
    store.add(base_dir, name="base")
    store.compress(ft_dir, base="base", name="rs", embeddings=RS)
    # a part missing, corrupt parameters: the manifest reader refuses them
    for edit, match in ((lambda t: t["parts"].pop("signs"), "expected \\['rows', 'scales', 'signs'\\]"),
                        (lambda t: t["params"].update(changed=129), "changed must be an int in 0..128"),
                        (lambda t: t["params"].update(base_rows="128"), "base_rows must be an int"),
                        (lambda t: t.update(dtype="int8"), "must be floating point")):
        _, exc = _tampered(store, edit)
        assert isinstance(exc, CorruptObjectError) and exc is not None and _match(match, str(exc))
    # parameters that parse but do not fit the stored parts: verify names the part and the sizes
    mid, exc = _tampered(store, lambda t: t["params"].update(changed=len(CHANGED_IDS) - 1))
    assert exc is None
    report = store.verify()
    assert not report.ok
    details = [p["detail"] for p in report.problems if p["subject"] == mid]
    assert any("part 'signs' of tensor 'lm_head.weight'" in d and "layout needs" in d for d in details), details
    # and reading it fails, never a misread model
    with pytest.raises(CorruptObjectError, match=r"expected 144 for float32\[36, 1\]"):
        store.materialize("t", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # a bitmap whose count disagrees with the parameters (all sizes right): the decode names the tensor
    from deltahub.formats.safetensors_io import tensor_bytes

    mask = torch.zeros(128, dtype=torch.bool)
    mask[CHANGED_IDS + [100]] = True
    with store._ctx.writing():
        rows = store._ctx.put(tensor_bytes(pack_row_mask(mask)), Compression.NONE)
    _tampered(store, lambda t: t["parts"].update(rows=rows.sha256), {rows.sha256: rows})
    with pytest.raises(CorruptObjectError, match=r"'lm_head.weight' cannot be rebuilt: the rows bitmap marks 38 changed rows, the manifest says 37"):
        store.materialize("t", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def _match(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


def test_rowsparse_as_the_matrix_codec_is_refused_nowhere(store, model_dirs, tmp_path):
    """``--codec rowsparse`` is a valid (if pointless) delta codec for every matrix: every row
    changes, so it is sign1 with per-row scales plus the bitmap; it reads back exactly."""
    store.add(model_dirs["llama"]["base"], name="base")
    store.compress(model_dirs["llama"]["ft"], base="base", name="m", codec=RS)
    man = _manifest(store, "m")
    assert sum(r.codec == RS for r in man.tensors.values()) > 2
    store.materialize("m", tmp_path / "o")
    got = load_file(tmp_path / "o" / "model.safetensors")
    base = load_file(model_dirs["llama"]["base"] / "model.safetensors")
    ft = load_file(model_dirs["llama"]["ft"] / "model.safetensors")
    for name, rec in man.tensors.items():
        if rec.codec == RS:
            assert _bits_equal(got[name], reference(base[name], ft[name])[0]), name
    assert math.isfinite(store.show("m")["stored_bytes"])
