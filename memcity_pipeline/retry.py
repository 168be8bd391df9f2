"""One retry policy for calls to remote services (LLM chat, embeddings, Daytona), on tenacity.

A leaf module: it imports only tenacity and the standard library, so every package (the sandbox
one included) can use it.

What is retried (`classify_failure`):

- a `Transient` exception, which a caller raises for a failure it has classified itself
  (for example a response body without an answer), with the Retry-After it read, if any;
- an exception that carries an HTTP status (`status_code`, or `response.status_code`) of
  408, 409, 429 or 5xx; its Retry-After header (`response.headers` or `headers`), when present,
  is honoured;
- timeouts and lost connections: `TimeoutError`, `ConnectionError`, and the transport errors of
  openai, httpx and the Daytona SDK (recognised by class name, so this module needs none of them).

Everything else is not retried: another 4xx, a client-side error, a bug. It propagates from
`retry_call` at once, unchanged.

How (`RetryPolicy`, `retry_call`): at most `attempts` attempts; before each retry a wait of
exponential backoff with full jitter (uniform in 0 .. `base_delay_s * 2**(n-1)`, at most
`max_delay_s`), or the server's Retry-After instead when it sent one (at most
`max_retry_after_s`); one warning logged per retry. When the attempts run out, the last failure
is raised inside `RetriesExhausted`, which says how many attempts were made; on success
`retry_call` returns the value with the number of attempts it took (`Attempted`).
"""

import email.utils
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.wait import wait_base

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_STATUSES = frozenset({408, 409, 429})
"""The 4xx statuses worth retrying (timeout, conflict, rate limit); every 5xx is too."""

# Transport errors of libraries this module does not import, by class name (any base counts):
# openai (APITimeoutError is an APIConnectionError), httpx, and the Daytona SDK (whose
# DaytonaConnectionTimeoutError is a DaytonaConnectionError).
_TRANSPORT_ERRORS = frozenset(
    {
        "APIConnectionError",
        "TimeoutException",
        "NetworkError",
        "RemoteProtocolError",
        "DaytonaConnectionError",
    }
)


def is_transient_status(status: int) -> bool:
    """Whether an HTTP status is worth retrying: 408, 409, 429 or 5xx."""
    return status in TRANSIENT_STATUSES or status >= 500


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Transient(Exception):
    """A failure worth retrying, as classified by the caller; `retry_after_s` is the wait the
    server asked for (None: use the backoff)."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Retryable:
    """The verdict on a failure worth retrying: why, and the server's Retry-After if any."""

    reason: str
    retry_after_s: float | None = None


Classifier = Callable[[BaseException], Retryable | None]


