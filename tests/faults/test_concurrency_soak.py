"""Concurrency: several processes compressing, pulling, materializing, removing and collecting on
one store for a bounded time (issue 9, "Concurrency"): zero user-visible errors, ``verify`` clean,
every name intact.

``PROCESSES`` workers are forked from a warmed-up zygote (``fault_helpers``) and share one store;
each loops over seeded random operations (``BASE_SEED`` + its index) until the time is up:

* ``compress`` a fine-tune under a fresh name it owns; the manifest must be the clean run's;
* ``pull`` the pushed delta from the test's Hub under a fresh name it owns (sometimes after emptying
  its own HF cache, so the download happens again);
* ``materialize`` a random name from ``ls`` (any worker's) to a fresh folder: the bytes must be the
  reference bytes of that name's manifest, and nothing may be left beside the folder;
* ``rm`` a random name it owns; ``gc``; ``ls`` (its own names must all be there, unchanged);
  ``show`` a random name; ``du``; ``verify`` (must be clean at any moment).

Names are never re-pointed, only created and removed, and a worker removes only its own names. So
the only legitimate outcome besides success is a clean ``NameNotFoundError`` for a name of another
worker that removed it meanwhile (``materialize`` / ``show``), with nothing half-written; such
outcomes are counted as ``race``. Everything else is a failure. At the end the store must verify,
hold exactly the base and the names the workers still own, every one materializing to the reference
bytes, and ``gc`` must leave nothing in ``tmp/``.

CI: 30 s; ``pytest --soak``: 5 minutes.

``test_materialize_while_its_name_is_removed_and_collected`` makes one race of this workload
deterministic: a materialize that resolved its name while another process removes the name and runs
gc must finish (readers hold the gc lock shared, so gc waits for them) or fail with
``NameNotFoundError``; it used to fail with ``CorruptObjectError`` (readers took no lock gc respected).
"""

from __future__ import annotations

import random
import shutil
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import fine_tune_like, make_model, save_checkpoint
from fault_helpers import (
    BASE_SEED,
    References,
    check_store,
    hub_job_settings,
    names_of,
    output_leftovers,
    reset_dir,
    tmp_leftovers,
    tree_digest,
    zygote,  # noqa: F401 - the module's warmed-up process (a fixture)
)
from fault_report import record
from hub_fixtures import FAKE_USER, hub_server  # noqa: F401

import deltahub

PROCESSES = 4
REPO = f"{FAKE_USER}/conc-delta"
#: operation -> weight of its random choice
WEIGHTS = {
    "compress": 3.0,
    "pull": 2.0,
    "materialize": 4.0,
    "rm": 3.0,
    "gc": 1.5,
    "ls": 1.0,
    "show": 1.0,
    "du": 1.0,
    "verify": 0.5,
}
#: a worker owning this many names removes one instead of creating another
MAX_OWNED = 4


