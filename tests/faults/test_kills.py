"""Kills: seeded SIGKILLs at random moments inside add, compress, calibrate, pull, push, materialize
and gc (issue 9, "Kills").

Every operation runs in a child forked from a warmed-up zygote (``fault_helpers``), so a kill lands
in the operation's own work, not in interpreter start-up. For each operation one clean run is
measured first; each trial then copies a template store, runs the command and sends SIGKILL after
a delay drawn uniformly from [0, 1.2 x the clean duration] (seeded: ``BASE_SEED`` + the trial's
offset; failures print the seed and the delay). After each kill:

* ``verify`` passes and every name is where it may be (the old target or the complete new one),
  and every name materializes to the bytes a clean run gives;
* rerunning the killed command succeeds, and the store then holds what a clean run gives (for
  materialize: the same OUT folder, complete, and no ``.OUT.deltahub-tmp-*`` sibling left);
* ``gc`` leaves nothing in the store's ``tmp/`` (temp files and ``push-<pid>-*`` staging folders of
  the dead process), and the store still verifies and materializes.

A rerun that is refused only because the killed run had already finished its work (the name it
published, or the OUT folder it completed, is there: ``NameExistsError`` / ``OutputExistsError``,
exit 4) is counted as ``rerun_refused_done``, not as a success, and reported.

Problems are collected over all trials of an operation and asserted at the end, so one run reports
every failing trial. ``pytest --soak`` runs ~50 kills per operation instead of ~5. A delay is
reproducible from its seed; where exactly it lands depends on the machine's speed and load.

``test_targeted_kill_points`` adds moments that random delays rarely hit: right after a writer's
objects were renamed into ``objects/`` and before its index rows, before materialize renames its
finished output into place, and at push's Hub commit.
"""

from __future__ import annotations