def _attribute(obj: Any, name: str) -> Any:
    """`obj.name`, or None (some exception properties raise when unset)."""
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (`status_code` or `response.status_code`), or None."""
    status = _attribute(exc, "status_code")
    if status is None:
        status = _attribute(_attribute(exc, "response"), "status_code")
    return status if isinstance(status, int) and not isinstance(status, bool) else None


def retry_after_of(exc: BaseException) -> float | None:
    """The Retry-After of the response an exception carries, in seconds, or None."""
    for headers in (_attribute(_attribute(exc, "response"), "headers"), _attribute(exc, "headers")):
        if not isinstance(headers, Mapping):
            continue
        for name, value in headers.items():
            if isinstance(name, str) and name.lower() == "retry-after":
                return parse_retry_after(str(value))
    return None


def classify_failure(exc: BaseException) -> Retryable | None:
    """A `Retryable` when `exc` is worth retrying (see the module docstring), else None."""
    if isinstance(exc, Transient):
        return Retryable(str(exc), exc.retry_after_s)
    status = status_of(exc)
    if status is not None:
        if is_transient_status(status):
            return Retryable(f"HTTP {status}", retry_after_of(exc))
        return None
    if isinstance(exc, TimeoutError):
        return Retryable("timed out")
    if isinstance(exc, ConnectionError):
        return Retryable("connection error")
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _TRANSPORT_ERRORS:
        return Retryable(f"transport error ({type(exc).__name__})")
    return None


class wait_retry_after(wait_base):
    """A tenacity wait: the failure's Retry-After (at most `cap_s`) when it has one, else
    `fallback`."""

    def __init__(self, fallback: wait_base, cap_s: float, classify: Classifier) -> None:
        self.fallback = fallback
        self.cap_s = cap_s
        self.classify = classify

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        failure = outcome.exception() if outcome is not None and outcome.failed else None
        verdict = self.classify(failure) if failure is not None else None
        if verdict is not None and verdict.retry_after_s is not None:
            return float(min(max(0.0, verdict.retry_after_s), self.cap_s))
        return float(self.fallback(retry_state))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a transient failure.

    `attempts` counts every try (1 means no retry); the backoff before retry `n` is uniform in
    0 .. `base_delay_s * 2**(n-1)`, at most `max_delay_s`; a Retry-After replaces it, at most
    `max_retry_after_s`.
    """

    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"a retry policy needs at least 1 attempt, not {self.attempts}")

    @property
    def retries(self) -> int:
        """Retries after the first attempt."""
        return self.attempts - 1

    def backoff(self) -> wait_base:
        """The tenacity wait without Retry-After: exponential backoff with full jitter."""
        return wait_random_exponential(multiplier=self.base_delay_s, max=self.max_delay_s)

    def wait(self, classify: Classifier = classify_failure) -> wait_base:
        """The tenacity wait of this policy: Retry-After (capped) if any, else the backoff."""
        return wait_retry_after(self.backoff(), self.max_retry_after_s, classify)

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Seconds this policy waits after failed attempt number `attempt` (1-based), for a
        failure with the given Retry-After."""
        state = RetryCallState(Retrying(), None, (), {})
        state.attempt_number = attempt
        state.set_exception((Transient, Transient("", retry_after_s), None))
        return self.wait()(state)

    def retrying(
        self,
        *,
        what: str,
        classify: Classifier = classify_failure,
        on_retry: Callable[[BaseException], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> Retrying:
        """A tenacity `Retrying` under this policy; it logs each retry as `what` failing."""
        out = logger or log

        def before_sleep(state: RetryCallState) -> None:
            failure = state.outcome.exception() if state.outcome is not None else None
            sleep = state.next_action.sleep if state.next_action is not None else 0.0
            out.warning(
                "%s failed (%s); retry %d/%d in %.2fs",
                what,
                failure,
                state.attempt_number,
                self.retries,
                sleep,
            )
            if on_retry is not None and failure is not None:
                on_retry(failure)

        return Retrying(
            stop=stop_after_attempt(self.attempts),
            wait=self.wait(classify),
            retry=retry_if_exception(lambda exc: classify(exc) is not None),
            before_sleep=before_sleep,
        )


@dataclass(frozen=True)
class Attempted(Generic[T]):
    """What a call under a retry policy returned, and how many attempts it took."""

    value: T
    attempts: int


class RetriesExhausted(Exception):
    """A transient failure that lasted through every attempt; `last` is the final failure
    (also this exception's `__cause__`)."""

    def __init__(self, what: str, attempts: int, last: BaseException) -> None:
        super().__init__(f"{what} failed after {attempts} attempt(s): {last}")
        self.what = what
        self.attempts = attempts
        self.last = last


def retry_call(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    what: str,
    classify: Classifier = classify_failure,
    on_retry: Callable[[BaseException], None] | None = None,
    logger: logging.Logger | None = None,
) -> Attempted[T]:
    """Run `fn` under `policy`: retry what `classify` calls transient, log each retry (as `what`
    failing, on `logger`) and call `on_retry` with the failure before each wait.

    A failure that is not transient propagates at once, unchanged; one that outlasts the
    attempts raises `RetriesExhausted` from it.
    """
    retrying = policy.retrying(what=what, classify=classify, on_retry=on_retry, logger=logger)
    try:
        value = retrying(fn)
    except RetryError as exc:
        last = exc.last_attempt
        failure = last.exception()
        assert failure is not None
        raise RetriesExhausted(what, last.attempt_number, failure) from failure
    return Attempted(value, int(retrying.statistics.get("attempt_number", 1)))
