"""`memcity ingest`: through the Dagster instance, one run per partition.

`plan_ingest` compares the landing folder with the instance's partitions: it adds the partitions
of new knowledge bases and users, and picks the partitions to run (those named, every one, or by
default those whose files differ from what the lake last read, or that never finished).
`run_ingest` removes what left the landing folder (`sync_landing_layout_job`), then executes one
run per picked partition with the job's own executor (`dg.execute_job`), up to `parallel` runs at
a time, each in a worker process (Dagster's run execution is not safe in two threads of one
process); one run at a time goes in the command's own process. Two runs on one partition never
overlap: each run holds its partition's lock in the lake for its whole length. Progress is read
from each run's event log with a cursor, so no event is read twice.
"""

import functools
import multiprocessing
import os
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dagster as dg

from memcity_pipeline.cli.events import PARTITION_TAG, RunFollower, error_cause, failed_check
from memcity_pipeline.cli.freshness import (
    SETTINGS_TAG,
    finished_partitions,
    settings_fingerprint,
    up_to_date,
)
from memcity_pipeline.cli.runner import JOB_FACTORIES, get_instance, sync_landing_layout_job
from memcity_pipeline.ingestion.landing import LandingProblem, compare_scopes, landing_scopes
from memcity_pipeline.ingestion.sync import layout_errors_current
from memcity_pipeline.lake.io import table_lock
from memcity_pipeline.lake.tables import PARTITIONS, ScopeKind, parse_scope_key
from memcity_pipeline.settings import Settings

BATCH_TAG = "memcity/ingest"  # every run of one `memcity ingest` carries the same value
JOB_OF_SCOPE: dict[ScopeKind, str] = {
    "knowledge_base": "ingest_knowledge_bases",
    "user": "ingest_users",
}
STEPS: dict[ScopeKind, int] = {"knowledge_base": 6, "user": 3}


class SelectionError(ValueError):
    """`--org`, `--kb` or `--user` names nothing in the landing folder (or is malformed)."""


@dataclass(frozen=True)
class PartitionRef:
    scope: ScopeKind
    key: str

    @property
    def job(self) -> str:
        return JOB_OF_SCOPE[self.scope]


@dataclass
class IngestPlan:
    """What `memcity ingest` is about to do."""

    runs: list[PartitionRef] = field(default_factory=list)  # partitions to run, in order
    added: list[PartitionRef] = field(default_factory=list)  # new partitions (registered)
    removed: list[PartitionRef] = field(default_factory=list)  # folders gone: data to remove
    unchanged: list[PartitionRef] = field(default_factory=list)  # up to date: not run
    layout_problems: list[LandingProblem] = field(default_factory=list)


@dataclass
class PartitionOutcome:
    """What the run of one partition did."""

    partition: PartitionRef
    run_id: str | None = None
    success: bool = False
    failure: str | None = None
    materializations: dict[str, dict[str, Any]] = field(default_factory=dict)
    check_results: dict[str, bool] = field(default_factory=dict)


@dataclass
class IngestOutcome:
    plan: IngestPlan
    partitions: list[PartitionOutcome] = field(default_factory=list)
    layout_run_id: str | None = None
    layout_failure: str | None = None

    @property
    def success(self) -> bool:
        return self.layout_failure is None and all(p.success for p in self.partitions)

    def materializations(self, asset: str) -> list[dict[str, Any]]:
        """The metadata of `asset`'s materializations, one per partition run that made one."""
        return [p.materializations[asset] for p in self.partitions if asset in p.materializations]


Executor = Literal["in_process", "multiprocess"]
# (partition, step, event, detail): as `cli.events.StepEvent`, with the partition resolved.
StepCallback = Callable[[PartitionRef, str, str, str], None]


def _selected(
    found: dict[ScopeKind, set[str]],
    orgs: Iterable[str],
    kbs: Iterable[str],
    users: Iterable[str],
    landing: Path,
) -> dict[ScopeKind, set[str]]:
    picked: dict[ScopeKind, set[str]] = {"knowledge_base": set(), "user": set()}
    for scope, keys in (("knowledge_base", kbs), ("user", users)):
        for key in keys:
            try:
                parse_scope_key(key)
            except ValueError as exc:
                raise SelectionError(str(exc)) from None
            if key not in found[scope]:  # type: ignore[index]
                word = "knowledge base" if scope == "knowledge_base" else "user"
                known = ", ".join(sorted(found[scope])) or "none"  # type: ignore[index]
                raise SelectionError(
                    f"no {word} {key!r} in the landing folder at {landing} (known: {known})"
                )
            picked[scope].add(key)  # type: ignore[index]
    for org in orgs:
        under = {s: {k for k in keys if k.split("/", 1)[0] == org} for s, keys in found.items()}
        if not any(under.values()):
            known_orgs = sorted({k.split("/", 1)[0] for keys in found.values() for k in keys})
            raise SelectionError(
                f"no org {org!r} in the landing folder at {landing} "
                f"(known: {', '.join(known_orgs) or 'none'})"
            )
        for scope, keys in under.items():
            picked[scope] |= keys
    return picked