# ------------------------------------------------------------------------------------ the worker
def worker(
    home: str,
    index: int,
    seed: int,
    seconds: float,
    finetunes: dict[str, str],
    expected: dict[str, str],
    digests: dict[str, dict[str, str]],
    repo: str,
    work: str,
    hf_cache: str,
) -> dict[str, Any]:
    """One worker process's loop (runs in a child forked from the zygote). Returns its figures."""
    from deltahub.errors import NameNotFoundError

    rng = random.Random(seed)
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    owned: dict[str, str] = {}
    counts: dict[str, Counter] = {op: Counter() for op in WEIGHTS}
    slowest: dict[str, float] = {op: 0.0 for op in WEIGHTS}
    failures: list[dict[str, Any]] = []
    ops = list(WEIGHTS)
    weights = [WEIGHTS[op] for op in ops]
    started = time.monotonic()
    deadline = started + seconds
    n = 0
    store = deltahub.Store(home)

    def listed() -> dict[str, str]:
        return {row["name"]: row["manifest_id"] for row in store.list()}

    def do(op: str) -> str:
        """Run ``op``; return "ok" or "race" (a legitimate outcome of another worker's action);
        raise on anything else."""
        if op == "compress":
            label = rng.choice(sorted(finetunes))
            name = f"w{index}-c{n}"
            result = store.compress(finetunes[label], base="base", name=name)
            assert result.manifest_id == expected[label], f"compress gave {result.manifest_id[:12]}"
            owned[name] = result.manifest_id
            return "ok"
        if op == "pull":
            if rng.random() < 0.5:
                shutil.rmtree(hf_cache, ignore_errors=True)  # download again
            name = f"w{index}-p{n}"
            result = store.pull(repo, name=name)
            assert result.manifest_id == expected["pulled"], f"pull gave {result.manifest_id[:12]}"
            owned[name] = result.manifest_id
            return "ok"
        if op == "rm":
            name = rng.choice(sorted(owned))
            store.rm(name)
            del owned[name]
            return "ok"
        if op == "gc":
            store.gc()
            return "ok"
        if op == "du":
            store.du()
            return "ok"
        if op == "verify":
            report = store.verify()
            assert report.ok, f"verify found problems: {report.problems}"
            return "ok"
        names = listed()
        missing = {k: v for k, v in owned.items() if names.get(k) != v}
        assert not missing, f"own names missing or changed in ls: {sorted(missing)}"
        if op == "ls":
            return "ok"
        name = rng.choice(sorted(names))
        mid = names[name]
        if op == "show":
            try:
                info = store.show(name)
            except NameNotFoundError:
                if name in owned:
                    raise
                return "race"
            assert info["manifest_id"] == mid, f"show {name}: {info['manifest_id'][:12]}, ls said {mid[:12]}"
            return "ok"
        assert op == "materialize", op
        out = work_dir / f"out-{n}"
        try:
            store.materialize(name, out)
        except NameNotFoundError:
            if name in owned:
                raise
            assert not out.exists(), f"{out} exists after a failed materialize"
            assert not output_leftovers(out), f"leftovers beside {out}: {output_leftovers(out)}"
            return "race"
        got = tree_digest(out)
        assert got == digests[mid], f"{name} ({mid[:12]}) did not materialize to the reference bytes"
        assert not output_leftovers(out), f"leftovers beside {out}: {output_leftovers(out)}"
        shutil.rmtree(out)
        return "ok"

    try:
        while time.monotonic() < deadline:
            op = rng.choices(ops, weights)[0]
            if op in ("compress", "pull") and len(owned) >= MAX_OWNED:
                op = "rm"
            if op == "rm" and not owned:
                op = "compress"
            t0 = time.monotonic()
            try:
                outcome = do(op)
            except Exception as exc:  # noqa: BLE001 - every unexpected outcome is a failure
                outcome = "fail"
                failures.append(
                    {
                        "worker": index,
                        "op": op,
                        "n": n,
                        "at_s": round(t0 - started, 3),
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()[-2500:],
                    }
                )
            counts[op][outcome] += 1
            slowest[op] = max(slowest[op], time.monotonic() - t0)
            n += 1
    finally:
        store.close()
    return {
        "operations": n,
        "counts": {op: dict(c) for op, c in counts.items()},
        "slowest_s": {op: round(t, 3) for op, t in slowest.items()},
        "failures": failures,
        "owned": owned,
        "seconds": round(time.monotonic() - started, 2),
    }


# ------------------------------------------------------------------------------------ the test
@pytest.fixture(scope="module")
def finetunes(tmp_path_factory, model_dirs) -> dict[str, Path]:
    """The tiny llama base's conftest fine-tune and two more (other seeds): two to compress, one to pull."""
    root = tmp_path_factory.mktemp("conc-models")
    out = {"ft1": model_dirs["llama"]["ft"]}
    for label, seed in (("ft2", 2), ("pulled", 3)):
        model = make_model("llama")
        fine_tune_like(model, seed=seed, scale=0.05)
        out[label] = save_checkpoint(model, root / label)
    return out


