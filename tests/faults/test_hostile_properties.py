"""Hostile inputs (issue 9), property-based: generated safetensors files, manifests and Hub repos.

* **safetensors**: files built from a random valid layout, then mutated (duplicate keys, gaps,
  overlaps, trailing bytes, odd numbers, NaN, deep nesting, escapes, padding, a wrong header
  length, flipped bytes, ...) are given to deltahub's reader and to the ``safetensors`` library.
  Whenever deltahub accepts a file, the library accepts it too and both read the same tensors;
  whenever the library refuses, deltahub refuses with :class:`MalformedSafetensorsError` (a one-line
  deltahub error), never another exception. deltahub is deliberately stricter in the documented
  ways only (:data:`STRICTER`; docs/design.md).
* **manifests**: mutated store manifests are refused with a deltahub error or parse to a manifest
  whose tensor names are valid, whose scales are finite and which re-serializes; a delta that is
  accepted against its base lists every base tensor.
* **Hub repos**: mutated ``deltahub.json`` files (parsed), and a few mutated repos pulled end to end
  through the local Hub server: a pull either stores a delta that materializes every base tensor
  or fails with a deltahub error and leaves the store byte for byte unchanged.

``pytest --soak`` runs many more examples. Figures go to :func:`fault_report.record`.
"""

from __future__ import annotations

import collections
import copy
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import snapshot_store
from fault_report import record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltahub
from deltahub.errors import (
    CorruptObjectError,
    DeltaHubError,
    InvalidNameError,
    MalformedSafetensorsError,
    UnsupportedFormatError,
)
from deltahub.formats.manifest import ModelKind, parse_manifest
from deltahub.formats.paths import is_stored_tensor_name, is_tensor_name
from deltahub.formats.safetensors_io import SafetensorsReader
from deltahub.hub.layout import parse_hub_manifest

#: Ways deltahub's reader refuses files the library accepts, on purpose (words of our message).
STRICTER = {
    "duplicate key": "a key twice (the library keeps the last one silently)",
    "levels deep": "nesting over 64 levels (the library allows 128)",
    "unsupported dtype": "dtypes deltahub does not read (U16, U32, U64, F8_E8M0, F4, ...)",
    "past int64": "dimensions beyond int64 (torch cannot build the tensor; the library fails later)",
}


def _n(soak: bool, ci: int, long: int) -> settings:
    return settings(
        max_examples=long if soak else ci,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------------------ a JSON writer
class Raw(str):
    """A JSON token written verbatim (NaN, 1e999, -0, a bad escape, ...)."""


class Obj(list):
    """A JSON object as a list of [key, value] pairs: keys may repeat, order is kept."""


def dumps(value: Any, ascii_only: bool = True) -> str:
    if isinstance(value, Raw):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=ascii_only)
    if isinstance(value, Obj):
        return "{" + ",".join(f"{dumps(k, ascii_only)}:{dumps(v, ascii_only)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return dumps(Obj([k, v] for k, v in value.items()), ascii_only)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v, ascii_only) for v in value) + "]"
    raise TypeError(type(value))


def to_obj(value: Any) -> Any:
    """Plain JSON (dicts) -> the editable form (Obj)."""
    if isinstance(value, dict):
        return Obj([k, to_obj(v)] for k, v in value.items())
    if isinstance(value, list):
        return [to_obj(v) for v in value]
    return value


def get(obj: Any, key: str) -> Any:
    """The value of the first ``key`` of an Obj, or None."""
    if isinstance(obj, Obj):
        for k, v in obj:
            if k == key:
                return v
    return None


