"""The Hub repo layout of a pushed delta (format ``deltahub.hub`` v1), and the Hub error table.

A pushed delta is an ordinary Hub model repo (see docs/hub.md)::

    deltahub.json                      the manifest in its Hub form (below)
    delta.safetensors                  packed signs (int32 [N, ceil(K/32)]) and dense tensors, or
    delta-00001-of-0000N.safetensors   ... shards of it, above the shard size limit
    config.json, tokenizer*, ...       the fine-tune's files, byte for byte
    README.md                          the model card (deltahub.hub.card)

``deltahub.json`` (keys sorted, 2-space indent, trailing newline; deterministic)::

    {
      "format": "deltahub.hub", "format_version": 1, "kind": "delta",
      "manifest": "<id of the store manifest this was made from>",
      "model": {"model_type", "architectures", "dtype"},
      "files": {"config.json": {"sha256": "<sha256 of the file>"}, ...},
      "tensors": {
        "<name>": {"codec": "sign1", "codec_version": 1, "dtype", "shape", "scale",
                   "file": "delta.safetensors", "key": "<name>", "stored_dtype": "int32",
                   "stored_shape": [N, ceil(K/32)], "sha256": "<sha256 of the stored bytes>"},
        "<name>": {"codec": "dense", ..., "file", "key", "stored_dtype", "stored_shape", "sha256"},
        "<name>": {"codec": "same", "codec_version": 1, "dtype", "shape"}
      },
      "base": {"manifest": "<base manifest id>", "hub": {"repo_id", "revision"|null} | null,
               "tensors": {"<name>": "<sha256 of the base tensor>"}},
      "packing": {...}
    }

Each ``sha256`` is the store's object id of that tensor or file, so a pull can rebuild the store
manifest exactly (and check it hashes to ``manifest``).

This module knows nothing of the store: it plans files from a parsed manifest, renders the JSON and
maps ``huggingface_hub`` exceptions to deltahub errors (:func:`hub_errors`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from deltahub.errors import (
    CorruptObjectError,
    DiskFullError,
    HubAuthError,
    HubConnectionError,
    HubError,
    HubNotFoundError,
    UnsupportedFormatError,
)
from deltahub.fileio import disk_full_error, is_disk_full
from deltahub.formats import safe_json
from deltahub.formats.checkpoint import DELTA_MANIFEST_FILE
from deltahub.formats.manifest import MANIFEST_FORMAT, Manifest, ModelKind, parse_manifest
from deltahub.formats.safetensors_io import TensorSpec, dtype_from_name, dtype_name
from deltahub.progress import quiet_hf_progress_bars

logger = logging.getLogger(__name__)
T = TypeVar("T")

HUB_FORMAT = "deltahub.hub"
HUB_FORMAT_VERSION = 2
"""The newest Hub format this deltahub writes: a delta is pushed in the Hub format version equal to
its manifest's format version (v1 for deltas of the built-in codecs, so older deltahub versions
pull them)."""
HUB_READABLE_VERSIONS = (1, 2)
HUB_MANIFEST_FILE = DELTA_MANIFEST_FILE  # "deltahub.json": also what `add` refuses as a checkpoint
CARD_FILE = "README.md"
DELTA_STEM = "delta"
#: safetensors header metadata of every delta file.
DELTA_FILE_METADATA = {"format": HUB_FORMAT, "format_version": "1"}  # the delta files' own layout: unchanged


def delta_file_names(n: int) -> list[str]:
    """``delta.safetensors`` or ``delta-0000i-of-0000N.safetensors`` (never an HF weight name)."""
    if n == 1:
        return [f"{DELTA_STEM}.safetensors"]
    return [f"{DELTA_STEM}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def is_delta_file(path: str) -> bool:
    """Whether ``path`` is a delta file deltahub wrote (stale ones are deleted on re-push)."""
    if path == f"{DELTA_STEM}.safetensors":
        return True
    return path.startswith(f"{DELTA_STEM}-") and path.endswith(".safetensors") and "/" not in path


@dataclass(frozen=True)
class StoredTensor:
    """One stored part of a manifest tensor, as an entry of a delta file: the part's object, as is.

    ``name`` is the safetensors key: the tensor's name in Hub format v1 (one part per tensor),
    ``<tensor>:<part>`` in v2 (``:`` never occurs in a tensor name)."""

    name: str
    object: str
    dtype: str
    shape: tuple[int, ...]
    tensor: str = ""
    part: str = ""

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, dtype_from_name(self.dtype), self.shape)


@dataclass
class HubLayout:
    """Which stored tensor goes into which delta file, and the carried files."""

    shards: dict[str, list[StoredTensor]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # repo path -> object id

    def file_of(self) -> dict[str, str]:
        return {t.name: fname for fname, ts in self.shards.items() for t in ts}


def part_key(manifest: Manifest, tensor: str, part: str) -> str:
    """The safetensors key of ``part`` of ``tensor``: the tensor's name in v1, ``tensor:part`` in v2."""
    return tensor if manifest.version() == 1 else f"{tensor}:{part}"