def test_concurrent_processes_on_one_store(zygote, model_dirs, finetunes, tmp_path, hub_server, soak):
    seconds = 300.0 if soak else 30.0
    refs = References()
    # Reference: every manifest a worker can produce, from clean runs; the pulled delta pushed.
    ref_home = tmp_path / "reference"
    expected: dict[str, str] = {}
    with deltahub.Store(ref_home) as ref:
        ref.add(model_dirs["llama"]["base"], name="base")
        for label, path in finetunes.items():
            expected[label] = ref.compress(path, base="base", name=label).manifest_id
        ref.push("pulled", REPO, with_base=True)
    refs.learn(ref_home, tmp_path)
    assert len(set(expected.values())) == len(expected)

    home = tmp_path / "store"
    with deltahub.Store(home) as store:
        store.add(model_dirs["llama"]["base"], name="base")
    base_mid = names_of(home)["base"]

    jobs = []
    for i in range(PROCESSES):
        hf_home = tmp_path / f"hf-{i}"
        env, hub = hub_job_settings(hub_server, hf_home=hf_home)
        jobs.append(
            zygote.job(
                target="test_concurrency_soak:worker",
                kwargs={
                    "home": str(home),
                    "index": i,
                    "seed": BASE_SEED + i,
                    "seconds": seconds,
                    "finetunes": {k: str(v) for k, v in finetunes.items() if k != "pulled"},
                    "expected": expected,
                    "digests": refs.digests,
                    "repo": REPO,
                    "work": str(reset_dir(tmp_path / f"work-{i}")),
                    "hf_cache": str(hf_home / "hub"),
                },
                env=env,
                hub=hub,
                tag=f"worker-{i}",
            )
        )
    started = time.monotonic()
    reports = zygote.run(jobs, timeout=seconds + 180)
    wall = time.monotonic() - started

    problems: list[str] = []
    results = []
    for i, report in enumerate(reports):
        value = (report.result or {}).get("value")
        if report.rc != 0 or value is None:
            problems.append(f"worker {i} (seed {BASE_SEED + i}) did not finish cleanly: {report.describe()}")
            continue
        results.append(value)
    by_op: dict[str, Counter] = {op: Counter() for op in WEIGHTS}
    slowest: dict[str, float] = {op: 0.0 for op in WEIGHTS}
    owned: dict[str, str] = {}
    failures = []
    for value in results:
        for op, c in value["counts"].items():
            by_op[op].update(c)
        for op, t in value["slowest_s"].items():
            slowest[op] = max(slowest[op], t)
        owned.update(value["owned"])
        failures += value["failures"]
    operations = sum(v["operations"] for v in results)
    for f in failures:
        problems.append(
            f"worker {f['worker']} (seed {BASE_SEED + f['worker']}) op #{f['n']} {f['op']} at {f['at_s']}s: "
            f"{f['error']}\n{f['traceback']}"
        )

    # The store afterwards: verify (API and CLI), exactly the expected names, reference bytes.
    final_ok = True
    try:
        check_store(home, refs, {"base": {base_mid}, **{k: {v} for k, v in owned.items()}}, tmp_path)
        cli_verify = zygote.cli(home, "verify")
        assert cli_verify.rc == 0, f"`deltahub verify` exit code {cli_verify.rc}: {cli_verify.describe()}"
        with deltahub.Store(home) as store:
            store.gc()
            du = store.du()
        assert not tmp_leftovers(home), f"gc left {tmp_leftovers(home)} in tmp/"
        assert du["unreferenced_objects"] == 0, du
        check_store(home, refs, {"base": {base_mid}, **{k: {v} for k, v in owned.items()}}, tmp_path)
    except Exception as exc:  # noqa: BLE001 - reported with the figures
        final_ok = False
        problems.append(f"final state: {exc}")

    record(
        "concurrency",
        processes=PROCESSES,
        seconds=seconds,
        wall_s=round(wall, 1),
        operations=operations,
        failures=len(failures),
        races=sum(c["race"] for c in by_op.values()),
        by_op={op: dict(c) for op, c in by_op.items()},
        slowest_s=slowest,
        names_at_end=len(owned) + 1,
        final_state_ok=final_ok,
        seed=BASE_SEED,
    )
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems)
    assert operations >= PROCESSES * 10, f"only {operations} operations in {seconds}s"
    assert all(by_op[op]["ok"] for op in ("compress", "pull", "materialize", "rm", "gc")), by_op


