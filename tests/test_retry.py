"""The shared retry policy against a real HTTP server (the scripted OpenAI-compatible one),
called with httpx: what is retried, what is not, how long it waits, and how attempts count."""

import logging
import socket
import time
from typing import Any

import httpx
import pytest
from daytona import DaytonaError, DaytonaNotFoundError

from memcity_pipeline.retry import (
    Attempted,
    RetriesExhausted,
    RetryPolicy,
    Transient,
    classify_failure,
    is_transient_status,
    parse_retry_after,
    retry_call,
)
from tests.scripted_llm_server import Fault, ScriptedLLMServer

FAST = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.05)
QUESTION = {"model": "scripted-model", "messages": [{"role": "user", "content": "Name a city."}]}


def ask(server: ScriptedLLMServer, timeout_s: float = 5.0) -> Any:
    """One chat completion over HTTP; an error status raises httpx.HTTPStatusError."""
    response = httpx.post(f"{server.base_url}/chat/completions", json=QUESTION, timeout=timeout_s)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def gap_s(server: ScriptedLLMServer) -> float:
    """Seconds between the end of the first answer and the arrival of the second request."""
    first, second = server.chat_requests[:2]
    assert first.t_done is not None
    return second.t_received - first.t_done


@pytest.mark.parametrize("status", [408, 409, 429, 503])
def test_transient_statuses_are_retried(scripted_llm: ScriptedLLMServer, status: int) -> None:
    scripted_llm.push(Fault(status), "Lisbon")
    done = retry_call(lambda: ask(scripted_llm), FAST, what="asking")
    assert done == Attempted("Lisbon", 2)
    assert [r.reply_kind for r in scripted_llm.chat_requests] == [f"fault:{status}", "content"]


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_other_client_errors_fail_at_once(scripted_llm: ScriptedLLMServer, status: int) -> None:
    scripted_llm.push(Fault(status), "never asked for")
    with pytest.raises(httpx.HTTPStatusError) as info:
        retry_call(lambda: ask(scripted_llm), FAST, what="asking")
    assert info.value.response.status_code == status  # the failure itself, unchanged
    assert scripted_llm.call_count == 1


def test_retry_after_is_honoured(scripted_llm: ScriptedLLMServer) -> None:
    scripted_llm.push(Fault(429, headers={"Retry-After": "1"}), "after the wait")
    assert retry_call(lambda: ask(scripted_llm), FAST, what="asking").value == "after the wait"
    # the backoff alone would wait at most 0.05 s
    assert gap_s(scripted_llm) >= 1.0


def test_retry_after_is_capped(scripted_llm: ScriptedLLMServer) -> None:
    capped = RetryPolicy(attempts=2, base_delay_s=0.01, max_delay_s=0.05, max_retry_after_s=0.3)
    scripted_llm.push(Fault(503, headers={"Retry-After": "3600"}), "soon enough")
    assert retry_call(lambda: ask(scripted_llm), capped, what="asking").value == "soon enough"
    assert 0.3 <= gap_s(scripted_llm) < 5.0


def test_attempts_are_counted_until_they_run_out(
    scripted_llm: ScriptedLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    scripted_llm.responder = lambda request: Fault(502)
    retried: list[BaseException] = []
    with caplog.at_level(logging.WARNING), pytest.raises(RetriesExhausted) as info:
        retry_call(lambda: ask(scripted_llm), FAST, what="asking", on_retry=retried.append)
    assert info.value.attempts == 3 and scripted_llm.call_count == 3
    assert "asking failed after 3 attempt(s)" in str(info.value)
    last = info.value.last
    assert isinstance(last, httpx.HTTPStatusError) and last.response.status_code == 502
    assert info.value.__cause__ is last
    assert len(retried) == 2  # once per retry, not after the last attempt
    lines = [r.getMessage() for r in caplog.records if "asking failed" in r.getMessage()]
    assert len(lines) == 2 and "retry 1/2" in lines[0] and "retry 2/2" in lines[1]


def test_a_timeout_is_retried(scripted_llm: ScriptedLLMServer) -> None:
    scripted_llm.push(Fault(200, delay_s=3, content="too late"), "in time")
    done = retry_call(lambda: ask(scripted_llm, timeout_s=0.3), FAST, what="asking")
    assert done == Attempted("in time", 2)


def test_a_refused_connection_is_retried() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    calls: list[float] = []

    def connect() -> None:
        calls.append(time.monotonic())
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2.0)

    with pytest.raises(RetriesExhausted) as info:
        retry_call(connect, FAST, what="connecting")
    assert isinstance(info.value.last, httpx.ConnectError)
    assert info.value.attempts == len(calls) == 3


def test_a_callers_own_transient_carries_its_retry_after() -> None:
    attempts: list[float] = []

    def flaky() -> str:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise Transient("no answer in the body", retry_after_s=0.4)
        return "fine"

    assert retry_call(flaky, FAST, what="reading") == Attempted("fine", 2)
    assert attempts[1] - attempts[0] >= 0.4


def test_policy_delays() -> None:
    policy = RetryPolicy(attempts=5, base_delay_s=0.01, max_delay_s=0.05, max_retry_after_s=2.0)
    assert policy.delay(1, 3600.0) == 2.0
    assert policy.delay(1, 0.5) == 0.5
    for attempt in range(1, 6):
        assert 0.0 <= policy.delay(attempt) <= min(0.05, 0.01 * 2 ** (attempt - 1))
    assert RetryPolicy(attempts=1).retries == 0
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_classification() -> None:
    statuses = (400, 401, 403, 404, 408, 409, 422, 429, 500, 503)
    assert [s for s in statuses if is_transient_status(s)] == [408, 409, 429, 500, 503]
    assert classify_failure(ValueError("a bug")) is None
    assert classify_failure(TimeoutError()) is not None
    assert classify_failure(ConnectionResetError()) is not None
    # the Daytona SDK's errors carry a status and headers
    limited = classify_failure(DaytonaError("slow down", 429, {"Retry-After": "7"}))
    assert limited is not None and limited.retry_after_s == 7.0
    assert classify_failure(DaytonaNotFoundError("gone", 404)) is None
    conflict = classify_failure(DaytonaError("busy", 409))
    assert conflict is not None and conflict.retry_after_s is None


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 30) == 30.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