# ------------------------------------------------------------------------ safetensors files
BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
    "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "U16": 16, "U32": 32, "U64": 64, "F8_E8M0": 8, "C64": 64, "F4": 4,
}
COMMON = ["F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F64", "I16", "F8_E4M3", "F8_E5M2"]
ODD_DTYPES = ["U16", "U32", "U64", "F8_E8M0", "F4", "C64", "f32", "F33", "", "float32"]
WEIRD_NUMBERS = [
    "true", "false", "1.0", "-0", "-1", "1e0", "0.5", "18446744073709551615", "18446744073709551616",
    "9223372036854775808", "NaN", "Infinity", "-Infinity", "null", '"1"', "[]", "{}", "1" + "0" * 30,
]
HOSTILE_VALUES = [
    "NaN", "-Infinity", "1e999", "-1e999", "1e-400", "123456789012345678901234567890", "-5", "true",
    '"\\ud800"', '"\\udc00x"', '"\\ud83d\\ude00"', '"\\u0000"', '"\\q"', '"a\\u001fb"', '{"k":1,"k":2}',
    '"' + "x" * 300 + '"', "[1,[2,[3]]]", '{"__metadata__":1}',
]
NAME_TOKENS = [
    '"\\u0061"', '"\\ud800"', '"\\ud83d\\ude00"', '"a\\u0000b"', '"\\q"', '"a\x01b"', '""', '"__metadata__"',
    '"../../evil"', '"a b"', '"\\u00e9t\\u00e9"',
]
PAD_CHARS = [" ", "\t", "\n", "\r", "\x00", "\x0c", "\ufeff", "\xa0", "\x0b"]
MUTATIONS = [
    "dup_entry", "shift_offset", "gap", "trailing", "truncate", "weird_number", "extra_field", "deep_extra",
    "metadata", "dup_metadata", "name_token", "drop_field", "dtype", "pad_before", "pad_after",
    "declared_len", "flip", "top_level", "cut_header", "unicode_name", "non_ascii_raw",
]

names_st = st.one_of(
    st.from_regex(r"[a-z_][a-z0-9_]{0,8}(\.[a-z0-9_]{1,6}){0,3}", fullmatch=True),
    st.text(min_size=0, max_size=6),
)