# ------------------------------------------------------------------------------------ a targeted race
@pytest.mark.parametrize("pause_at", [1, 4], ids=["at-the-manifest", "at-a-tensor"])
def test_materialize_while_its_name_is_removed_and_collected(model_dirs, tmp_path, pause_at):
    """The race the workload above can hit, made deterministic: a materialize has resolved its name
    and pauses at its ``pause_at``-th object read while another store handle removes the name and
    runs gc (separate open files: their flocks conflict as between processes). Resuming, it must
    either finish with the reference bytes (the model as it was when resolved) or fail with a clean
    ``NameNotFoundError``, leaving nothing half-written; never report a store that ``verify`` finds
    clean as corrupt (``CorruptObjectError``: "object ... is missing from the store")."""
    import threading

    from deltahub.errors import NameNotFoundError
    from deltahub.ops.context import StoreContext
    from deltahub.ops.materialize import materialize

    home = tmp_path / "store"
    with deltahub.Store(home) as store:
        store.add(model_dirs["llama"]["base"], name="base")
        store.compress(model_dirs["llama"]["ft"], base="base", name="ft")
    refs = References()
    refs.learn(home, tmp_path)
    mid = names_of(home)["ft"]

    reader = StoreContext(home)
    paused, resume = threading.Event(), threading.Event()
    calls = {"n": 0}
    lock = threading.Lock()

    def pausing(real):
        def read(*args, **kwargs):
            with lock:
                calls["n"] += 1
                hit = calls["n"] == pause_at
            if hit:
                paused.set()
                assert resume.wait(60), "the test never resumed the reader"
            return real(*args, **kwargs)

        return read

    reader.objects.read = pausing(reader.objects.read)
    reader.objects.read_view = pausing(reader.objects.read_view)
    out = tmp_path / "out"
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = materialize(reader, "ft", out)
        except BaseException as exc:  # noqa: BLE001 - examined below
            outcome["error"] = exc

    collector: dict[str, Any] = {}

    def remove_and_collect() -> None:
        try:
            with deltahub.Store(home) as other:
                other.rm("ft")
                collector["report"] = other.gc()
        except BaseException as exc:  # noqa: BLE001 - examined below
            collector["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    gc_thread = threading.Thread(target=remove_and_collect)
    try:
        assert paused.wait(60), f"the reader never reached object read #{pause_at}: {outcome}"
        gc_thread.start()
        gc_thread.join(2.0)
        # gc waits for the reader (it holds the gc lock shared from resolving its name until it has
        # read every object); a gc that ran meanwhile would have deleted objects under it.
        assert gc_thread.is_alive(), f"gc did not wait for the reader: {collector}"
    finally:
        resume.set()
        thread.join(60)
        gc_thread.join(60) if gc_thread.ident is not None else None
        reader.close()
    assert not thread.is_alive() and not gc_thread.is_alive()
    assert "error" not in collector, collector
    assert collector["report"].objects, "gc collected nothing: the race was not set up"
    with deltahub.Store(home) as store:
        assert store.verify().ok
    error = outcome.get("error")
    if error is None:
        assert tree_digest(out) == refs.digests[mid]
    else:
        assert isinstance(error, NameNotFoundError), f"{type(error).__name__}: {error}"
        assert not out.exists()
    assert not output_leftovers(out), output_leftovers(out)
