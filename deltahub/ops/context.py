"""The store as operations see it: the object store and the index joined, plus shared helpers.

Layout of ``$DELTAHUB_HOME``::

    objects/ab/abcdef...   content-addressed objects (see deltahub.store.objects)
    tmp/                   per-process temporary files, renamed into objects/; push staging folders
    index.sqlite           the SQLite index (WAL), schema managed by Alembic
    locks/                 advisory locks: gc.lock, names.lock, migrate.lock
    reserve                4 MiB of allocated space, given back when the disk is nearly full
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING


from deltahub.config import HF_CACHE_ROOT, default_home, hf_hub_cache, reserve_bytes
from deltahub.errors import (
    CorruptObjectError,
    NameExistsError,
    NameNotFoundError,
    StoreError,
    WrongBaseError,
)
from deltahub.fileio import free_bytes, reserve
from deltahub.formats.paths import validate_name
from deltahub.index import Index, NewManifest, ObjectEntry, TensorStat
from deltahub.store import Compression, ObjectInfo, ObjectStore, file_lock

if TYPE_CHECKING:  # pragma: no cover - torch (and the formats using it) load only when needed
    import torch

    from deltahub.formats.manifest import Manifest

logger = logging.getLogger(__name__)

#: The store keeps ``config.reserve_bytes()`` (4 MiB) of disk space allocated in
#: ``$DELTAHUB_HOME/reserve`` and gives it back when the disk is nearly full, so that the index can
#: still be opened and written (``rm``, ``gc``); it takes it (again) only while at least
#: ``RESERVE_MIN_FREE_FACTOR`` times that is free.
RESERVE_FILE = "reserve"
RESERVE_MIN_FREE_FACTOR = 4


@dataclass
class Resolved:
    """A name looked up: its manifest id and parsed manifest."""

    name: str
    manifest_id: str
    manifest: Manifest


def fp16_bytes(manifest: Manifest) -> int:
    """Bytes the model's tensors would take in fp16 (non-float tensors at their own size)."""
    import torch

    from deltahub.formats.safetensors_io import dtype_from_name

    total = 0
    for rec in manifest.tensors.values():
        dtype = dtype_from_name(rec.dtype)
        size = 2 if dtype.is_floating_point else torch.empty((), dtype=dtype).element_size()
        total += size * math.prod(rec.shape)
    return total