@st.composite
def safetensors_files(draw) -> tuple[bytes, list[str]]:
    n = draw(st.integers(0, 4))
    names = draw(st.lists(names_st, min_size=n, max_size=n, unique=True).filter(lambda ns: "__metadata__" not in ns))
    entries: list[Obj] = []
    sizes = []
    for _name in names:
        dtype = draw(st.sampled_from(COMMON) if draw(st.integers(0, 9)) else st.sampled_from(ODD_DTYPES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        numel = 1
        for d in shape:
            numel *= d
        sizes.append((numel * BITS.get(dtype, 32) + 7) // 8)
        entries.append(Obj([["dtype", dtype], ["shape", shape], ["data_offsets", [0, 0]]]))
    order = draw(st.permutations(range(n)))
    pos = 0
    for i in order:
        get(entries[i], "data_offsets")[:] = [pos, pos + sizes[i]]
        pos += sizes[i]
    data = bytearray(draw(st.binary(min_size=pos, max_size=pos)))
    header = Obj([names[i], entries[i]] for i in draw(st.permutations(range(n))))
    meta = draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.text(max_size=6), max_size=2)))
    if meta is not None:
        header.insert(draw(st.integers(0, len(header))), ["__metadata__", dict(meta)])
    done = draw(st.lists(st.sampled_from(MUTATIONS), max_size=3))
    before, after, declared_delta, flips, cut = "", "", 0, [], None
    ascii_only = True
    for m in done:
        tensors = [p for p in header if isinstance(p[1], Obj) and p[0] != "__metadata__"] if isinstance(header, Obj) else []
        pick = (lambda: draw(st.sampled_from(tensors))) if tensors else None
        if m == "dup_entry" and pick:
            k, v = pick()
            twin = copy.deepcopy(v)
            if draw(st.booleans()):
                off = get(twin, "data_offsets")
                if isinstance(off, list) and all(isinstance(o, int) for o in off):
                    extra = off[1] - off[0]
                    off[:] = [len(data), len(data) + extra]
                    data += b"\0" * extra
            header.insert(draw(st.integers(0, len(header))), [k, twin])
        elif m == "shift_offset" and pick:
            off = get(pick()[1], "data_offsets")
            if isinstance(off, list) and len(off) == 2 and all(isinstance(o, int) for o in off):
                j = draw(st.integers(0, 1))
                off[j] = max(0, off[j] + draw(st.sampled_from([-8, -4, -2, -1, 1, 2, 4, 8])))
        elif m == "gap" and pick:
            k = draw(st.integers(1, 8))
            start = get(pick()[1], "data_offsets")
            if isinstance(start, list) and start and type(start[0]) is int and start[0] <= len(data):
                cut_at = start[0]
                for _k, v in tensors:
                    off = get(v, "data_offsets")
                    if isinstance(off, list) and all(isinstance(o, int) for o in off) and off[0] >= cut_at:
                        off[:] = [off[0] + k, off[1] + k]
                data[cut_at:cut_at] = b"\xab" * k
        elif m == "trailing":
            data += draw(st.binary(min_size=1, max_size=9))
        elif m == "truncate" and data:
            del data[-draw(st.integers(1, len(data))) :]
        elif m == "weird_number" and pick:
            v = pick()[1]
            field = draw(st.sampled_from(["shape", "data_offsets"]))
            arr = get(v, field)
            if isinstance(arr, list) and arr:
                arr[draw(st.integers(0, len(arr) - 1))] = Raw(draw(st.sampled_from(WEIRD_NUMBERS)))
            elif isinstance(arr, list):
                arr.append(Raw(draw(st.sampled_from(WEIRD_NUMBERS))))
        elif m == "extra_field" and pick:
            pick()[1].append([draw(st.sampled_from(["x", "dtype", "shape", "data_offsets"])),
                              Raw(draw(st.sampled_from(HOSTILE_VALUES)))])
        elif m == "deep_extra" and pick:
            depth = draw(st.sampled_from([5, 60, 62, 63, 64, 65, 126, 127, 128, 129, 2000]))
            pick()[1].append(["x", Raw("[" * depth + "]" * depth)])
        elif m == "metadata" and isinstance(header, Obj):
            value = draw(st.sampled_from(['{"a":"b"}', '{"a":1}', "null", "[]", '"x"', '{"a":"b","a":"c"}',
                                          '{"a":"\\ud800"}', '{"a":NaN}', "{}"]))
            header.insert(draw(st.integers(0, len(header))), ["__metadata__", Raw(value)])
        elif m == "dup_metadata" and isinstance(header, Obj):
            header.append(["__metadata__", {}])
            header.append(["__metadata__", {}])
        elif m == "name_token" and pick:
            pick()[0] = Raw(draw(st.sampled_from(NAME_TOKENS)))
        elif m == "drop_field" and pick:
            v = pick()[1]
            gone = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            v[:] = [p for p in v if p[0] != gone]
        elif m == "dtype" and pick:
            v = pick()[1]
            for p in v:
                if p[0] == "dtype":
                    p[1] = draw(st.sampled_from([*ODD_DTYPES, Raw("null"), Raw("[]"), Raw("1"), Raw('{"a":1}')]))
        elif m == "pad_before":
            before = "".join(draw(st.lists(st.sampled_from(PAD_CHARS), min_size=1, max_size=3)))
        elif m == "pad_after":
            after = "".join(draw(st.lists(st.sampled_from(PAD_CHARS), min_size=1, max_size=9)))
        elif m == "declared_len":
            declared_delta = draw(st.sampled_from([-9, -8, -1, 1, 8, 10**9, -(10**3)]))
        elif m == "flip":
            flips.append((draw(st.integers(0, 10**6)), draw(st.integers(1, 255))))
        elif m == "top_level":
            header = Raw(draw(st.sampled_from(["[]", "null", "1", '""', "{}", "[{}]", "true"])))
        elif m == "cut_header":
            cut = draw(st.integers(0, 10**6))
        elif m == "unicode_name" and pick:
            pick()[0] = draw(st.text(min_size=1, max_size=4))
        elif m == "non_ascii_raw":
            ascii_only = False
    text = before + dumps(header, ascii_only) + after
    raw = bytearray(text.encode("utf-8", "surrogatepass"))
    if cut is not None and raw:
        del raw[cut % len(raw) :]
    for where, x in flips:
        if raw:
            raw[where % len(raw)] ^= x
    declared = max(0, len(raw) + declared_delta)
    return struct.pack("<Q", declared) + bytes(raw) + bytes(data), done


