"""Resource limits: file size limits (``ulimit -f``), full disks (a small tmpfs) and an injected
``ENOSPC`` or short write at every write site. Every command either succeeds with exactly the right
bytes or fails with one clear line, and leaves a store that ``verify`` accepts (issue 9, defects 1-4).

The tmpfs tests mount one (root only); where mounting is not allowed they are skipped with the reason.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from calibrate_fixtures import trained  # noqa: F401
from conftest import snapshot_store
from fault_report import record
from hub_fixtures import hub_server  # noqa: F401
from safetensors.torch import load_file, save_file

import deltahub
import deltahub.fileio as fileio
from deltahub.errors import DiskFullError

#: 2000 blocks of 1 KiB, as in the issue: objects used to be cut at 2,048,000 bytes.
FSIZE_LIMIT = 2000 * 1024
BIG = (1024, 1024)  # a 4 MiB fp32 tensor: larger than FSIZE_LIMIT


# ---------------------------------------------------------------------------------------- helpers
def _write_model(path: Path, seed: int, embed_scale: float = 1.0) -> Path:
    """A minimal checkpoint with one 4 MiB matrix and a 4 MiB embedding (llama names, no modelling code needed)."""
    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(BIG, generator=gen),
        "model.embed_tokens.weight": torch.randn(BIG, generator=gen) * embed_scale,
        "model.norm.weight": torch.ones(1024),
    }
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("big")
    base = _write_model(root / "base", seed=0)
    ft = root / "ft"
    shutil.copytree(base, ft)
    tensors = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    for name, t in tensors.items():
        if t.ndim == 2:
            t.add_(torch.randn(t.shape, generator=gen) * 0.01)
    save_file(tensors, str(ft / "model.safetensors"), metadata={"format": "pt"})
    other = _write_model(root / "other", seed=7)
    return {"base": base, "ft": ft, "other": other}


def _cli(home: Path, *args: str, fsize: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    # the real default space reserve (the test suite otherwise runs without one: conftest)
    full_env = {**os.environ, "DELTAHUB_DISABLE_PROGRESS_BARS": "1", "DELTAHUB_RESERVE_BYTES": str(4 << 20), **(env or {})}
    full_env.pop("DELTAHUB_HOME", None)
    full_env.pop("DELTAHUB_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "deltahub.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=full_env,
        preexec_fn=limit,
    )


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The single ``Error: ...`` line of a failed command (no traceback), containing ``needles``."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _verify_ok(home: Path) -> None:
    proc = _cli(home, "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _tmp_left(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "tmp").iterdir()) if (home / "tmp").is_dir() else []


def _checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.deltahub-"))


# ---------------------------------------------------------------------------------- ulimit -f
def test_add_under_a_file_size_limit_fails_cleanly(tmp_path, big):
    """Defect 1: objects were cut at the limit, filed under the whole tensor's hash, and add exited 0."""
    home = tmp_path / "store"
    proc = _cli(home, "add", str(big["base"]), "--name", "b", fsize=FSIZE_LIMIT)
    assert proc.returncode == 10, proc.stdout + proc.stderr
    _one_line_error(proc, "file size limit", "ulimit")
    _verify_ok(home)
    assert _tmp_left(home) == []
    assert json.loads(_cli(home, "ls", "--json").stdout) == []
    # the same command without the limit succeeds, and every object is whole
    proc = _cli(home, "add", str(big["base"]), "--name", "b")
    assert proc.returncode == 0, proc.stderr
    _verify_ok(home)


def test_a_file_size_limit_too_low_for_the_index_is_named_as_such(tmp_path, big):
    """SQLite reports the EFBIG of its -shm/-wal file as "disk I/O error": below ~1 MiB the message
    names the file size limit. A new store cannot open its index; an existing one is read (ls works)
    and refuses writes with the same message."""
    home = tmp_path / "store"
    proc = _cli(home, "ls", fsize=8 * 1024)
    assert proc.returncode == 10, proc.stdout + proc.stderr
    _one_line_error(proc, "file size limit", "ulimit", "index")
    assert "disk I/O error" not in proc.stderr
    assert _cli(home, "ls").returncode == 0  # the store opens once the limit is gone
    proc = _cli(home, "ls", fsize=8 * 1024)
    assert proc.returncode == 0 and "no models" in proc.stdout, proc.stderr
    assert "file size limit" in proc.stderr  # (the warning that the index was opened read-only)
    proc = _cli(home, "rm", "nothing", fsize=8 * 1024)
    assert proc.returncode == 10, proc.stdout + proc.stderr
    _one_line_error(proc, "file size limit", "index")
    _verify_ok(home)


