"""Object storage has deadlines: an endpoint that accepts connections and never answers fails a
Delta write (delta-rs) and a plain object write (obstore) in bounded time, never hangs them."""

import time

import pytest

from memcity_pipeline.lake import location
from memcity_pipeline.lake.files import get_bytes, put_bytes
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.rlm.sessions import now_utc as _now
from memcity_pipeline.rlm.sessions import read_sessions, write_session_row
from tests.unanswering_server import UnansweringServer

DOES_NOT_HANG_S = 60  # generous: with the deadlines below a call ends after a few seconds


@pytest.fixture
def silent_s3(monkeypatch: pytest.MonkeyPatch) -> "UnansweringServer":
    """An S3 endpoint that never answers, with short deadlines so that the test is quick."""
    monkeypatch.setattr(location, "CONNECT_TIMEOUT_S", 1)
    monkeypatch.setattr(location, "REQUEST_TIMEOUT_S", 1)
    monkeypatch.setattr(location, "RETRY_TIMEOUT_S", 2)
    monkeypatch.setattr(location, "MAX_RETRIES", 1)
    with UnansweringServer() as server:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": server.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }.items():
            monkeypatch.setenv(name, value)
        yield server


def test_the_deadlines_are_in_the_options_of_every_remote_lake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    options = Lake.of("s3://bucket/lake").storage_options()
    assert options == {
        "AWS_REGION": "eu-west-1",
        "connect_timeout": "5s",
        "timeout": "30s",
        "max_retries": "10",
        "retry_timeout": "60s",
    }
    assert Lake.of("gs://bucket/lake").storage_options()["timeout"] == "30s"
    assert Lake.of("/tmp/lake").storage_options() == {}


@pytest.mark.parametrize("write", ["delta-rs", "obstore"])
def test_a_store_that_never_answers_fails_a_write_in_bounded_time(
    silent_s3: UnansweringServer, write: str
) -> None:
    lake = Lake.of("s3://bucket/lake")
    started = time.monotonic()
    with pytest.raises(Exception) as caught:
        if write == "delta-rs":
            write_session_row(lake, {"session_id": "s1", "org_id": "acme", "started_at": _now()})
        else:
            put_bytes(lake, "_state/marker", b"")
    elapsed = time.monotonic() - started
    assert silent_s3.connections >= 1, "the write never reached the endpoint"
    assert elapsed < DOES_NOT_HANG_S, f"{write} took {elapsed:.0f} s"
    assert "timed out" in str(caught.value).lower() or "timeout" in str(caught.value).lower(), (
        caught.value
    )


def test_the_same_options_work_against_a_store_that_answers(s3_lake: str) -> None:
    """delta-rs and obstore take the deadlines as they are given (moto's S3 server)."""
    write_session_row(s3_lake, {"session_id": "s1", "org_id": "acme", "started_at": _now()})
    put_bytes(s3_lake, "_state/marker", b"x")
    assert read_sessions(s3_lake)["session_id"].to_list() == ["s1"]
    assert get_bytes(s3_lake, "_state/marker") == b"x"