class StoreContext:
    """An open store: objects + index + locks. Cheap to open; safe for several processes."""

    def __init__(self, home: Path | str | None = None) -> None:
        if isinstance(home, str) and not home.strip():  # Path("") would be the current folder
            raise StoreError("the store folder is an empty string", "give the store folder, or None for the default")
        self.home = Path(home) if home is not None else default_home()
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            self.locks_dir = self.home / "locks"
            self.locks_dir.mkdir(exist_ok=True)
            self.objects = ObjectStore(self.home, external_roots=lambda: {HF_CACHE_ROOT: hf_hub_cache()})
        except OSError as exc:
            raise StoreError(
                f"cannot use {self.home} as a deltahub store: {exc.strerror}",
                "set DELTAHUB_HOME or --home to a writable folder",
            ) from None
        self.index = Index(self.home / "index.sqlite", self.locks_dir / "migrate.lock", low_space=self.release_reserve)
        self._created: list[list[str]] = []
        self.keep_reserve()

    # ------------------------------------------------------------------ space reserve
    @property
    def reserve_path(self) -> Path:
        return self.home / RESERVE_FILE

    def keep_reserve(self) -> None:
        """Make sure the store holds its space reserve (``reserve``, ``config.reserve_bytes()`` of
        allocated blocks) while the disk has room to spare. When the disk fills up, the index
        releases it (:meth:`release_reserve`) so that ``ls``, ``show``, ``verify``, ``rm`` and
        ``gc`` still work and can free space."""
        size = reserve_bytes()
        path = self.reserve_path
        if size <= 0:
            return
        try:
            if path.stat().st_size >= size:
                return
        except FileNotFoundError:
            pass
        except OSError:
            return
        free = free_bytes(self.home)
        if free is None or free < RESERVE_MIN_FREE_FACTOR * size:
            return
        tmp = self.objects.tmp_dir / f"reserve-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                reserve(fd, size)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:  # no room or no fallocate: the store works without a reserve
            logger.debug("no space reserve for %s: %s", self.home, exc)
            tmp.unlink(missing_ok=True)

    def release_reserve(self) -> bool:
        """Give the reserve's space back to the file system; True if there was one."""
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            logger.debug("cannot release the space reserve: %s", exc)
            return False
        logger.warning("the disk holding %s is nearly full: released the store's space reserve", self.home)
        return True

    def close(self) -> None:
        self.index.close()

    # ------------------------------------------------------------------ locks
    @contextmanager
    def writing(self) -> Iterator[None]:
        """Held by every writer from its first object until its name is published (blocks gc).

        If the block fails, the objects it created and nothing references are deleted again (under
        the gc lock), so a failed add or compress leaves the store as it found it.
        """
        created: list[str] = []
        self._created.append(created)
        try:
            with file_lock(self.locks_dir / "gc.lock", exclusive=False), self.objects.batch():
                yield
        except BaseException:
            self._created.pop()
            self._discard(created)
            raise
        self._created.pop()

    def _discard(self, object_ids: list[str]) -> None:
        if not object_ids:
            return
        try:
            with self.collecting(timeout=30):
                referenced = self.index.prune_unreachable().referenced
                for oid in object_ids:
                    if oid not in referenced:
                        self.objects.delete(oid)
        except Exception as exc:  # the objects are unreferenced: gc removes them later
            logger.warning("could not remove %d unreferenced objects (%s); `deltahub gc` will", len(object_ids), exc)

    @contextmanager
    def reading(self, timeout: float = 600) -> Iterator[None]:
        """Held by readers (materialize, load, push, show) from resolving a name until they have read
        every object they need: ``gc`` (exclusive) waits for them, so a name removed and collected
        meanwhile never turns into "object missing" for a reader that already resolved it."""
        with file_lock(self.locks_dir / "gc.lock", exclusive=False, timeout=timeout):
            yield

    @contextmanager
    def collecting(self, timeout: float = 600) -> Iterator[None]:
        """Held by gc: no writer is between writing objects and indexing them."""
        with file_lock(self.locks_dir / "gc.lock", exclusive=True, timeout=timeout):
            yield

    @contextmanager
    def naming(self) -> Iterator[None]:
        with file_lock(self.locks_dir / "names.lock", exclusive=True, timeout=120):
            yield

    # ------------------------------------------------------------------ names
    def resolve(self, name: str) -> Resolved:
        validate_name(name)
        entry = self.index.get_name(name)
        if entry is None:
            raise NameNotFoundError(
                f"no model named {name!r} in {self.home}", "see `deltahub ls` for the stored names"
            )
        return Resolved(name, entry.manifest_id, self.load_manifest(entry.manifest_id))

    def check_name_free(self, name: str, force: bool) -> None:
        validate_name(name)
        if force:
            return
        if self.index.get_name(name) is not None:
            raise NameExistsError(
                f"the name {name!r} is already taken",
                "choose another --name, `deltahub rm` it first, or pass --force to re-point it",
            )

    def load_manifest(self, manifest_id: str, verify: bool = True) -> Manifest:
        from deltahub.formats.manifest import parse_manifest

        return parse_manifest(self.objects.read(manifest_id, verify=verify))

    def base_of(self, delta: Manifest) -> tuple[str, Manifest]:
        """The stored base a delta applies to, checked against the delta's recorded tensor hashes."""
        from deltahub.formats.manifest import ModelKind

        assert delta.base is not None
        base_id = delta.base.manifest
        if not self.objects.exists(base_id):
            where = ""
            if delta.base.hub_repo_id:
                where = f" ({delta.base.hub_repo_id}@{delta.base.hub_revision})"
            raise WrongBaseError(
                f"the base this delta was made from{where} is not in the store",
                "add or pull that base first",
            )
        base = self.load_manifest(base_id)
        if base.kind is not ModelKind.BASE:
            raise WrongBaseError(f"manifest {base_id[:12]} named as base is not a base model")
        for name, sha in delta.base.tensors.items():
            rec = base.tensors.get(name)
            if rec is None or rec.object != sha:
                raise WrongBaseError(
                    f"base tensor {name!r} differs from the one the delta was computed against",
                    "the delta must be applied to the exact base it was compressed from",
                )
        # A delta describes every tensor of its base (compress refuses a fine-tune lacking one): a
        # manifest that renamed or dropped one would build a checkpoint missing that tensor.
        missing = sorted(set(base.tensors) - set(delta.tensors))
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CorruptObjectError(
                f"the delta lists no tensor {missing[0]!r}{more} of its base: a checkpoint built from it would "
                "miss it",
                "the delta's manifest is damaged or was tampered with; pull or compress it again",
            )
        return base_id, base

    # ------------------------------------------------------------------ tensors
    def read_tensor(
        self, object_id: str, dtype: str, shape: tuple[int, ...], verify: bool = True, owned: bool = True
    ) -> torch.Tensor:
        """A stored tensor object as a CPU tensor (hash-verified unless ``verify=False``).

        ``owned=False`` may return a read-only tensor over a memory map of the object (no copy):
        for inputs that are only read, never handed to the user.
        """
        import torch

        from deltahub.formats.safetensors_io import dtype_from_name

        torch_dtype = dtype_from_name(dtype)
        expected = math.prod(shape) * torch.empty((), dtype=torch_dtype).element_size()
        buf = self.objects.read(object_id, verify=verify) if owned else self.objects.read_view(object_id, verify)
        if len(buf) != expected:
            raise CorruptObjectError(
                f"object {object_id[:12]} holds {len(buf)} bytes, expected {expected} for "
                f"{dtype}{list(shape)}",
                "run `deltahub verify`",
            )
        if expected == 0:
            return torch.empty(shape, dtype=torch_dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(buf, dtype=torch.uint8).view(torch_dtype).reshape(shape)

    def put(self, data, compression: Compression = Compression.NONE) -> ObjectInfo:
        """Store an object; inside :meth:`writing`, remember it if this call created it."""
        info = self.objects.put(data, compression)
        if info.created and self._created:
            self._created[-1].append(info.sha256)
        return info

    def put_ref(self, relpath: str, offset: int, length: int) -> ObjectInfo:
        """Store a reference to bytes of a file in the Hugging Face cache (no copy); inside
        :meth:`writing`, remember it if this call created it."""
        info = self.objects.put_ref(HF_CACHE_ROOT, relpath, offset, length)
        if info.created and self._created:
            self._created[-1].append(info.sha256)
        return info

    # ------------------------------------------------------------------ index
    def register(
        self,
        manifest: Manifest,
        manifest_info: ObjectInfo,
        objects: dict[str, ObjectInfo],
        stats: list[TensorStat],
        name: str,
        force: bool,
        *,
        expected: str | None = None,
        info: str | None = None,
        calibration: dict | None = None,
    ) -> str:
        """Index rows, then the name (invariant 2). Returns the manifest id.

        The rows (objects not indexed yet, the manifest, its links and statistics, and the
        ``calibration`` record if any) are one transaction (:meth:`Index.add_manifest`). The name is
        then set (:meth:`set_name`), or with ``expected`` moved only if it still points at manifest
        ``expected`` (:meth:`move_name`). Objects of the manifest left out of ``objects`` must be
        indexed already; the manifest's bytes are then the sum of what the index records for them.
        ``info``: the manifest row's JSON blob of extra data.
        """
        self.objects.flush()  # every object of a batch is durable and in place before any index row
        manifest_id = manifest_info.sha256
        all_objects = dict(objects)
        all_objects[manifest_id] = manifest_info
        roles = manifest.object_ids()
        roles[manifest_id] = "manifest"
        self.index.add_manifest(
            NewManifest(
                id=manifest_id,
                kind=manifest.kind.value,
                format_version=manifest.version(),
                base_id=manifest.base.manifest if manifest.base else None,
                model_type=manifest.model_type,
                dtype=manifest.dtype,
                n_tensors=len(manifest.tensors),
                fp16_bytes=fp16_bytes(manifest),
                links=roles,
                # the bytes given (a copy replacing a reference counts as the copy), else the index's
                stored_bytes=sum(i.stored_size for i in all_objects.values()) if roles.keys() <= all_objects.keys() else None,
                info=info,
            ),
            [_object_entry(oid, i) for oid, i in all_objects.items()],
            stats,
            calibration=calibration,
        )
        if expected is None:
            self.set_name(name, manifest_id, force)
        else:
            self.move_name(name, expected, manifest_id)
        return manifest_id

    def set_name(self, name: str, manifest_id: str, force: bool) -> None:
        validate_name(name)
        with self.naming():
            self.index.set_name(name, manifest_id, force)
            # The old manifest's rows stay until gc prunes them under the exclusive gc lock.

    def move_name(self, name: str, expected: str, manifest_id: str) -> None:
        """Move ``name`` from manifest ``expected`` to ``manifest_id``, only if it still points at
        ``expected`` (else :class:`NameChangedError`)."""
        validate_name(name)
        with self.naming():
            self.index.move_name(name, expected, manifest_id)


def _object_entry(oid: str, info: ObjectInfo) -> ObjectEntry:
    # the object's header is authoritative; a reference is indexed as "raw" content
    return ObjectEntry(oid, info.size, info.stored_size, "zstd" if info.encoding.name == "ZSTD" else "raw")