def _ours(path: Path) -> dict[str, tuple[torch.dtype, tuple, bytes]] | MalformedSafetensorsError:
    try:
        reader = SafetensorsReader(path)
    except MalformedSafetensorsError as exc:
        return exc
    out = {}
    for name in reader.names():
        t = reader.read(name)
        v = reader.read(name, copy=False)
        assert torch.equal(t.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
        out[name] = (t.dtype, tuple(t.shape), bytes(t.reshape(-1).view(torch.uint8).numpy()))
    return out


def _library(path: Path) -> dict[str, tuple[torch.dtype, tuple, bytes]] | Exception:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            out = {}
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = (t.dtype, tuple(t.shape), bytes(t.reshape(-1).contiguous().view(torch.uint8).numpy()))
            return out
    except Exception as exc:  # the library raises SafetensorError, but also TypeError/ValueError/...
        return exc


def check_against_library(path: Path, data: bytes, tally: collections.Counter) -> None:
    path.write_bytes(data)
    tally["tried"] += 1
    ours = _ours(path)  # any exception other than MalformedSafetensorsError fails the test
    lib = _library(path)
    if isinstance(ours, MalformedSafetensorsError):
        tally["rejected"] += 1
        message = str(ours)
        assert "\n" not in message and message.startswith(path.name)
        if isinstance(lib, Exception):
            tally["rejected_both"] += 1
        else:  # deliberately stricter: one of the documented ways only
            why = [k for k in STRICTER if k in message]
            assert why, f"deltahub refused a file the library accepts: {message}"
            tally[f"stricter:{why[0]}"] += 1
        return
    assert not isinstance(lib, Exception), f"deltahub accepted a file the library refuses: {lib!r}"
    assert ours == lib
    tally["accepted_both"] += 1


def test_safetensors_reader_against_the_library(tmp_path, soak):
    tally: collections.Counter = collections.Counter()
    path = tmp_path / "model.safetensors"
    mutated: collections.Counter = collections.Counter()

    @_n(soak, 1500, 30000)
    @given(safetensors_files())
    def run(case):
        data, done = case
        mutated.update(done or ["none"])
        check_against_library(path, data, tally)

    run()
    record("hostile/safetensors", **tally, mutations=dict(mutated))
    assert tally["accepted_both"] > 0 and tally["rejected_both"] > 0


TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
                torch.uint8, torch.bool, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


@st.composite
def state_dicts(draw) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True), max_size=5, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(TORCH_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = int(torch.tensor(shape).prod()) if shape else 1
        raw = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        if dtype is torch.bool:
            t = t % 2
        out[name] = t.view(dtype).reshape(shape)
    return out


def test_files_written_by_the_library_are_read_the_same(tmp_path, soak):
    """The other direction: deltahub accepts every file the library writes (not too strict)."""
    from safetensors.torch import save

    tally: collections.Counter = collections.Counter()
    path = tmp_path / "model.safetensors"

    @_n(soak, 300, 5000)
    @given(state_dicts(), st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)))
    def run(sd, meta):
        data = save(sd, metadata=meta)
        check_against_library(path, data, tally)
        # Never stricter on what the library writes. (Both refuse one thing it writes: safetensors
        # 0.8.0 saves an empty dict with metadata={} as the invalid header `{},"__metadata__":{}}`.)
        assert not [k for k in tally if k.startswith("stricter")], tally
        assert tally["rejected"] == tally["rejected_both"]

    run()
    record("hostile/safetensors-library-written", **tally)