import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from calibrate_fixtures import chain_text
from conftest import VOCAB, fine_tune_like, save_checkpoint
from fault_helpers import (
    BASE_SEED,
    References,
    Zygote,
    check_store,
    copy_store,
    dead_pid,
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

OPS = ("add", "compress", "calibrate", "pull", "push", "materialize", "gc")
JOB_TIMEOUT = 120.0
CALIB = ["--calib-samples", "8", "--calib-seq-len", "16", "--calib-steps", "4", "--seed", "0"]
PULL_REPO = f"{FAKE_USER}/kill-delta"
PULL_BASE_REPO = f"{PULL_REPO}-base"


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def n_kills(soak) -> int:
    return 50 if soak else 5


@pytest.fixture(scope="module")
def models(tmp_path_factory, model_dirs) -> dict[str, Path]:
    """A Llama-style base of 4 layers saved in 4 shards (more objects, more files: more moments to
    kill in), two fine-tunes of it, the tiny GPT-2 base of conftest, and calibration text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("kill-models")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"base": save_checkpoint(model, root / "base", max_shard_size="1MB")}
    fine_tune_like(model, seed=1)
    out["ft"] = save_checkpoint(model, root / "ft", max_shard_size="1MB")
    model.load_state_dict(state)
    fine_tune_like(model, seed=2, scale=0.05)
    out["ft2"] = save_checkpoint(model, root / "ft2", max_shard_size="1MB")
    out["gbase"] = model_dirs["gpt2"]["base"]
    out["calib"] = root / "calib.txt"
    out["calib"].write_text(chain_text(3000, seed=1))
    return out


# ------------------------------------------------------------------------------------ the runner
Allowed = dict[str, set]


@dataclass
class Variant:
    """One way of running an operation: a template store and the command, and what may be true
    after a kill and after the rerun."""

    label: str
    template: Path | None  # None: the store does not exist yet
    args: Callable[[Path], list]  # trial folder -> CLI arguments after --home
    after_kill: Allowed
    after_rerun: Callable[[dict[str, str]], Allowed]  # names after the kill -> allowed after the rerun
    #: (names after the kill, trial folder) -> the killed run had finished (a rerun may be refused)
    done: Callable[[dict[str, str], Path], bool] = lambda names, trial: False
    refusal: tuple[int, str] | None = None  # exit code and message of that refusal
    check_kill: Callable[[Path, Path], None] | None = None  # (home, trial folder) extra checks
    check_rerun: Callable[[Path, Path], None] | None = None
    prepare: Callable[[Path], None] | None = None  # before every run (trial folder)
    env: dict | None = None
    hub: dict | None = None
    duration: float = 0.0


@dataclass
class Tally:
    trials: int = 0
    kills: int = 0
    finished_before_kill: int = 0
    survived: int = 0  # every after-kill check passed
    verify_ok: int = 0
    reruns_ok: int = 0
    rerun_refused_done: int = 0
    rerun_state_ok: int = 0
    tmp_clean_after_gc: int = 0
    tmp_left_by_kill: int = 0  # trials whose kill left something in tmp/ (for gc to remove)
    killed_after_done: int = 0  # kills that landed after the command's effect was complete
    out_left_by_kill: int = 0  # materialize trials whose kill left a .OUT.deltahub-* sibling
    after_gc_ok: int = 0
    problems: list[str] = field(default_factory=list)
    phases: Counter = field(default_factory=Counter)


def _run(zygote: Zygote, home: Path, variant: Variant, trial: Path, kill_after: float | None = None, tag: str = ""):
    return zygote.cli(
        home, *variant.args(trial), timeout=JOB_TIMEOUT, kill_after=kill_after, env=variant.env, hub=variant.hub,
        tag=tag or variant.label,
    )


def measure(zygote: Zygote, variant: Variant, work: Path, refs: References) -> Path:
    """One clean run of ``variant`` (its duration is the kill window); returns the store it left, whose
    names become references."""
    trial = reset_dir(work / f"clean-{variant.label}")
    home = trial / "store"
    if variant.template is not None:
        copy_store(variant.template, home)
    if variant.prepare:
        variant.prepare(trial)
    report = _run(zygote, home, variant, trial, tag=f"clean-{variant.label}")
    assert report.rc == 0, f"clean run of {variant.label} failed: {report.describe()}"
    variant.duration = report.elapsed
    refs.learn(home, trial)
    return home


def run_kill_trials(op: str, zygote: Zygote, variants: list[Variant], refs: References, n_kills: int, work: Path) -> Tally:
    """Kill ``op`` until ``n_kills`` kills landed (at most 2 x n_kills + 2 trials), checking each."""
    tally = Tally()
    started = time.monotonic()
    last_home: Path | None = None
    delays = []
    i = 0
    while tally.kills < n_kills and i < 2 * n_kills + 2:
        variant = variants[i % len(variants)]
        seed = BASE_SEED + 1000 * OPS.index(op) + i
        delay = random.Random(seed).uniform(0.0, 1.2 * variant.duration)
        trial = reset_dir(work / f"trial-{i:03d}")
        home = trial / "store"
        if variant.template is not None:
            copy_store(variant.template, home)
        if variant.prepare:
            variant.prepare(trial)
        where = f"[kills/{op}] trial {i} ({variant.label}) seed {seed} delay {delay:.4f}s of {variant.duration:.3f}s"
        report = _run(zygote, home, variant, trial, kill_after=delay, tag=f"{op}-{i}")
        i += 1
        tally.trials += 1
        delays.append(round(delay, 4))

        def problem(phase: str, exc: BaseException | str, report=report) -> None:
            tally.phases[phase] += 1
            tally.problems.append(f"{where} [{phase}] {exc}\n    killed run: {report.describe()}")

        if report.timed_out:
            problem("timeout", "the command did not end")
            continue
        if report.killed:
            tally.kills += 1
        else:
            tally.finished_before_kill += 1
            if report.rc != 0:
                problem("clean-exit", f"finished before the kill with exit code {report.rc}")
                continue

        # 1. right after the kill
        tally.tmp_left_by_kill += bool(tmp_leftovers(home))
        tally.out_left_by_kill += bool(output_leftovers(trial / "out"))
        names: dict[str, str] = {}
        try:
            with deltahub.Store(home) as store:
                verified = store.verify()
            assert verified.ok, f"verify found problems: {verified.problems}"
            tally.verify_ok += 1
            names = check_store(home, refs, variant.after_kill, trial, verify=False)
            if variant.check_kill:
                variant.check_kill(home, trial)
            tally.survived += 1
        except Exception as exc:  # noqa: BLE001 - collected, asserted at the end
            problem("after-kill", exc)
            if not names:
                try:
                    names = names_of(home)
                except Exception:  # noqa: BLE001
                    names = {}

        # 2. rerun the killed command
        if report.killed:
            tally.killed_after_done += bool(names and variant.done(names, trial))
            rerun = _run(zygote, home, variant, trial, tag=f"{op}-{i - 1}-rerun")
            if rerun.rc == 0:
                tally.reruns_ok += 1
            elif (
                variant.refusal is not None
                and variant.done(names, trial)
                and rerun.rc == variant.refusal[0]
                and variant.refusal[1] in rerun.log_tail()
            ):
                tally.rerun_refused_done += 1
            else:
                problem("rerun", f"the rerun failed: {rerun.describe()}", report)
            try:
                check_store(home, refs, variant.after_rerun(names), trial)
                if variant.check_rerun:
                    variant.check_rerun(home, trial)
                tally.rerun_state_ok += 1
            except Exception as exc:  # noqa: BLE001
                problem("after-rerun", exc)

        # 3. gc leaves no temp, and breaks nothing
        try:
            with deltahub.Store(home) as store:
                store.gc()
            left = tmp_leftovers(home)
            assert not left, f"gc left {left} in tmp/"
            tally.tmp_clean_after_gc += 1
        except Exception as exc:  # noqa: BLE001
            problem("gc-tmp", exc)
        try:
            check_store(home, refs, variant.after_rerun(names) if report.killed else variant.after_kill, trial)
            tally.after_gc_ok += 1
        except Exception as exc:  # noqa: BLE001
            problem("after-gc", exc)
        last_home = home

    # once per test: the CLI's verify exits 0 on the last store
    if last_home is not None:
        cli_verify = zygote.cli(last_home, "verify", timeout=JOB_TIMEOUT, env=variants[0].env, hub=variants[0].hub)
        if cli_verify.rc != 0:
            tally.phases["cli-verify"] += 1
            tally.problems.append(f"[kills/{op}] `deltahub verify` exit code {cli_verify.rc}: {cli_verify.describe()}")
    record(
        f"kills/{op}",
        trials=tally.trials,
        kills=tally.kills,
        finished_before_kill=tally.finished_before_kill,
        survived=tally.survived,
        verify_ok=tally.verify_ok,
        reruns_ok=tally.reruns_ok,
        rerun_refused_done=tally.rerun_refused_done,
        rerun_state_ok=tally.rerun_state_ok,
        tmp_clean_after_gc=tally.tmp_clean_after_gc,
        tmp_left_by_kill=tally.tmp_left_by_kill,
        killed_after_done=tally.killed_after_done,
        out_left_by_kill=tally.out_left_by_kill,
        after_gc_ok=tally.after_gc_ok,
        problems=len(tally.problems),
        problem_phases=dict(tally.phases),
        durations_s={v.label: round(v.duration, 3) for v in variants},
        delays_s=delays,
        seed=BASE_SEED,
        wall_s=round(time.monotonic() - started, 1),
    )
    return tally


def assert_no_problems(tally: Tally, n_kills: int) -> None:
    assert not tally.problems, f"{len(tally.problems)} problem(s):\n" + "\n".join(tally.problems)
    assert tally.kills >= min(n_kills, 3), f"only {tally.kills} kills landed in {tally.trials} trials"


def _store_with(work: Path, label: str, steps: Callable[[deltahub.Store], None]) -> Path:
    home = reset_dir(work / f"template-{label}") / "store"
    with deltahub.Store(home) as store:
        steps(store)
    return home


def _base_and(models: dict[str, Path], *fts: str) -> Callable[[deltahub.Store], None]:
    """Template steps: add the base as ``base``, then compress each of ``fts`` under its own name."""

    def steps(s: deltahub.Store) -> None:
        s.add(models["base"], name="base")
        for ft in fts:
            s.compress(models[ft], base="base", name=ft)

    return steps


def _name_is(name: str, mid: str) -> Callable[[dict[str, str], Path], bool]:
    return lambda names, trial: names.get(name) == mid


# ------------------------------------------------------------------------------------ the tests
def test_kill_add(zygote, models, n_kills, tmp_path):
    refs = References()
    with_gpt2 = _store_with(tmp_path, "gpt2", lambda s: s.add(models["gbase"], name="gbase"))
    args = lambda trial: ["add", models["base"], "--name", "base", "--json"]  # noqa: E731
    variants = [
        Variant("new-store", None, args, {}, lambda names: {}),
        Variant("existing-store", with_gpt2, args, {}, lambda names: {}),
    ]
    for v in variants:
        measure(zygote, v, tmp_path, refs)
    mid_b = names_of(tmp_path / "clean-new-store" / "store")["base"]
    mid_g = names_of(with_gpt2)["gbase"]
    for v, extra in zip(variants, ({}, {"gbase": {mid_g}})):
        v.after_kill = {"base": {None, mid_b}, **extra}
        v.after_rerun = lambda names, extra=extra: {"base": {mid_b}, **extra}
        v.done = _name_is("base", mid_b)
        v.refusal = (4, "already taken")
    assert_no_problems(run_kill_trials("add", zygote, variants, refs, n_kills, tmp_path), n_kills)


def test_kill_compress(zygote, models, n_kills, tmp_path):
    refs = References()

    template = _store_with(tmp_path, "base-ft2", _base_and(models, "ft2"))
    refs.learn(template, tmp_path)
    before = names_of(template)
    variant = Variant("compress", template, lambda trial: ["compress", models["ft"], "--base", "base", "--name", "ft", "--json"], {}, None)
    mid_ft = names_of(measure(zygote, variant, tmp_path, refs))["ft"]
    fixed = {k: {v} for k, v in before.items()}
    variant.after_kill = {**fixed, "ft": {None, mid_ft}}
    variant.after_rerun = lambda names: {**fixed, "ft": {mid_ft}}
    variant.done = _name_is("ft", mid_ft)
    variant.refusal = (4, "already taken")
    assert_no_problems(run_kill_trials("compress", zygote, [variant], refs, n_kills, tmp_path), n_kills)


def test_kill_calibrate(zygote, models, n_kills, tmp_path):
    refs = References()

    template = _store_with(tmp_path, "base-ft", _base_and(models, "ft"))
    refs.learn(template, tmp_path)
    before = names_of(template)
    args = lambda trial: [  # noqa: E731
        "calibrate", "ft", "--finetune", models["ft"], "--calib-data", models["calib"], *CALIB, "--json",
    ]
    variant = Variant("calibrate", template, args, {}, None)
    once = measure(zygote, variant, tmp_path, refs)
    mid_cal1 = names_of(once)["ft"]
    assert mid_cal1 != before["ft"], "calibration changed nothing: no kill window to test"
    # calibrating the calibrated delta again (what a rerun does when the kill came after the name moved)
    twice = Variant("calibrate-again", once, args, {}, None)
    mid_cal2 = names_of(measure(zygote, twice, tmp_path, refs))["ft"]
    next_of = {before["ft"]: mid_cal1, mid_cal1: mid_cal2}
    variant.after_kill = {"base": {before["base"]}, "ft": {before["ft"], mid_cal1}}
    variant.after_rerun = lambda names: {"base": {before["base"]}, "ft": {next_of.get(names.get("ft"), "?")}}
    variant.done = _name_is("ft", mid_cal1)
    assert_no_problems(run_kill_trials("calibrate", zygote, [variant], refs, n_kills, tmp_path), n_kills)


def test_kill_materialize(zygote, models, n_kills, tmp_path):
    refs = References()

    template = _store_with(tmp_path, "base-ft", _base_and(models, "ft"))
    refs.learn(template, tmp_path)
    fixed = {k: {v} for k, v in names_of(template).items()}
    shapes = {
        "default": [],
        "fp16-sharded": ["--dtype", "float16", "--max-shard-size", "256KB"],
    }
    variants = []
    for label, extra in shapes.items():
        args = lambda trial, extra=extra: ["materialize", "ft", trial / "out", *extra, "--json"]  # noqa: E731
        variants.append(Variant(label, template, args, fixed, lambda names: fixed, refusal=(4, "not empty")))
    expected: dict[str, dict[str, str]] = {}
    for v in variants:
        measure(zygote, v, tmp_path, refs)
        expected[v.label] = tree_digest(tmp_path / f"clean-{v.label}" / "out")
        assert len(expected[v.label]) >= 4, expected[v.label]

    for v in variants:
        want = expected[v.label]

        def complete(trial: Path, want=want) -> bool:
            out = trial / "out"
            return out.is_dir() and tree_digest(out) == want

        def check_kill(home: Path, trial: Path, want=want) -> None:
            out = trial / "out"
            assert not out.exists() or tree_digest(out) == want, f"{out} is half-written: {sorted(tree_digest(out))}"

        def check_rerun(home: Path, trial: Path, want=want) -> None:
            out = trial / "out"
            assert out.is_dir() and tree_digest(out) == want, f"{out} is not the complete checkpoint"
            left = output_leftovers(out)
            assert not left, f"leftovers beside {out} after the rerun: {left}"

        v.done = lambda names, trial, complete=complete: complete(trial)
        v.check_kill, v.check_rerun = check_kill, check_rerun
    assert_no_problems(run_kill_trials("materialize", zygote, variants, refs, n_kills, tmp_path), n_kills)


def test_kill_gc(zygote, models, n_kills, tmp_path):
    refs = References()

    template = _store_with(tmp_path, "garbage", _base_and(models, "ft", "ft2"))
    refs.learn(template, tmp_path)
    with deltahub.Store(template) as s:
        s.rm("ft2")  # its manifest and objects are garbage now
    # what dead processes leave in tmp/: a temp object file and a push staging folder
    pid = dead_pid()
    (template / "tmp" / f"obj-{pid}-deadbeef.tmp").write_bytes(b"half an object")
    for staging in (template / "tmp" / f"push-{pid}-deadbeef", template / "tmp" / f"push_{pid}_olderversion"):
        staging.mkdir()
        (staging / "delta.safetensors").write_bytes(b"half a file")
    fixed = {k: {v} for k, v in names_of(template).items()}
    assert set(fixed) == {"base", "ft"}

    def collected(home: Path, trial: Path) -> None:
        with deltahub.Store(home) as s:
            du = s.du()
        assert du["unreferenced_objects"] == 0, f"{du['unreferenced_objects']} unreferenced objects after gc"

    variant = Variant("gc", template, lambda trial: ["gc", "--json"], fixed, lambda names: fixed, check_rerun=collected)
    measure(zygote, variant, tmp_path, refs)
    assert_no_problems(run_kill_trials("gc", zygote, [variant], refs, n_kills, tmp_path), n_kills)


# ------------------------------------------------------------------------------------ Hub operations
@pytest.fixture
def pushed(tmp_path, models, hub_server):
    """Store A (base + ft) with ft pushed to PULL_REPO and its base to PULL_BASE_REPO."""
    home = tmp_path / "store-a"
    with deltahub.Store(home) as a:
        a.add(models["base"], name="base")
        a.compress(models["ft"], base="base", name="ft")
        result = a.push("ft", PULL_REPO, with_base=True)
    return {"home": home, "base_commit": result.base.base_commit}


def test_kill_pull(zygote, models, n_kills, tmp_path, hub_server, pushed):
    refs = References()
    refs.learn(pushed["home"], tmp_path)
    mids = names_of(pushed["home"])
    env, hub = hub_job_settings(hub_server)
    hf_cache = Path(env["HF_HUB_CACHE"])

    def fresh_hf_cache(trial: Path) -> None:
        # every trial downloads again (kills land in downloads too); the rerun reuses what was left
        shutil.rmtree(hf_cache, ignore_errors=True)

    with_base = _store_with(tmp_path, "base", lambda s: s.add(models["base"], name="base"))
    delta = PULL_REPO.rpartition("/")[2]
    base_name = PULL_BASE_REPO.rpartition("/")[2]
    args = lambda trial: ["pull", PULL_REPO, "--json"]  # noqa: E731
    variants = [
        # the base comes from the Hub too (stored as references into the HF cache)
        Variant(
            "fetch-base", None, args,
            {delta: {None, mids["ft"]}, base_name: {None, mids["base"]}},
            # a kill after the base's objects but before its name: the rerun finds the base by its
            # manifest id and does not name it again (it stays reachable through the delta)
            lambda names: {delta: {mids["ft"]}, base_name: {None, mids["base"]}},
            prepare=fresh_hf_cache, env=env, hub=hub,
        ),
        Variant(
            "base-present", with_base, args,
            {"base": {mids["base"]}, delta: {None, mids["ft"]}},
            lambda names: {"base": {mids["base"]}, delta: {mids["ft"]}},
            prepare=fresh_hf_cache, env=env, hub=hub,
        ),
    ]
    for v in variants:
        v.done = _name_is(delta, mids["ft"])
        measure(zygote, v, tmp_path, refs)
    tally = run_kill_trials("pull", zygote, variants, refs, n_kills, tmp_path)
    assert_no_problems(tally, n_kills)


def test_kill_push(zygote, models, n_kills, tmp_path, hub_server, pushed):
    refs = References()
    refs.learn(pushed["home"], tmp_path)
    mids = names_of(pushed["home"])
    fixed = {k: {v} for k, v in mids.items()}
    env, hub = hub_job_settings(hub_server)
    repos: dict[Path, str] = {}

    def repo_of(trial: Path) -> str:
        return repos.setdefault(trial, f"{FAKE_USER}/kp-{len(repos):03d}")

    def pulled_back(base_repo: Callable[[str], str]) -> Callable[[Path, Path], None]:
        def check(home: Path, trial: Path) -> None:
            """The Hub now holds the delta (and its base): pulled into an empty store, both
            materialize to the reference bytes."""
            repo = repo_of(trial)
            fresh = trial / "pulled"
            report = zygote.cli(fresh, "pull", repo, "--json", timeout=JOB_TIMEOUT, env=env, hub=hub, tag="pull-back")
            assert report.rc == 0, f"pulling the pushed repo back failed: {report.describe()}"
            names = {repo.rpartition("/")[2]: {mids["ft"]}, base_repo(repo).rpartition("/")[2]: {mids["base"]}}
            check_store(fresh, refs, names, trial)

        return check

    variants = [
        Variant(
            "with-base", pushed["home"], lambda trial: ["push", "ft", repo_of(trial), "--with-base", "--json"],
            fixed, lambda names: fixed, check_rerun=pulled_back(lambda repo: f"{repo}-base"), env=env, hub=hub,
        ),
        Variant(
            "base-repo", pushed["home"],
            lambda trial: ["push", "ft", repo_of(trial), "--base-repo", f"{PULL_BASE_REPO}@{pushed['base_commit']}", "--json"],
            fixed, lambda names: fixed, check_rerun=pulled_back(lambda repo: PULL_BASE_REPO), env=env, hub=hub,
        ),
    ]
    for v in variants:
        measure(zygote, v, tmp_path, refs)
    assert_no_problems(run_kill_trials("push", zygote, variants, refs, n_kills, tmp_path), n_kills)


# ------------------------------------------------------------------------------------ targeted kill points
def test_targeted_kill_points(zygote, models, tmp_path, hub_server, pushed):
    """Moments that random delays rarely hit, killed on purpose (``fault_helpers.cli_killed_at``):

    * ``index-*``: right after a writer's objects, its manifest object included, were renamed into
      ``objects/`` and before its index rows (the narrowest window of objects -> index rows ->
      name). For ``pull`` this covers the base it fetches from the Hub too: the rerun must not take
      the base's manifest object on disk for a stored (indexed) base.
    * ``materialize-rename``: the checkpoint is complete in ``.OUT.deltahub-tmp-*`` but not renamed:
      the rerun to the same OUT must finish it and remove that leftover.
    * ``push-commit``: the files are staged in ``tmp/push-<pid>-*`` and uploaded, the commit is not
      made: the rerun must push, ``gc`` must remove the staging folder.

    After each: the store verifies, nothing new is named, the rerun succeeds and leaves what a clean
    run leaves, ``gc`` empties ``tmp/``."""
    refs = References()
    refs.learn(pushed["home"], tmp_path)
    mids = names_of(pushed["home"])
    env, hub = hub_job_settings(hub_server)
    with_base = _store_with(tmp_path, "base", lambda s: s.add(models["base"], name="base"))
    delta = PULL_REPO.rpartition("/")[2]
    base_name = PULL_BASE_REPO.rpartition("/")[2]
    both = {"base": {mids["base"]}, "ft": {mids["ft"]}}
    out_ref: dict[str, str] = {}

    def out_left(trial: Path) -> None:
        assert output_leftovers(trial / "out") and not (trial / "out").exists(), "the kill point was not reached"

    def out_done(trial: Path) -> None:
        if not out_ref:
            with deltahub.Store(pushed["home"]) as store:
                store.materialize("ft", tmp_path / "ref-out")
            out_ref.update(tree_digest(tmp_path / "ref-out"))
        assert tree_digest(trial / "out") == out_ref, "OUT is not the complete checkpoint"
        assert not output_leftovers(trial / "out"), output_leftovers(trial / "out")

    def staged(trial: Path) -> None:
        assert any(p.startswith("push-") for p in tmp_leftovers(trial / "store")), "no staging folder left"

    def pushed_back(trial: Path) -> None:
        fresh = trial / "pulled"
        report = zygote.cli(fresh, "pull", f"{FAKE_USER}/point-push", "--json", env=env, hub=hub, tag="pull-back")
        assert report.rc == 0, report.describe()
        check_store(fresh, refs, {"point-push": {mids["ft"]}, base_name: {mids["base"]}}, trial)

    base_repo = f"{PULL_BASE_REPO}@{pushed['base_commit']}"
    cases = [
        # label, template, command, kill point, names after the rerun, check after the kill, after the rerun
        ("add", None, ["add", models["base"], "--name", "base"], "index-base", {"base": {mids["base"]}}, None, None),
        ("compress", with_base, ["compress", models["ft"], "--base", "base", "--name", "ft"], "index-delta", both, None, None),
        ("pull-delta", with_base, ["pull", PULL_REPO], "index-delta", {"base": {mids["base"]}, delta: {mids["ft"]}}, None, None),
        # the base comes back unnamed if the kill came after its index rows; here it came before them
        ("pull-fetched-base", None, ["pull", PULL_REPO], "index-base", {base_name: {mids["base"]}, delta: {mids["ft"]}}, None, None),
        ("materialize", pushed["home"], ["materialize", "ft", "{trial}/out"], "materialize-rename", both, out_left, out_done),
        ("push", pushed["home"], ["push", "ft", f"{FAKE_USER}/point-push", "--base-repo", base_repo], "push-commit", both, staged, pushed_back),
    ]
    problems = []
    for label, template, args, point, after, check_kill, check_rerun in cases:
        trial = reset_dir(tmp_path / f"point-{label}")
        home = trial / "store"
        if template is not None:
            copy_store(template, home)
        before = {k: {v} for k, v in names_of(home).items()} if template is not None else {}
        shutil.rmtree(env["HF_HUB_CACHE"], ignore_errors=True)
        args = [str(a).replace("{trial}", str(trial)) for a in args]
        killed = zygote.run_one(
            timeout=JOB_TIMEOUT, target="fault_helpers:cli_killed_at",
            kwargs={"args": ["--home", str(home), *args, "--json"], "point": point}, env=env, hub=hub, tag=f"point-{label}",
        )
        try:
            assert killed.killed, f"the kill point was not reached: {killed.describe()}"
            check_store(home, refs, before, trial)  # nothing new is named
            if check_kill:
                check_kill(trial)
            rerun = zygote.cli(home, *args, "--json", timeout=JOB_TIMEOUT, env=env, hub=hub, tag=f"point-{label}-rerun")
            assert rerun.rc == 0, f"the rerun failed: {rerun.describe()}"
            check_store(home, refs, after, trial)
            if check_rerun:
                check_rerun(trial)
            with deltahub.Store(home) as store:
                store.gc()
            assert not tmp_leftovers(home), f"gc left {tmp_leftovers(home)} in tmp/"
            check_store(home, refs, after, trial)
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            problems.append(f"[kill point {point}: {label}] {exc}")
    record("kills/targeted", cases=len(cases), points=[c[0] for c in cases], problems=len(problems))
    assert not problems, "\n".join(problems)
