"""Progress reports: how often they come, the estimate of the time left, and reading them back."""

import threading

import pytest

from memcity_pipeline.progress import (
    ProgressLine,
    ProgressLog,
    format_duration,
    parse_duration,
    parse_progress,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_reports_at_most_every_few_seconds_and_always_at_the_end() -> None:
    clock, lines = Clock(), []
    log = ProgressLog("enriched_chunks acme/docs", "chunks", lines.append, every_s=5, clock=clock)
    log.advance(3)  # before begin: nothing to report
    log.begin(10)
    clock.now += 2
    log.advance(2)  # 2 s after the start: too soon
    assert lines == []
    clock.now += 4
    log.advance(2)  # 6 s: a report, 4 done in 6 s, so 6 more take about 9 s
    assert lines == ["enriched_chunks acme/docs: 4/10 chunks, 6s elapsed, about 9s left"]
    clock.now += 1
    log.advance(1)
    assert len(lines) == 1
    clock.now += 60
    log.advance(99)  # done (capped at the total): reported whatever the time
    assert lines[-1] == "enriched_chunks acme/docs: 10/10 chunks, 1m07s elapsed"
    assert len(lines) == 2


def test_nothing_to_do_reports_nothing() -> None:
    lines: list[str] = []
    log = ProgressLog("chunk_embeddings acme/docs", "chunks", lines.append)
    log.begin(0)
    log.advance()
    assert lines == []


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (7.4, "7s"), (130, "2m10s"), (3725, "1h02m")]
)
def test_durations(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    # Over an hour the seconds are left out.
    expected = round(seconds) // 60 * 60 if seconds >= 3600 else round(seconds)
    assert parse_duration(text) == expected


def test_a_report_reads_back_and_other_messages_do_not() -> None:
    line = ProgressLine("document_structure acme/docs", 3, 22, "documents", 65, 130)
    assert parse_progress(str(line)) == line
    assert line.counts == "3/22 documents, about 2m10s left"
    done = ProgressLine("memory_index acme/ann", 5, 5, "memories", 3, None)
    assert parse_progress(str(done)) == done
    assert done.counts == "5/5 memories in 3s"
    for other in ("", "document_structure: acme/docs: 3 processed, 0 reused", "3/22 documents"):
        assert parse_progress(other) is None


def test_counts_from_many_threads_add_up() -> None:
    lines: list[str] = []
    log = ProgressLog("s acme/x", "items", lines.append, every_s=3600)
    log.begin(4000)
    threads = [
        threading.Thread(target=lambda: [log.advance() for _ in range(1000)]) for _ in "abcd"
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.done == 4000
    assert lines and lines[-1].startswith("s acme/x: 4000/4000 items")
