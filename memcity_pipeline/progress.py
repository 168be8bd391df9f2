"""Progress of long work: items done of a total, and an estimate of the time left.

A step that enriches or embeds tells a `ProgressLog` how many items it has to do (`begin`) and
how many are done (`advance`, from any thread). The log reports through its `emit` callback (in a
Dagster step: the run's log) at most every `every_s` seconds, and once when the work is done, as
one line:

    enriched_chunks brambleway/company_docs: 24/71 chunks, 1m05s elapsed, about 2m10s left

`parse_progress` reads such a line back: the `memcity` command follows a run's log and shows it as
a progress bar on a terminal, or as the same line otherwise. The estimate is the pace so far
applied to what is left; there is none before the first item is done, nor once all are.
"""

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_LINE = re.compile(
    r"^(?P<label>\S+(?: \S+)?): (?P<done>\d+)/(?P<total>\d+) (?P<unit>[a-z ]+), "
    r"(?P<elapsed>[0-9hms]+) elapsed(?:, about (?P<left>[0-9hms]+) left)?$"
)
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def format_duration(seconds: float) -> str:
    """`1h02m`, `2m10s` or `7s`."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def parse_duration(text: str) -> float:
    """The seconds of a `format_duration` text."""
    match = _DURATION.match(text)
    if not match or not text:
        raise ValueError(f"not a duration: {text!r}")
    hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
    return float(hours * 3600 + minutes * 60 + secs)


@dataclass(frozen=True)
class ProgressLine:
    """One report: `label` (`<step> <scope>`), `done` of `total` `unit`, the time so far and the
    estimated time left (None until an item is done)."""

    label: str
    done: int
    total: int
    unit: str
    elapsed_s: float
    left_s: float | None

    def __str__(self) -> str:
        left = f", about {format_duration(self.left_s)} left" if self.left_s is not None else ""
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit}, "
            f"{format_duration(self.elapsed_s)} elapsed{left}"
        )

    @property
    def counts(self) -> str:
        """`24/71 chunks, about 2m10s left` (`71/71 chunks in 3m15s` when done): the line
        without its label."""
        if self.done >= self.total:
            return f"{self.done}/{self.total} {self.unit} in {format_duration(self.elapsed_s)}"
        left = f", about {format_duration(self.left_s)} left" if self.left_s is not None else ""
        return f"{self.done}/{self.total} {self.unit}{left}"


def parse_progress(message: str) -> ProgressLine | None:
    """The report in a log message, or None when the message is not one."""
    match = _LINE.match(message.strip())
    if match is None:
        return None
    left = match["left"]
    return ProgressLine(
        label=match["label"],
        done=int(match["done"]),
        total=int(match["total"]),
        unit=match["unit"],
        elapsed_s=parse_duration(match["elapsed"]),
        left_s=parse_duration(left) if left else None,
    )


class ProgressLog:
    """Counts items done of a total and reports at most every `every_s` seconds, and at the end.

    Thread-safe. Until `begin` is called, or with a total of 0, it reports nothing.
    """

    def __init__(
        self,
        label: str,
        unit: str,
        emit: Callable[[str], None],
        *,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.unit, self.emit = label, unit, emit
        self.every_s, self.clock = every_s, clock
        self.total = self.done = 0
        self._started = self._last = 0.0
        self._lock = threading.Lock()

    def begin(self, total: int) -> None:
        """`total` items are to be done from now on."""
        with self._lock:
            self.total, self.done = total, 0
            self._started = self._last = self.clock()

    def advance(self, items: int = 1) -> None:
        """`items` more are done; reports when `every_s` has passed or the work is done."""
        with self._lock:
            if self.total <= 0:
                return
            self.done = min(self.total, self.done + items)
            now = self.clock()
            if self.done < self.total and now - self._last < self.every_s:
                return
            self._last = now
            line = self.line(now)
        self.emit(str(line))

    def line(self, now: float | None = None) -> ProgressLine:
        """The report as of `now` (default: the clock's time)."""
        elapsed = (self.clock() if now is None else now) - self._started
        left = None
        if 0 < self.done < self.total:
            left = elapsed / self.done * (self.total - self.done)
        return ProgressLine(self.label, self.done, self.total, self.unit, elapsed, left)


class NoProgress(ProgressLog):
    """A progress log that reports nothing (the default of the builders)."""

    def __init__(self) -> None:
        super().__init__("", "items", lambda _line: None)
