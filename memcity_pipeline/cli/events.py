"""What runs say: following runs as they go (each run's step events and the progress lines its
steps log, `memcity_pipeline.progress`, read from the instance's event log with a cursor per run,
so a record is read once, however long the run, from a thread of the command), and a failed
step's or check's cause in one line."""

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import dagster as dg

from memcity_pipeline.progress import parse_progress

PARTITION_TAG = "dagster/partition"  # the tag Dagster gives a run of one partition

_STEP_EVENTS = {
    dg.DagsterEventType.STEP_START: "started",
    dg.DagsterEventType.STEP_SUCCESS: "finished",
    dg.DagsterEventType.STEP_FAILURE: "failed",
    dg.DagsterEventType.STEP_SKIPPED: "skipped",
}


# (partition key, step key, event, detail): event is started | finished | failed | skipped, or
# progress with the step's latest progress (`24/71 chunks, about 2m10s left`) as detail.
StepEvent = Callable[[str, str, str, str], None]


class RunFollower(threading.Thread):
    """Follows the runs carrying `tags` until stopped (`stop.set()`, then `join`), calling
    `on_step(partition key, step key, event, detail)` once per step event or progress line."""

    def __init__(self, tags: dict[str, str], on_step: StepEvent) -> None:
        super().__init__(daemon=True)
        self.tags, self.on_step = tags, on_step
        self.cursors: dict[str, str | None] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with dg.DagsterInstance.get() as instance:
            while True:
                finished = self.stop.wait(0.3)
                with contextlib.suppress(Exception):  # a run being created: next tick
                    self._poll(instance)
                if finished:
                    return

    def _poll(self, instance: dg.DagsterInstance) -> None:
        for run in instance.get_runs(dg.RunsFilter(tags=self.tags)):
            key = run.tags.get(PARTITION_TAG)
            if key is None:
                continue
            while True:
                conn = instance.get_records_for_run(
                    run.run_id, cursor=self.cursors.get(run.run_id), limit=500
                )
                for record in conn.records:
                    entry = record.event_log_entry
                    event = entry.dagster_event
                    if event is not None:
                        if event.step_key and event.event_type in _STEP_EVENTS:
                            self.on_step(key, event.step_key, _STEP_EVENTS[event.event_type], "")
                    elif entry.step_key and (line := parse_progress(entry.user_message)):
                        self.on_step(key, entry.step_key, "progress", line.counts)
                self.cursors[run.run_id] = conn.cursor
                if not conn.has_more:
                    break


def failed_check(evaluation: Any) -> str:
    """`check chunk_offsets_valid of chunks failed: 1 chunks with wrong offsets`."""
    asset = evaluation.asset_key.to_user_string()
    detail = f": {evaluation.description}" if evaluation.description else ""
    return f"check {evaluation.check_name} of {asset} failed{detail}"


def error_cause(err: Any) -> str:
    """One line naming the cause of a failed step or run: the first error of its chain that is
    not one of Dagster's wrappers (`DagsterExecutionStepExecutionError: Error occurred while
    executing op ...`), so an S3 error reads as the S3 error."""
    while (err.cls_name or "").startswith("Dagster") and (err.cause or err.context):
        err = err.cause or err.context
    text = " ".join((err.message or err.cls_name or "failed").split())
    qualified, colon, rest = text.partition(": ")
    if colon and err.cls_name and qualified.endswith(err.cls_name):  # `_internal.DeltaError`
        text = f"{err.cls_name}: {rest}"
    return text[:500]