def _add_partitions(instance: dg.DagsterInstance, name: str, keys: list[str]) -> None:
    """Register partitions; another command registering the same ones at once is no error."""
    try:
        instance.add_dynamic_partitions(name, keys)
    except Exception:  # a concurrent insert of the same key: add what is still missing
        known = set(instance.get_dynamic_partitions(name))
        missing = [k for k in keys if k not in known]
        if missing:
            instance.add_dynamic_partitions(name, missing)


def plan_ingest(
    settings: Settings,
    instance: dg.DagsterInstance,
    *,
    orgs: Iterable[str] = (),
    kbs: Iterable[str] = (),
    users: Iterable[str] = (),
    everything: bool = False,
) -> IngestPlan:
    """Compare the landing folder with the instance's partitions and pick what to run.

    New partitions are registered in the instance here (a run needs its partition to exist).
    Raises SelectionError when a selection names nothing in the landing folder.
    """
    orgs, kbs, users = list(orgs), list(kbs), list(users)
    landing = landing_scopes(settings.landing_dir)
    plan = IngestPlan(layout_problems=landing.unscoped)
    found: dict[ScopeKind, set[str]] = {s: set(landing.of(s)) for s in JOB_OF_SCOPE}
    explicit = bool(orgs or kbs or users)
    picked = _selected(found, orgs, kbs, users, settings.landing_dir) if explicit else found
    for scope in JOB_OF_SCOPE:
        name = PARTITIONS[scope]
        changes = compare_scopes(landing.of(scope), instance.get_dynamic_partitions(name), {})
        if changes.added:
            _add_partitions(instance, name, changes.added)
        plan.added += [PartitionRef(scope, k) for k in changes.added]
        removed = [
            k
            for k in changes.removed
            if (not explicit or k in picked[scope]) and not landing.hidden(scope, k)
        ]
        plan.removed += [PartitionRef(scope, k) for k in removed]
        keys = sorted(picked[scope])
        if everything or explicit:
            plan.runs += [PartitionRef(scope, k) for k in keys]
            continue
        finished = finished_partitions(instance, scope, [k for k in keys if k not in changes.added])
        for key in keys:
            current = key in finished and up_to_date(instance, settings, scope, key)
            (plan.unchanged if current else plan.runs).append(PartitionRef(scope, key))
    return plan


def _outcome(result: Any, into: PartitionOutcome) -> None:
    """Fill `into` from a finished run: a partition succeeded when its run did and every check
    passed; its failure names the failed checks, else the cause of the first failed step."""
    into.run_id = result.run_id
    for event in result.get_asset_materialization_events():
        mat = event.materialization
        into.materializations[mat.asset_key.to_user_string()] = {
            k: _plain(v) for k, v in mat.metadata.items()
        }
    failed_checks: list[str] = []
    step_failure = None
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            data = event.event_specific_data
            into.check_results[data.check_name] = bool(data.passed)  # type: ignore[union-attr]
            if not data.passed:  # type: ignore[union-attr]
                failed_checks.append(failed_check(data))
        if event.is_step_failure and step_failure is None:
            err = event.step_failure_data.error  # type: ignore[union-attr]
            step_failure = f"{event.step_key}: {error_cause(err) if err else 'failed'}"
    into.success = result.success and not failed_checks
    if failed_checks:
        into.failure = "; ".join(failed_checks)
    elif not into.success:
        into.failure = step_failure or "the run failed"


def _plain(value: Any) -> Any:
    """A metadata value as plain data (it crosses a process boundary and ends up in JSON)."""
    value = getattr(value, "value", value)
    simple = (str, int, float, bool, type(None))
    listed = isinstance(value, list) and all(isinstance(v, simple) for v in value)
    return value if isinstance(value, simple) or listed else str(value)


@functools.lru_cache(maxsize=1)
def _worker_instance() -> dg.DagsterInstance:
    """A worker process's instance, opened once for all the runs it executes."""
    return dg.DagsterInstance.get()


def _execute_partition(
    part: PartitionRef,
    batch: str,
    run_config: dict[str, Any],
    fingerprint: str,
    instance: dg.DagsterInstance | None = None,
) -> PartitionOutcome:
    """One run of one partition with its job's own executor, on `instance` (default: this
    worker process's). Dagster's run execution is not safe in two threads of one process."""
    outcome = PartitionOutcome(part)
    with dg.execute_job(
        dg.reconstructable(JOB_FACTORIES[part.job]),
        instance=instance or _worker_instance(),
        run_config=run_config,
        tags={PARTITION_TAG: part.key, BATCH_TAG: batch, SETTINGS_TAG: fingerprint},
    ) as result:
        _outcome(result, outcome)
    return outcome


Execute = Callable[[PartitionRef, str, dict[str, Any], str], PartitionOutcome]