def test_materialize_under_a_file_size_limit_fails_cleanly(tmp_path, big):
    home = tmp_path / "store"
    assert _cli(home, "add", str(big["base"]), "--name", "b").returncode == 0
    out = tmp_path / "out"
    proc = _cli(home, "materialize", "b", str(out), fsize=FSIZE_LIMIT)
    assert proc.returncode == 10, proc.stdout + proc.stderr
    _one_line_error(proc, "file size limit")
    assert not out.exists() and _leftovers(out) == []
    proc = _cli(home, "materialize", "b", str(out))
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(_checkpoint_tensors(out)["model.embed_tokens.weight"],
                       load_file(str(big["base"] / "model.safetensors"))["model.embed_tokens.weight"])


def test_compress_under_a_file_size_limit_fails_cleanly(tmp_path, big):
    """A dense 4 MiB embedding in the delta is larger than the limit."""
    home = tmp_path / "store"
    assert _cli(home, "add", str(big["base"]), "--name", "b").returncode == 0
    before = snapshot_store(home)
    proc = _cli(home, "compress", str(big["ft"]), "--base", "b", "--name", "ft", "--embeddings", "dense",
                fsize=FSIZE_LIMIT)
    assert proc.returncode == 10, proc.stdout + proc.stderr
    _one_line_error(proc, "file size limit")
    _verify_ok(home)
    assert snapshot_store(home)["files"] == before["files"]


# ------------------------------------------------------------------------------------ tmpfs
@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[[str, int], Path]]:
    """``mount(name, megabytes)``: a fresh tmpfs of that size at ``tmp_path/name`` (unmounted after)."""
    mounted: list[Path] = []

    def mount(name: str, megabytes: int) -> Path:
        where = tmp_path / name
        where.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip() or proc.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Fill the file system holding ``folder`` to the last byte."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    if os.write(fd, b"\0" * size) < size:
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    assert shutil.disk_usage(folder).free < (1 << 16)
    return filler


def test_add_onto_a_full_store_disk_fails_cleanly(tmpfs, big):
    disk = tmpfs("disk", 12)
    home = disk / "store"
    assert _cli(home, "add", str(big["base"]), "--name", "b").returncode == 0
    before = snapshot_store(home)
    proc = _cli(home, "add", str(big["other"]), "--name", "other")
    assert proc.returncode == 10, proc.stdout + proc.stderr
    _one_line_error(proc, "the disk is full", str(home))
    _verify_ok(home)
    assert snapshot_store(home) == before
    assert _tmp_left(home) == []


def test_materialize_onto_a_full_disk_is_an_error_not_sigbus(tmp_path, tmpfs, big):
    """Defect 2: the output was filled through a memory map: SIGBUS (exit 135), and a temp folder
    that kept the disk full."""
    home = tmp_path / "store"
    assert _cli(home, "add", str(big["base"]), "--name", "b").returncode == 0
    disk = tmpfs("out", 5)  # the checkpoint needs ~8.4 MB
    proc = _cli(home, "materialize", "b", str(disk / "model"))
    assert proc.returncode == 10, (proc.returncode, proc.stderr)
    line = _one_line_error(proc, "the disk is full", str(disk), "needed")
    assert "MB needed" in line
    assert list(disk.iterdir()) == []  # no temp folder left


def test_materialize_when_the_disk_fills_up_meanwhile(tmp_path, tmpfs, big, monkeypatch):
    """The free-space check passes, then the disk fills before the shards are written: the
    reservation fails (no SIGBUS), the temp folder is removed."""
    home = tmp_path / "store"
    with deltahub.Store(home) as s:
        s.add(big["base"], name="b")
        disk = tmpfs("out", 5)
        monkeypatch.setattr("deltahub.ops.materialize.free_bytes", lambda path: 1 << 40)  # it looked free
        with pytest.raises(DiskFullError, match="the disk is full") as info:
            s.materialize("b", disk / "model")
        assert str(disk) in str(info.value)
    assert list(disk.iterdir()) == []