# ------------------------------------------------------------------------------ safe_json
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=40,
)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def test_safe_json_is_json_within_its_limits(soak):
    """safe_json.loads reads exactly what json.loads reads, and measures nesting exactly (brackets in
    strings, escaped quotes and non-ASCII text included), on valid documents."""
    from deltahub.formats import safe_json

    tally: collections.Counter = collections.Counter()

    @_n(soak, 300, 5000)
    @given(json_values, st.booleans(), st.integers(0, 3))
    def run(value, ascii_only, indent):
        text = json.dumps(value, ensure_ascii=ascii_only, indent=indent or None)
        tally["tried"] += 1
        assert safe_json.nesting_depth(text) == safe_json.nesting_depth(text.encode()) == _depth(value)
        strict = safe_json.loads(text.encode(), allow_nan=False, unique_keys=True, strict_unicode=True)
        assert strict == json.loads(text)

    run()
    for depth in (63, 64, 65, 999, 5000):
        doc = "[" * depth + '"]["' + "]" * depth
        assert safe_json.nesting_depth(doc) == depth
        if depth <= safe_json.MAX_DEPTH:
            safe_json.loads(doc)
        else:
            with pytest.raises(safe_json.JSONInputError, match="levels deep"):
                safe_json.loads(doc)
            tally["rejected"] += 1
    record("hostile/json", **tally)


# ---------------------------------------------------------------------------------- manifests
@pytest.fixture(scope="module")
def stored(tmp_path_factory, model_dirs):
    """A store with the llama base and a compressed fine-tune: (store, base raw, delta raw)."""
    home = tmp_path_factory.mktemp("hostile-props") / "store"
    store = deltahub.Store(home)
    store.add(model_dirs["llama"]["base"], name="base")
    store.compress(model_dirs["llama"]["ft"], base="base", name="ft")
    ctx = store._ctx
    base = bytes(ctx.objects.read(ctx.resolve("base").manifest_id))
    delta = bytes(ctx.objects.read(ctx.resolve("ft").manifest_id))
    yield store, base, delta
    store.close()


BAD_NAMES = ["../../evil", "", "a..b", "a b", "__metadata__", "x" * 513, "a\nb", "é", "model.layers.0.evil.weight",
             "lm_head.weight", "/abs", "a/b"]
ODD_VALUES = [Raw(v) for v in ["NaN", "Infinity", "1e999", "-0", "true", "null", '"x"', "[]", "{}", "1e-400",
                                "-1", "0", "1" + "0" * 30, "[" * 100 + "]" * 100, '"\\ud800"', "3.5", "2"]]