def _run_partition(
    settings: Settings,
    execute: Execute,
    part: PartitionRef,
    batch: str,
    run_config: dict[str, Any],
    on_wait: Callable[[str], None] | None,
) -> PartitionOutcome:
    """Hold the partition's lock while `execute` (`_execute_partition`, here or in a worker
    process) runs it."""
    with table_lock(
        settings.locks_dir,
        PARTITIONS[part.scope],
        parse_scope_key(part.key),
        timeout_s=settings.lake_lock_timeout_s,
        holder=f"memcity ingest {batch} (pid {os.getpid()})",
        on_wait=on_wait,
        label=f"partition {part.key}",
    ):
        return execute(part, batch, run_config, settings_fingerprint(settings))


def _remove_and_record_layout(
    instance: dg.DagsterInstance, plan: IngestPlan, outcome: IngestOutcome, batch: str
) -> None:
    """Remove the data of partitions that left (then the partitions) and record layout errors."""
    from memcity_pipeline.defs.ingest import layout_run_config

    removed: dict[str, list[str]] = {}
    for part in plan.removed:
        removed.setdefault(PARTITIONS[part.scope], []).append(part.key)
    with dg.execute_job(
        dg.reconstructable(sync_landing_layout_job),
        instance=instance,
        run_config=layout_run_config(removed),
        tags={BATCH_TAG: batch},
    ) as result:
        outcome.layout_run_id = result.run_id
        if not result.success:
            failed = PartitionOutcome(PartitionRef("knowledge_base", ""))
            _outcome(result, failed)
            outcome.layout_failure = f"sync_landing_layout failed (run {result.run_id}): " + (
                failed.failure or "the run failed"
            )
            return
    for part in plan.removed:
        instance.delete_dynamic_partition(PARTITIONS[part.scope], part.key)


def run_ingest(
    settings: Settings,
    plan: IngestPlan,
    *,
    parallel: int = 2,
    executor: Executor = "in_process",
    max_concurrent: int = 2,
    on_step: StepCallback | None = None,
    on_wait: Callable[[str], None] | None = None,
    log_level: str = "WARNING",
    instance: dg.DagsterInstance | None = None,
) -> IngestOutcome:
    """Carry out `plan`: remove what left, then one run per partition, `parallel` runs at a time
    (each in a worker process). The jobs' executor runs each run's steps in the run's process
    (`in_process`, the quickest for a local command) or one process per step (`multiprocess`, at
    most `max_concurrent` at once, as runs that the daemon launches do). `instance`: the one the
    plan was made on (default: opened here)."""
    instance = instance or get_instance(settings)
    outcome = IngestOutcome(plan)
    batch = uuid.uuid4().hex[:12]
    if plan.removed or not layout_errors_current(settings.lake, plan.layout_problems):
        _remove_and_record_layout(instance, plan, outcome, batch)
    from memcity_pipeline.defs.ingest import execution_config

    run_config = {
        **execution_config(max_concurrent, in_process=executor == "in_process"),
        "loggers": {"console": {"config": {"log_level": log_level}}},
    }
    follower = None
    parts = {p.key: p for p in plan.runs}
    if on_step is not None:
        follower = RunFollower(
            {BATCH_TAG: batch},
            lambda key, step, event, detail: on_step(parts[key], step, event, detail),
        )
        follower.start()
    workers = max(1, min(parallel, len(plan.runs)))
    try:
        if workers == 1:  # one run at a time: in this thread, with no worker to start
            here = functools.partial(_execute_partition, instance=instance)
            outcome.partitions = [
                _run_partition(settings, here, part, batch, run_config, on_wait)
                for part in plan.runs
            ]
            return outcome
        # Worker processes (spawned: they see this environment), each running one partition at a
        # time; threads here hold each partition's lock while its run goes.
        with (
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool,
            ThreadPoolExecutor(workers) as waiters,
        ):

            def in_worker(*args: Any) -> PartitionOutcome:
                return pool.submit(_execute_partition, *args).result()

            futures = [
                waiters.submit(
                    _run_partition, settings, in_worker, part, batch, run_config, on_wait
                )
                for part in plan.runs
            ]
            outcome.partitions = [f.result() for f in futures]
    finally:
        if follower is not None:
            follower.stop.set()
            follower.join(timeout=10)
    return outcome


def ingest(
    settings: Settings,
    *,
    orgs: Iterable[str] = (),
    kbs: Iterable[str] = (),
    users: Iterable[str] = (),
    everything: bool = False,
    parallel: int = 2,
    executor: Executor = "in_process",
    on_step: StepCallback | None = None,
) -> IngestOutcome:
    """Plan and run ingestion (what `memcity ingest` does, without the printing)."""
    instance = get_instance(settings)
    plan = plan_ingest(settings, instance, orgs=orgs, kbs=kbs, users=users, everything=everything)
    return run_ingest(
        settings, plan, parallel=parallel, executor=executor, on_step=on_step, instance=instance
    )