def stored_tensors(manifest: Manifest) -> list[StoredTensor]:
    """Every stored part of ``manifest``'s tensors (as its codec lays it out), sorted by key."""
    out = []
    for name, rec in sorted(manifest.tensors.items()):
        specs = rec.impl.part_specs(rec.shape, dtype_from_name(rec.dtype), rec.params)
        for part, oid in sorted(rec.parts.items()):
            spec = specs[part]
            out.append(StoredTensor(part_key(manifest, name, part), oid, dtype_name(spec.dtype), spec.shape, name, part))
    return sorted(out, key=lambda t: t.name)


def plan_layout(manifest: Manifest, max_shard_bytes: int) -> HubLayout:
    """Deterministic: tensors in name order, a new shard when the next one would pass the limit."""
    if manifest.kind is not ModelKind.DELTA:
        raise ValueError("only deltas have a Hub layout (yet)")
    groups: list[list[StoredTensor]] = []
    size = 0
    for t in stored_tensors(manifest):
        nbytes = t.spec.nbytes
        if not groups or (groups[-1] and size + nbytes > max_shard_bytes):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    if not groups:
        groups = [[]]
    return HubLayout(
        shards=dict(zip(delta_file_names(len(groups)), groups, strict=True)),
        files=dict(sorted(manifest.files.items())),
    )


def hub_manifest(
    manifest: Manifest,
    manifest_id: str,
    layout: HubLayout,
    base_repo_id: str | None,
    base_revision: str | None,
) -> dict[str, Any]:
    """The ``deltahub.json`` object for ``manifest`` laid out as ``layout``."""
    assert manifest.base is not None and manifest.packing is not None
    where = layout.file_of()
    stored = {(t.tensor, t.part): t for ts in layout.shards.values() for t in ts}
    version = manifest.version()  # Hub format v1 holds manifest v1, v2 holds v2
    tensors: dict[str, Any] = {}
    for name, rec in sorted(manifest.tensors.items()):
        spec = rec.to_json(version)
        placed = {}
        for part in rec.parts:
            t = stored[(name, part)]
            placed[part] = dict(file=where[t.name], key=t.name, stored_dtype=t.dtype, stored_shape=list(t.shape), sha256=t.object)
        if version == 1:
            spec.pop("object", None)
            for entry in placed.values():
                spec.update(entry)
        else:
            spec["parts"] = placed
        tensors[name] = spec
    hub = {"repo_id": base_repo_id, "revision": base_revision} if base_repo_id else None
    return {
        "format": HUB_FORMAT,
        "format_version": version,
        "kind": manifest.kind.value,
        "manifest": manifest_id,
        "model": {
            "model_type": manifest.model_type,
            "architectures": list(manifest.architectures),
            "dtype": manifest.dtype,
        },
        "files": {name: {"sha256": oid} for name, oid in sorted(layout.files.items())},
        "tensors": tensors,
        "base": {"manifest": manifest.base.manifest, "hub": hub, "tensors": dict(sorted(manifest.base.tensors.items()))},
        "packing": manifest.packing.to_json(),
    }


def hub_manifest_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n").encode("utf-8")