def test_a_full_store_disk_still_reads_removes_and_collects(tmpfs, big):
    """Defect 3: on a full disk every command failed, gc included, blaming the index."""
    disk = tmpfs("disk", 30)
    home = disk / "store"
    assert _cli(home, "add", str(big["base"]), "--name", "b").returncode == 0
    assert _cli(home, "add", str(big["other"]), "--name", "other").returncode == 0
    assert (home / "reserve").stat().st_size == 4 << 20  # there was room to keep a reserve
    assert json.loads(_cli(home, "du", "--json").stdout)["reserve_bytes"] == 4 << 20
    staging = home / "tmp" / "push-999999999-dead"  # a killed push (no such pid)
    staging.mkdir()
    (staging / "delta.safetensors").write_bytes(os.urandom(1 << 20))
    _fill(disk)
    for args in (["ls"], ["show", "b"], ["du"], ["verify"]):
        proc = _cli(home, *args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    du = json.loads(_cli(home, "du", "--json").stdout)
    assert du["stale_tmp_entries"] == 1 and du["stale_tmp_bytes"] == 1 << 20
    proc = _cli(home, "rm", "other")
    assert proc.returncode == 0, proc.stderr
    proc = _cli(home, "gc", "--json")
    assert proc.returncode == 0, proc.stderr
    gc = json.loads(proc.stdout)
    assert gc["temp_files"] == [staging.name] and gc["bytes"] > 4_000_000
    assert not staging.exists()
    assert [r["name"] for r in json.loads(_cli(home, "ls", "--json").stdout)] == ["b"]
    _verify_ok(home)
    # a write that cannot fit says the disk is full, and changes nothing
    (disk / "filler").unlink()
    before = snapshot_store(home)
    _fill(disk)
    proc = _cli(home, "add", str(big["other"]), "--name", "other")
    assert proc.returncode == 10
    _one_line_error(proc, "the disk is full")
    (disk / "filler").unlink()
    assert snapshot_store(home) == before
    _verify_ok(home)


def test_a_full_store_disk_without_reserve_still_reads(tmpfs, big):
    """No reserve (a store on a disk that never had room for one): reads open the index read-only,
    writes say the disk is full, and gc still frees what needs no index write."""
    disk = tmpfs("disk", 12)
    home = disk / "store"
    assert _cli(home, "add", str(big["base"]), "--name", "b").returncode == 0
    (home / "reserve").unlink(missing_ok=True)
    staging = home / "tmp" / "push-999999999-dead"
    staging.mkdir()
    (staging / "delta.safetensors").write_bytes(os.urandom(1 << 20))
    _fill(disk)
    assert not (home / "index.sqlite-wal").exists()
    for args in (["ls"], ["show", "b"], ["du"], ["verify"]):
        proc = _cli(home, *args)
        assert proc.returncode == 0, (args, proc.stderr)
    proc = _cli(home, "rm", "b")
    assert proc.returncode == 10
    _one_line_error(proc, "the disk is full", str(home))
    proc = _cli(home, "gc", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["temp_files"] == [staging.name]
    assert [r["name"] for r in json.loads(_cli(home, "ls", "--json").stdout)] == ["b"]
    _verify_ok(home)


# -------------------------------------------------------------------------- leftovers (defect 4)
def test_gc_removes_a_killed_push_staging_folder_and_du_counts_tmp(store, home, model_dirs):
    store.add(model_dirs["llama"]["base"], name="base")
    staging = home / "tmp" / "push_999999999_abcd"  # as older versions named it
    staging.mkdir()
    (staging / "delta.safetensors").write_bytes(b"x" * 5000)
    live = home / "tmp" / f"push-{os.getpid()}-live"  # a running push: kept
    live.mkdir()
    (live / "deltahub.json").write_bytes(b"{}")
    du = store.du()
    assert du["tmp_entries"] == 2 and du["tmp_bytes"] == 5002 and du["stale_tmp_entries"] == 1
    assert du["total_bytes"] >= du["object_bytes"] + 5002
    report = store.gc()
    assert report.temp_files == [staging.name] and report.temp_bytes == 5000
    assert not staging.exists() and live.exists()
    shutil.rmtree(live)


def test_rerunning_materialize_removes_a_killed_runs_temp_folder(store, home, model_dirs, tmp_path):
    store.add(model_dirs["llama"]["base"], name="base")
    out = tmp_path / "out"
    dead = tmp_path / f".out.deltahub-tmp-999999999-x1y2"  # a killed materialize (no such pid)
    legacy = tmp_path / ".out.deltahub-tmp-k3j4_zz9"  # older versions: no pid, never locked
    other = tmp_path / ".other.deltahub-tmp-999999999-abcd"  # another output's: not ours to touch
    for d in (dead, legacy, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
    store.materialize("base", out)
    assert not dead.exists() and not legacy.exists() and other.exists()
    assert _leftovers(out) == []


def test_a_live_materialize_temp_folder_is_left_alone(store, home, model_dirs, tmp_path):
    """A folder whose writer still holds its lock is not removed by a second materialize."""
    import fcntl

    store.add(model_dirs["llama"]["base"], name="base")
    out = tmp_path / "out"
    busy = tmp_path / ".out.deltahub-tmp-999999999-busy"  # pid dead, but the folder is locked
    busy.mkdir()
    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        store.materialize("base", out)
        assert busy.exists()
    finally:
        os.close(fd)


# ------------------------------------------------------------------ injected faults at every write
class WriteFaults:
    """Replaces ``deltahub.fileio.os_write`` (the one write syscall of deltahub): counts calls, and
    from call ``fail_at`` on raises ``ENOSPC`` (``mode="enospc"``), or writes at most ``cap`` bytes
    per call (``mode="short"``), or takes nothing (``mode="zero"``: ``write`` returns 0)."""

    def __init__(self, mode: str = "count", fail_at: int | None = None, cap: int = 4096, once: bool = False) -> None:
        self.mode, self.fail_at, self.cap, self.once = mode, fail_at, cap, once
        self.calls = 0
        self.paths: list[str] = []  # the file each call wrote to
        self.real = os.write

    def __call__(self, fd: int, data) -> int:
        self.calls += 1
        try:
            self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            self.paths.append("?")
        if self.mode == "short":
            return self.real(fd, memoryview(data)[: max(1, min(self.cap, len(data) // 2 or 1))])
        if self.fail_at is not None and (self.calls == self.fail_at if self.once else self.calls >= self.fail_at):
            if self.mode == "zero":
                return 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, data)


@contextmanager
def write_faults(monkeypatch, **kw) -> Iterator[WriteFaults]:
    faults = WriteFaults(**kw)
    with monkeypatch.context() as m:
        m.setattr(fileio, "os_write", faults)
        yield faults


def _sites(total: int, soak: bool) -> list[int]:
    """Which write calls to fail: all of them under --soak, else an even sample of about 12."""
    if soak or total <= 12:
        return list(range(1, total + 1))
    step = total / 12
    return sorted({1, total, *(int(1 + i * step) for i in range(12))})


@pytest.fixture
def llama(model_dirs) -> dict[str, Path]:
    return model_dirs["llama"]


OPS: dict[str, Callable] = {
    "add": lambda s, d, tmp: s.add(d["base"], name="base2"),
    "compress": lambda s, d, tmp: s.compress(d["ft"], base="base", name="ft2"),
    "compress-dense": lambda s, d, tmp: s.compress(d["ft"], base="base", name="ft3", embeddings="dense"),
    "materialize": lambda s, d, tmp: s.materialize("ft", tmp / "out"),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_enospc_at_every_write_site_fails_cleanly(op, home, llama, tmp_path, monkeypatch, soak):
    with deltahub.Store(home) as s:
        s.add(llama["base"], name="base")
        s.compress(llama["ft"], base="base", name="ft")
    clean = tmp_path / "clean"
    shutil.copytree(home, clean)
    with write_faults(monkeypatch) as counter, deltahub.Store(clean) as s:
        OPS[op](s, llama, tmp_path / "count")
    assert counter.calls > 0, "the operation wrote nothing through deltahub.fileio"
    sites = _sites(counter.calls, soak)
    failed = 0
    for n in sites:
        before = snapshot_store(home)
        work = tmp_path / f"run{n}"
        work.mkdir()
        with pytest.raises(DiskFullError) as info, write_faults(monkeypatch, mode="enospc", fail_at=n), deltahub.Store(home) as s:
            OPS[op](s, llama, work)
        failed += 1
        message = str(info.value)
        assert "\n" not in message and "the disk is full" in message, message
        after = snapshot_store(home)
        assert after["files"] == before["files"], f"write {n} of {op}: objects changed"
        assert after["rows"] == before["rows"], f"write {n} of {op}: index changed"
        with deltahub.Store(home) as s:
            assert s.verify().ok
        assert _tmp_left(home) == []
        assert not (work / "out").exists() and _leftovers(work / "out") == []
    record(f"limits/enospc/{op}", write_calls=counter.calls, sites_tried=len(sites), failed_cleanly=failed)


@pytest.mark.parametrize("op", sorted(OPS))
def test_short_writes_are_completed(op, home, llama, tmp_path, monkeypatch):
    """Every write takes at most half of what it is given: commands still succeed, byte for byte."""
    with deltahub.Store(home) as s:
        s.add(llama["base"], name="base")
        s.compress(llama["ft"], base="base", name="ft")
    reference = tmp_path / "reference"
    with deltahub.Store(home) as s:
        s.materialize("ft", reference)
    with write_faults(monkeypatch, mode="short", cap=1 << 16) as faults, deltahub.Store(home) as s:
        OPS[op](s, llama, tmp_path)
    assert faults.calls > 0
    with deltahub.Store(home) as s:
        assert s.verify().ok
        out = tmp_path / "check"
        s.materialize("ft", out)
    assert _checkpoint_tensors(out).keys() == _checkpoint_tensors(reference).keys()
    for name, t in _checkpoint_tensors(reference).items():
        assert torch.equal(_checkpoint_tensors(out)[name], t), name
    if op == "materialize":
        got = _checkpoint_tensors(tmp_path / "out")
        for name, t in _checkpoint_tensors(reference).items():
            assert torch.equal(got[name], t), name
    record(f"limits/short/{op}", write_calls=faults.calls)


def test_a_write_that_takes_nothing_is_a_full_disk(home, llama, monkeypatch):
    """``write(2)`` returning 0 (the device takes nothing more) is ENOSPC, not an endless loop."""
    with deltahub.Store(home) as s:
        s.add(llama["base"], name="base")
    before = snapshot_store(home)
    with pytest.raises(DiskFullError, match="the disk is full"), write_faults(monkeypatch, mode="zero", fail_at=1):
        with deltahub.Store(home) as s:
            s.compress(llama["ft"], base="base", name="ft")
    assert snapshot_store(home) == before
    with deltahub.Store(home) as s:
        assert s.verify().ok and [m["name"] for m in s.list()] == ["base"]


def test_materialize_reservation_failure_leaves_nothing(home, llama, tmp_path, monkeypatch):
    with deltahub.Store(home) as s:
        s.add(llama["base"], name="base")

        def no_room(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(fileio, "os_fallocate", no_room)
        with pytest.raises(DiskFullError, match="the disk is full"):
            s.materialize("base", tmp_path / "out")
    assert list(tmp_path.glob(".out.*")) == [] and not (tmp_path / "out").exists()


def test_syncfs_failure_publishes_nothing(home, llama, monkeypatch):
    """A batch whose write-back fails (syncfs reports EIO/ENOSPC) is not published."""
    import deltahub.store.writer as writer

    calls = {"n": 0}

    class FailingSyncfs:
        def __call__(self, fd):
            calls["n"] += 1
            import ctypes

            ctypes.set_errno(errno.ENOSPC)
            return -1

    monkeypatch.setattr(writer, "_SYNCFS", FailingSyncfs())
    with pytest.raises(DiskFullError):
        with deltahub.Store(home) as s:
            s.add(llama["base"], name="base")
    monkeypatch.undo()
    assert calls["n"] >= 1
    with deltahub.Store(home) as s:
        assert s.verify().ok and s.list() == []
        assert not any((home / "objects").rglob("*")) or all(p.is_dir() for p in (home / "objects").rglob("*"))


# ------------------------------------------------- injected faults: push, pull and calibrate
def test_enospc_while_staging_a_push_uploads_nothing(home, llama, hub_server, monkeypatch, soak):
    from huggingface_hub import HfApi
    from hub_fixtures import FAKE_USER

    with deltahub.Store(home) as s:
        s.add(llama["base"], name="base")
        s.compress(llama["ft"], base="base", name="ft")
        s.push("base", f"{FAKE_USER}/base")  # the delta's push then knows where its base lives
        with write_faults(monkeypatch) as counter:
            s.push("ft", f"{FAKE_USER}/counted")
    sites = _sites(counter.calls, soak)
    api = HfApi()
    for n in sites:
        with pytest.raises(DiskFullError, match="the disk is full") as info, write_faults(
            monkeypatch, mode="enospc", fail_at=n
        ), deltahub.Store(home) as s:
            s.push("ft", f"{FAKE_USER}/target")
        assert "staging" in str(info.value)
        assert not api.repo_exists(f"{FAKE_USER}/target")  # built first, uploaded only when complete
        assert _tmp_left(home) == []
    with deltahub.Store(home) as s:
        assert s.push("ft", f"{FAKE_USER}/target").uploaded
    record("limits/enospc/push", write_calls=counter.calls, sites_tried=len(sites), failed_cleanly=len(sites))


def test_enospc_while_pulling_changes_nothing(tmp_path, llama, hub_server, monkeypatch, soak):
    from hub_fixtures import FAKE_USER

    repo = f"{FAKE_USER}/delta"
    with deltahub.Store(tmp_path / "a") as a:
        a.add(llama["base"], name="base")
        a.compress(llama["ft"], base="base", name="ft")
        a.push("base", f"{FAKE_USER}/base")
        a.push("ft", repo)
    home = tmp_path / "b"
    with deltahub.Store(home) as b:
        b.add(llama["base"], name="base")
    counted = tmp_path / "counted"
    shutil.copytree(home, counted)
    with write_faults(monkeypatch) as first, deltahub.Store(counted) as c:
        c.pull(repo, name="ft")
    ref = Path(first.paths[0])  # the first pull records refs/main in the HF cache (temp file + rename)
    assert ref.parent.name == "refs" and (ref.parent / "main").is_file(), first.paths
    shutil.rmtree(counted)
    shutil.copytree(home, counted)
    with write_faults(monkeypatch) as counter, deltahub.Store(counted) as c:
        c.pull(repo, name="ft")  # the ref is there now: every write is the store's
    assert all(str(counted) in p for p in counter.paths), counter.paths
    sites = _sites(counter.calls, soak)
    for n in sites:
        before = snapshot_store(home)
        with pytest.raises(DiskFullError, match="the disk is full"), write_faults(
            monkeypatch, mode="enospc", fail_at=n
        ), deltahub.Store(home) as b:
            b.pull(repo, name="ft")
        assert snapshot_store(home) == before
        assert _tmp_left(home) == []
    # the ref is a best-effort offline shortcut: failing to write it never fails the pull
    (ref.parent / "main").unlink()
    with write_faults(monkeypatch, mode="enospc", fail_at=1, once=True) as faults, deltahub.Store(home) as b:
        b.pull(repo, name="ft")
        assert b.verify().ok
    assert "/refs/" in faults.paths[0] and not (ref.parent / "main").exists()
    record("limits/enospc/pull", write_calls=counter.calls, sites_tried=len(sites), failed_cleanly=len(sites))


def test_enospc_while_calibrating_changes_nothing(home, trained, monkeypatch, soak):
    from calibrate_fixtures import stored_pair

    from deltahub.api import CalibrationOptions

    opts = CalibrationOptions(data=trained["calib"], samples=8, seq_len=32, steps=3, lr=0.05)
    with deltahub.Store(home) as s:
        stored_pair(s, trained, "llama")
    counted = home.parent / "counted"
    shutil.copytree(home, counted)
    with write_faults(monkeypatch) as counter, deltahub.Store(counted) as c:
        c.calibrate("ft", trained["llama"]["ft"], opts)
    assert counter.calls > 0
    sites = _sites(counter.calls, soak)
    for n in sites:
        before = snapshot_store(home)
        with pytest.raises(DiskFullError, match="the disk is full"), write_faults(
            monkeypatch, mode="enospc", fail_at=n
        ), deltahub.Store(home) as s:
            s.calibrate("ft", trained["llama"]["ft"], opts)
        assert snapshot_store(home) == before
        with deltahub.Store(home) as s:
            assert s.verify().ok
    record("limits/enospc/calibrate", write_calls=counter.calls, sites_tried=len(sites), failed_cleanly=len(sites))


def test_materialize_where_flock_is_not_supported(store, home, model_dirs, tmp_path, monkeypatch):
    """NFS and some FUSE file systems refuse flock on a folder: materialize still works, and tells
    a dead writer's leftover from a live one by the pid in its name alone."""
    import deltahub.ops.materialize as mat

    import fcntl
    import stat

    real_flock = fcntl.flock

    def no_flock(fd, op):  # folders only: the store's own lock files keep working
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return real_flock(fd, op)

    store.add(model_dirs["llama"]["base"], name="base")
    out = tmp_path / "out"
    dead = tmp_path / ".out.deltahub-tmp-999999999-dead"
    alive = tmp_path / f".out.deltahub-tmp-{os.getpid()}-live"
    legacy = tmp_path / ".out.deltahub-tmp-nopid_x"  # no pid, no lock to ask: kept
    for d in (dead, alive, legacy):
        d.mkdir()
    monkeypatch.setattr(mat.fcntl, "flock", no_flock)
    store.materialize("base", out)
    assert (out / "model.safetensors").is_file()
    assert not dead.exists() and alive.exists() and legacy.exists()


def test_gc_on_a_full_disk_without_reserve_says_what_to_do(tmpfs, llama):
    """Without a reserve, the objects of a removed model cannot be freed before their index rows
    are pruned, and the index cannot grow: gc says so in one line (no advice that loops back to
    gc), changes nothing, and works once a few MB are free."""
    disk = tmpfs("disk", 12)
    home = disk / "store"
    no_reserve = {"DELTAHUB_RESERVE_BYTES": "0"}
    assert _cli(home, "add", str(llama["base"]), "--name", "base", env=no_reserve).returncode == 0
    assert _cli(home, "compress", str(llama["ft"]), "--base", "base", "--name", "ft", env=no_reserve).returncode == 0
    assert _cli(home, "rm", "ft", env=no_reserve).returncode == 0
    filler = _fill(disk)
    proc = _cli(home, "gc", env=no_reserve)
    assert proc.returncode == 10, proc.stderr
    line = _one_line_error(proc, "the disk is full", "free a few MB")
    assert "`deltahub gc` removes" not in line  # the store hint would send the user back to gc
    filler.unlink()
    _verify_ok(home)
    proc = _cli(home, "gc", "--json", env=no_reserve)
    assert proc.returncode == 0 and json.loads(proc.stdout)["n_objects"] > 0, proc.stderr
    _verify_ok(home)


def test_a_read_only_store_still_reads(tmp_path, llama):
    """A store the user may read but not write (a shared folder): ls, show, du, verify and
    materialize work (the index is opened read-only); rm says the store is read-only."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to drop the file-permission override")
    home = tmp_path / "store"
    assert _cli(home, "add", str(llama["base"]), "--name", "base").returncode == 0
    subprocess.run(["chmod", "-R", "a-w", str(home)], check=True)
    drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
    env = dict(os.environ, DELTAHUB_DISABLE_PROGRESS_BARS="1")
    env.pop("DELTAHUB_HOME", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*drop, sys.executable, "-m", "deltahub.cli", "--home", str(home), *args],
                              capture_output=True, text=True, timeout=300, env=env)

    try:
        for args in (["ls"], ["show", "base"], ["du"], ["verify"], ["materialize", "base", str(tmp_path / "out")]):
            proc = run(*args)
            assert proc.returncode == 0, (args, proc.stderr)
        assert (tmp_path / "out" / "model.safetensors").is_file()
        proc = run("rm", "base")
        assert proc.returncode == 9
        _one_line_error(proc, "read-only for this user")
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(home)], check=True)
    _verify_ok(home)


def test_a_file_system_without_sizes_is_not_called_full():
    assert fileio.free_bytes(Path("/proc")) is None  # /proc reports 0 of 0 bytes: unknown, not full