def _slots(value: Any) -> list[tuple[Any, int]]:
    """Every (container, index) inside ``value``: for an Obj, index is a pair's position."""
    out: list[tuple[Any, int]] = []
    if isinstance(value, Obj):
        for i, (_k, v) in enumerate(value):
            out.append((value, i))
            out += _slots(v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.append((value, i))
            out += _slots(v)
    return out


@st.composite
def manifest_mutations(draw, raw: bytes) -> bytes:
    """A manifest with 1-3 of: a value replaced by an odd one, a key renamed (tensor names among
    them), an entry deleted or duplicated."""
    obj = to_obj(json.loads(raw))
    for m in draw(st.lists(st.sampled_from(["value", "key", "delete", "duplicate"]), min_size=1, max_size=3)):
        slots = _slots(obj)
        if not slots:
            break
        container, i = slots[draw(st.integers(0, len(slots) - 1))]
        if m == "value":
            if isinstance(container, Obj):
                container[i][1] = draw(st.sampled_from(ODD_VALUES))
            else:
                container[i] = draw(st.sampled_from(ODD_VALUES))
        elif m == "key" and isinstance(container, Obj):
            container[i][0] = draw(st.sampled_from(BAD_NAMES))
        elif m == "delete":
            del container[i]
        elif m == "duplicate" and isinstance(container, Obj):
            container.append(copy.deepcopy(container[i]))
    return dumps(obj).encode()


def _check_manifest(data: bytes, ctx, tally: collections.Counter) -> None:
    tally["tried"] += 1
    try:
        m = parse_manifest(data)
    except (CorruptObjectError, UnsupportedFormatError, InvalidNameError) as exc:  # one-line errors
        tally["rejected"] += 1
        assert "\n" not in str(exc)
        return
    tally["accepted"] += 1
    names = list(m.tensors) + (list(m.base.tensors) if m.base else [])
    assert all(is_stored_tensor_name(n) for n in names), names  # stored manifests: the lenient rule
    try:  # the same bytes from outside (a pull) must follow today's rule
        parse_manifest(data, strict_names=True)
        assert all(is_tensor_name(n) for n in names), names
    except CorruptObjectError as exc:
        assert "tensor name" in str(exc) and not all(is_tensor_name(n) for n in names), str(exc)
        tally["strict_name_rejected"] += 1
    assert all(isinstance(r.scale, float) and r.scale == r.scale and abs(r.scale) != float("inf")
               for r in m.tensors.values() if r.scale is not None)
    m.to_bytes()  # serializable: no NaN, no odd types
    if m.kind is ModelKind.DELTA:
        try:
            _base_id, base = ctx.base_of(m)
        except DeltaHubError as exc:
            tally["refused_against_base"] += 1
            assert "\n" not in str(exc)
            return
        assert set(base.tensors) <= set(m.tensors)


def test_manifests(stored, soak):
    store, base_raw, delta_raw = stored
    ctx = store._ctx
    tally: collections.Counter = collections.Counter()
    for raw in (base_raw, delta_raw):
        _check_manifest(raw, ctx, tally)
    assert tally["accepted"] == 2

    @_n(soak, 400, 10000)
    @given(st.sampled_from([base_raw, delta_raw]).flatmap(manifest_mutations))
    def run(data):
        _check_manifest(data, ctx, tally)

    run()
    record("hostile/manifests", **tally)
    assert tally["rejected"] > 0


# -------------------------------------------------------------------------------- Hub repos
huggingface_hub = pytest.importorskip("huggingface_hub")
from hub_fixtures import FAKE_USER, hub_server, plant_repo  # noqa: E402,F401
from test_hostile_inputs import rehash  # noqa: E402

REPO = f"{FAKE_USER}/hostile-delta"
BASE_REPO, BASE_REV = "someone/tiny-base", "b" * 40


def _hub_json_from(store) -> dict:
    from deltahub.hub.layout import hub_manifest, plan_layout

    ctx = store._ctx
    resolved = ctx.resolve("ft")
    layout = plan_layout(resolved.manifest, 1 << 30)
    return hub_manifest(resolved.manifest, resolved.manifest_id, layout, BASE_REPO, BASE_REV)


@st.composite
def hub_mutations(draw, hub: dict) -> bytes:
    hub = copy.deepcopy(hub)
    kinds = draw(st.lists(st.sampled_from(
        ["rename", "drop", "scale", "stored", "file", "files", "base", "add", "codec", "none"]), min_size=1, max_size=3))
    for kind in kinds:
        name = draw(st.sampled_from(sorted(hub["tensors"]))) if hub["tensors"] else None
        if kind == "rename" and name:
            new = draw(st.sampled_from(BAD_NAMES))
            hub["tensors"][new] = hub["tensors"].pop(name)
            if name in hub["base"]["tensors"] and draw(st.booleans()):
                hub["base"]["tensors"][new] = hub["base"]["tensors"].pop(name)
        elif kind == "drop" and name:
            del hub["tensors"][name]
            hub["base"]["tensors"].pop(name, None)
        elif kind == "scale" and name:
            hub["tensors"][name]["scale"] = Raw(draw(st.sampled_from(["NaN", "1e999", "-Infinity", "true", '"1"', "0"])))
        elif kind == "stored" and name and "sha256" in hub["tensors"][name]:
            field = draw(st.sampled_from(["stored_shape", "stored_dtype", "key", "sha256"]))
            hub["tensors"][name][field] = draw(st.sampled_from(ODD_VALUES + [Raw('"int64"'), Raw("[1]")]))
        elif kind == "file" and name and "sha256" in hub["tensors"][name]:
            hub["tensors"][name]["file"] = draw(st.sampled_from(
                ["../delta.safetensors", "model.safetensors", "/etc/passwd", "delta-00001-of-00001.safetensors", ""]))
        elif kind == "files":
            fname = draw(st.sampled_from(["model.safetensors", "../x.json", "README.md", "tokenizer.json", "a/b.json"]))
            hub["files"][fname] = {"sha256": "0" * 64}
        elif kind == "base":
            hub["base"]["tensors"][draw(st.sampled_from(BAD_NAMES))] = "0" * 64
        elif kind == "add":
            hub["tensors"][draw(st.sampled_from(BAD_NAMES))] = copy.deepcopy(hub["tensors"][name]) if name else {}
        elif kind == "codec" and name:
            hub["tensors"][name]["codec"] = draw(st.sampled_from(["same", "dense", "sign1", "zzz"]))
    text = dumps(to_obj(hub))
    obj_for_hash = None
    if draw(st.booleans()):  # self-consistent: the attacker recomputes `manifest`
        try:
            obj_for_hash = json.loads(text)
        except ValueError:
            obj_for_hash = None
    if obj_for_hash is not None:
        try:
            text = dumps(to_obj(rehash(obj_for_hash)))
        except (KeyError, TypeError, AttributeError, ValueError):
            pass
    return text.encode("utf-8", "surrogatepass")


def test_deltahub_json(stored, soak):
    store, _b, _d = stored
    hub = _hub_json_from(store)
    tally: collections.Counter = collections.Counter()
    ok = parse_hub_manifest(json.dumps(hub).encode())
    assert ok.manifest_id == store.show("ft")["manifest_id"]

    @_n(soak, 400, 10000)
    @given(hub_mutations(hub))
    def run(data):
        tally["tried"] += 1
        try:
            parsed = parse_hub_manifest(data)
        except (CorruptObjectError, UnsupportedFormatError, InvalidNameError) as exc:
            tally["rejected"] += 1
            assert "\n" not in str(exc)
            return
        tally["accepted"] += 1
        assert all(is_tensor_name(n) for n in parsed.manifest.tensors)
        try:
            store._ctx.base_of(parsed.manifest)
        except DeltaHubError:
            tally["refused_against_base"] += 1

    run()
    record("hostile/deltahub-json", **tally)
    assert tally["rejected"] > 0


def test_hostile_repos_pulled_end_to_end(tmp_path, model_dirs, hub_server, soak):
    """Mutated delta repos on the (local) Hub, pulled with the real huggingface_hub client."""
    from huggingface_hub import CommitOperationAdd, HfApi

    a = deltahub.Store(tmp_path / "a")
    a.add(model_dirs["llama"]["base"], name="base")
    a.compress(model_dirs["llama"]["ft"], base="base", name="ft")
    plant_repo(hub_server, BASE_REPO, BASE_REV)
    a.push("ft", REPO, base_repo=f"{BASE_REPO}@{BASE_REV}")
    hub = json.loads(Path(huggingface_hub.hf_hub_download(REPO, "deltahub.json")).read_bytes())
    template = tmp_path / "template"
    with deltahub.Store(template) as b:
        b.add(model_dirs["llama"]["base"], name="base")
    base_names = set(a._ctx.resolve("base").manifest.tensors)
    tally: collections.Counter = collections.Counter()
    counter = iter(range(10**9))

    @_n(soak, 8, 150)
    @given(hub_mutations(hub))
    def run(data):
        attempt(data)

    def attempt(data: bytes) -> None:
        home = tmp_path / f"b{next(counter)}"
        shutil.copytree(template, home)
        before = snapshot_store(home)
        HfApi().create_commit(REPO, [CommitOperationAdd("deltahub.json", data)], commit_message="hostile")
        tally["tried"] += 1
        with deltahub.Store(home) as b:
            try:
                b.pull(REPO, name="pulled")
            except DeltaHubError as exc:
                tally["rejected"] += 1
                assert "\n" not in str(exc)
                assert snapshot_store(home) == before
                return
            tally["accepted"] += 1
            out = b.materialize("pulled", home.parent / f"{home.name}-out")
            from safetensors import safe_open

            keys = set()
            for f in out.out_dir.glob("*.safetensors"):
                with safe_open(str(f), "pt") as fh:
                    keys |= set(fh.keys())
            assert base_names <= keys and all(is_tensor_name(k) for k in keys)
            assert b.verify().ok
        shutil.rmtree(home)

    attempt(json.dumps(hub).encode())  # the control: the repo as pushed pulls and materializes
    assert tally["accepted"] == 1
    run()
    record("hostile/hub-repos", **tally)