def parse_base_repo(text: str) -> tuple[str, str | None]:
    """``REPO_ID[@REVISION]`` -> (repo_id, revision or None)."""
    repo_id, _, revision = text.partition("@")
    repo_id = repo_id.strip()
    if not repo_id or (_ and not revision.strip()):
        raise ValueError(f"expected REPO_ID[@REVISION], got {text!r}")
    return repo_id, revision.strip() or None


# ---------------------------------------------------------------------------------------- hashes
def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_blob_sha1(path: Path, chunk: int = 8 << 20) -> str:
    """The git blob id of a file (what the Hub reports as ``blob_id`` for non-LFS files)."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- errors
_TRUE = {"1", "true", "yes", "on"}


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` set (in the environment now, or as huggingface_hub read it at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(constants.HF_HUB_OFFLINE)


def check_online(what: str) -> None:
    if offline_mode():
        raise HubConnectionError(f"HF_HUB_OFFLINE is set: {what} needs the Hub", "unset HF_HUB_OFFLINE to go online")


def hub_endpoint() -> str:
    """The Hub huggingface_hub talks to (``HF_ENDPOINT``, default https://huggingface.co)."""
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except ImportError:  # pragma: no cover
        return "the Hub"



def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _server_message(exc: BaseException) -> str:
    """The server's own message (``X-Error-Message`` or the body's ``error``), first line; else the
    exception's first line."""
    lines = str(getattr(exc, "server_message", None) or "").strip().splitlines()
    return lines[0].strip() if lines else _first_line(exc)


def _request_path(exc: BaseException) -> str | None:
    """The URL path (no host, no query) of the request that failed, when the exception knows it."""

    def attr(obj: Any, name: str) -> Any:
        try:  # httpx raises RuntimeError for a request it was never given
            return getattr(obj, name, None)
        except Exception:
            return None

    response = attr(exc, "response")
    url = attr(attr(response, "request"), "url") or attr(attr(exc, "request"), "url") or attr(response, "url")
    if url is None:
        return None
    return urlsplit(str(url)).path or "/"


#: The repo endpoints (``repo_info`` with or without a revision): a 404 there means the repo
#: does not exist (or is not visible); a 404 anywhere else keeps the server's message.
_REPO_ENDPOINT = re.compile(r"/api/(models|datasets|spaces)/[^/]+/[^/]+(/revision/[^/]+)?/?$")


def xet_in_use() -> bool:
    """Whether huggingface_hub uploads through Xet: ``hf_xet`` is installed and not disabled
    (``HF_HUB_DISABLE_XET``, as the client read it). Older clients without Xet: False."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    if getattr(constants, "HF_HUB_DISABLE_XET", True):
        return False
    import importlib.util

    return importlib.util.find_spec("hf_xet") is not None


def _hub_error_table() -> list[tuple[type[BaseException], Any]]:
    """huggingface_hub exception -> function building the deltahub error. First match wins."""
    from huggingface_hub import errors as hf

    transport: list[type[BaseException]] = []
    for module in ("httpx2", "httpx", "requests"):  # whichever HTTP client huggingface_hub uses
        try:
            mod = __import__(module)
        except ImportError:
            continue
        cls = getattr(mod, "TransportError", None) or getattr(getattr(mod, "exceptions", None), "ConnectionError", None)
        if isinstance(cls, type):
            transport.append(cls)

    def repo_not_found(exc, repo):
        return HubNotFoundError(
            f"repository {repo} not found on {hub_endpoint()} or not visible with your token",
            "check the id, and log in (`hf auth login` or HF_TOKEN) with a token that can see it",
        )

    def gated(exc, repo):
        return HubAuthError(
            f"{repo} is a gated repository: your account has no access to its files",
            f"request access on {hub_endpoint()}/{repo}, then log in (`hf auth login` or HF_TOKEN)",
        )

    def revision_not_found(exc, repo):
        return HubNotFoundError(
            f"revision not found in {repo}", "check the revision after @ in REPO_ID@REVISION (a branch, tag or commit id)"
        )

    def http(exc, repo):
        status = _status(exc)
        if status == 401:
            return HubAuthError(
                f"the Hub refused the request to {repo}: not logged in or the token is invalid",
                "run `hf auth login` or set HF_TOKEN to a valid token",
            )
        if status == 403:
            return HubAuthError(
                f"your token may not write to {repo}",
                "use a token with write access to that namespace (`hf auth login`)",
            )
        if status == 404:
            path = _request_path(exc)
            if path is not None and _REPO_ENDPOINT.search(path):
                return repo_not_found(exc, repo)
            return HubNotFoundError(
                f"{hub_endpoint()} answered 404 to {path or 'a request'} for {repo}: {_server_message(exc)}",
                "check the repo id and revision, and that HF_ENDPOINT is a Hub that serves this request",
            )
        err = HubError(f"the Hub answered {status or 'an error'} for {repo}: {_first_line(exc)}", "retry later")
        err.transient = status is None or status >= 500 or status in (408, 429)
        return err

    def offline(exc, repo):
        return HubConnectionError("HF_HUB_OFFLINE is set: this needs the Hub", "unset HF_HUB_OFFLINE to go online")

    def unreachable(exc, repo):
        return HubConnectionError(
            f"cannot reach {hub_endpoint()} ({exc.__class__.__name__})",
            "check your network connection and HF_ENDPOINT",
        )

    def invalid(exc, repo):
        return HubError(f"invalid Hub id or revision: {_first_line(exc)}", "use NAMESPACE/NAME")

    def incomplete(exc, repo):  # huggingface_hub's size check after a short (truncated) download
        if is_disk_full(exc):  # the HF cache's disk is full: not transient, say so
            from deltahub.config import hf_hub_cache

            return disk_full_error(exc, hf_hub_cache(), f"downloading from {repo} into the Hugging Face cache")
        if "Consistency check failed" not in str(exc):
            return None
        err = HubConnectionError(
            f"incomplete download from {repo}: {_first_line(exc)}",
            "nothing was stored; run the command again",
        )
        err.transient = True
        return err

    return [
        (hf.OfflineModeIsEnabled, offline),
        # not in the local cache (local_files_only): callers catch it and say what is missing. Before
        # huggingface_hub 1.0 it subclasses HfHubHTTPError, which would make it a "retry later".
        (hf.LocalEntryNotFoundError, lambda exc, repo: None),
        (hf.GatedRepoError, gated),  # a subclass of RepositoryNotFoundError: first
        (hf.RepositoryNotFoundError, repo_not_found),
        (hf.RevisionNotFoundError, revision_not_found),
        (hf.HfHubHTTPError, http),
        (hf.HFValidationError, invalid),
        *((cls, unreachable) for cls in transport),
        (ConnectionError, unreachable),
        (TimeoutError, unreachable),
        (OSError, incomplete),
    ]


def _from_xet(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) came from the Xet transfer path: raised by ``hf_xet``,
    or a failed request to a Xet endpoint (``/xet-…-token/``, a CAS server), or saying so."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        module = type(current).__module__ or ""
        path = _request_path(current) or ""
        if module.startswith("hf_xet") or "xet" in path.lower() or "xet" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


def translate_hub_error(exc: BaseException, repo_id: str, upload: bool = False) -> HubError | DiskFullError | None:
    """The deltahub error for ``exc`` (None: not a Hub failure). ``upload``: ``exc`` came from an
    upload (``create_commit``); when that went through Xet, the error says so and how to avoid it."""
    mapped = None
    for cls, make in _hub_error_table():
        if isinstance(exc, cls):
            mapped = make(exc, repo_id)
            break
    if upload and xet_in_use() and _from_xet(exc) and not isinstance(mapped, (HubAuthError, HubNotFoundError)):
        kind = HubConnectionError if isinstance(mapped, HubConnectionError) else HubError
        return kind(
            f"uploading to {repo_id} through Xet failed: {_first_line(exc)}",
            "retry with HF_HUB_DISABLE_XET=1 to upload through plain LFS; the Hub or mirror at HF_ENDPOINT "
            "may not support Xet",
        )
    return mapped



#: Attempts and first back-off (doubling) for downloads that fail transiently (5xx, 408, 429, a
#: truncated body): huggingface_hub itself retries a file GET only on 408/429.
DOWNLOAD_ATTEMPTS = 4
RETRY_DELAY_S = 1.0


def with_retries(call: Callable[[], T], what: str) -> T:
    """Run ``call`` (which raises deltahub Hub errors), retrying transient failures with back-off."""
    delay = RETRY_DELAY_S
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            return call()
        except HubError as exc:
            if not getattr(exc, "transient", False) or attempt == DOWNLOAD_ATTEMPTS:
                raise
            logger.warning("%s failed (%s); retrying in %.1f s", what, exc.message, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


@contextmanager
def hub_errors(repo_id: str, upload: bool = False) -> Iterator[None]:
    """Re-raise huggingface_hub/transport exceptions as one-line deltahub errors.

    Every huggingface_hub call runs inside it, so it also applies ``DELTAHUB_DISABLE_PROGRESS_BARS``
    to huggingface_hub's own bars first. ``upload``: the block uploads (see
    :func:`translate_hub_error`).
    """
    quiet_hf_progress_bars()
    try:
        yield
    except HubError:
        raise
    except Exception as exc:
        mapped = translate_hub_error(exc, repo_id, upload=upload)
        if mapped is None:
            raise
        raise mapped from exc


# ---------------------------------------------------------------------------------------- pulling
@dataclass
class PulledTensor:
    """Where a stored tensor of a pulled delta lies in the repo, and what its bytes must hash to."""

    name: str
    file: str
    key: str
    stored: StoredTensor  # object = the sha256 of the stored bytes


@dataclass
class HubManifest:
    """A parsed, validated ``deltahub.json``: the store manifest it rebuilds and where the bytes are."""

    manifest_id: str
    manifest: Manifest
    files: dict[str, str]  # repo path -> sha256 (= object id)
    tensors: list[PulledTensor]  # tensors with bytes, in name order
    base_repo_id: str | None
    base_revision: str | None

    def shard_files(self) -> list[str]:
        return sorted({t.file for t in self.tensors})


def _hub_corrupt(why: str) -> CorruptObjectError:
    return CorruptObjectError(f"invalid deltahub.json: {why}", "the repo was not written by `deltahub push` or is damaged")


def parse_hub_manifest(data: bytes) -> HubManifest:
    """Parse ``deltahub.json`` and rebuild the store manifest it was pushed from.

    Refuses unknown formats and versions (:class:`UnsupportedFormatError`) and anything that does
    not rebuild a manifest hashing to the ``manifest`` field (:class:`CorruptObjectError`). The
    ``base.hub`` of ``deltahub.json`` may have been given at push time (``--base-repo``) without
    being part of the store manifest: the rebuild tries it as given, then without it.
    """
    try:  # written with allow_nan=False: NaN, Infinity or 1e999 (a scale, say) are damage
        obj = safe_json.loads(bytes(data), HUB_MANIFEST_FILE, allow_nan=False, unique_keys=True, strict_unicode=True)
    except safe_json.JSONInputError as exc:
        raise _hub_corrupt(str(exc)) from None
    if not isinstance(obj, dict):
        raise _hub_corrupt("not a JSON object")
    fmt = obj.get("format")
    if fmt != HUB_FORMAT:
        raise UnsupportedFormatError(
            f"deltahub.json has format {fmt!r}, unknown to this deltahub (it reads {HUB_FORMAT!r})",
            "upgrade deltahub (pip install -U deltahub)",
        )
    version = obj.get("format_version")
    if version not in HUB_READABLE_VERSIONS or isinstance(version, bool):
        raise UnsupportedFormatError(
            f"deltahub.json format version {version!r} is not supported by this deltahub "
            f"(it reads {HUB_FORMAT} versions {', '.join(map(str, HUB_READABLE_VERSIONS))})",
            "upgrade deltahub (pip install -U deltahub)",
        )
    if obj.get("kind") != ModelKind.DELTA.value:
        raise UnsupportedFormatError(
            f"deltahub.json describes a {obj.get('kind')!r}; this deltahub pulls deltas only",
            "upgrade deltahub (pip install -U deltahub)",
        )
    try:
        expected = obj["manifest"]
        files = {k: v["sha256"] for k, v in obj["files"].items()}
        tensors: dict[str, Any] = {}
        where: dict[tuple[str, str], tuple[str, str, str, list[int]]] = {}
        for name, spec in obj["tensors"].items():
            spec = dict(spec)
            if version == 1:
                if "sha256" in spec:  # the one part of a v1 codec; its name is known once parsed
                    where[(name, "")] = (spec.pop("file"), spec.pop("key"), spec.pop("stored_dtype"), spec.pop("stored_shape"))
                    spec["object"] = spec.pop("sha256")
            else:
                parts = {}
                for part, entry in dict(spec.get("parts", {})).items():
                    entry = dict(entry)
                    where[(name, part)] = (entry.pop("file"), entry.pop("key"), entry.pop("stored_dtype"), entry.pop("stored_shape"))
                    parts[part] = entry.pop("sha256")
                    if entry:
                        raise ValueError(f"unknown field {sorted(entry)[0]!r} in part {part!r} of {name!r}")
                spec["parts"] = parts
            tensors[name] = spec
        base = dict(obj["base"])
        hub = base.get("hub")
        store_obj = {
            "format": MANIFEST_FORMAT,
            "format_version": version,
            "kind": ModelKind.DELTA.value,
            "model": obj["model"],
            "files": files,
            "tensors": tensors,
            "base": base,
            "packing": obj["packing"],
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _hub_corrupt(f"missing or malformed field ({exc!r})") from None
    try:
        canonical = json.dumps(store_obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        manifest = parse_manifest(canonical.encode("utf-8"), strict_names=True)  # new input: today's name rule
    except CorruptObjectError as exc:
        raise _hub_corrupt(exc.message.removeprefix("invalid manifest: ")) from None
    except (TypeError, ValueError) as exc:  # not serializable (a non-string key, ...)
        raise _hub_corrupt(f"malformed content ({exc})") from None
    if manifest.manifest_id() != expected and manifest.base is not None and manifest.base.hub_repo_id:
        manifest.base.hub_repo_id = manifest.base.hub_revision = None
    if manifest.manifest_id() != expected:
        raise _hub_corrupt(f"its content does not rebuild manifest {str(expected)[:12]} (it hashes to {manifest.manifest_id()[:12]})")
    pulled = []
    for st in stored_tensors(manifest):
        loc = where.get((st.tensor, st.part if version != 1 else ""))
        if loc is None:  # an "object" given directly instead of file/key/sha256
            raise _hub_corrupt(f"tensor {st.tensor!r} does not say where its bytes are (file, key, sha256)")
        file, key, sdtype, sshape = loc
        if not (isinstance(file, str) and is_delta_file(file) and isinstance(key, str)):
            raise _hub_corrupt(f"tensor {st.tensor!r} lies in {file!r}, not a delta file")
        if sdtype != st.dtype or not isinstance(sshape, list) or tuple(sshape) != st.shape:
            raise _hub_corrupt(f"tensor {st.tensor!r} is stored as {sdtype}{sshape}, expected {st.dtype}{list(st.shape)}")
        pulled.append(PulledTensor(st.tensor, file, key, st))
    hub = hub if isinstance(hub, dict) else {}
    return HubManifest(
        manifest_id=expected,
        manifest=manifest,
        files=dict(sorted(manifest.files.items())),
        tensors=pulled,
        base_repo_id=hub.get("repo_id"),
        base_revision=hub.get("revision"),
    )


def default_pull_name(repo_id: str) -> str:
    """The local name of a pulled repo: the name part of ``repo_id``, made a valid model name."""
    raw = repo_id.rstrip("/").rpartition("/")[2]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", raw)
    name = re.sub(r"\.{2,}", ".", name).lstrip("._-")[:128]
    return name or "pulled"


__all__ = [
    "CARD_FILE",
    "DELTA_FILE_METADATA",
    "HUB_FORMAT",
    "HUB_FORMAT_VERSION",
    "HUB_MANIFEST_FILE",
    "HubLayout",
    "HubManifest",
    "PulledTensor",
    "StoredTensor",
    "check_online",
    "default_pull_name",
    "delta_file_names",
    "file_sha256",
    "git_blob_sha1",
    "hub_endpoint",
    "hub_errors",
    "hub_manifest",
    "hub_manifest_bytes",
    "is_delta_file",
    "offline_mode",
    "parse_base_repo",
    "parse_hub_manifest",
    "plan_layout",
    "stored_tensors",
    "translate_hub_error",
    "xet_in_use",
]
