"""The LLM answer cache in Postgres: shared by every client using the database, and a database
that is down costs answers, never a call."""

import uuid

import psycopg
import pytest

from memcity_pipeline.llm.cache import CachedAnswer
from memcity_pipeline.llm.cache_postgres import PostgresLLMCache
from memcity_pipeline.llm.client import LLMClient
from memcity_pipeline.postgres import Deadlines
from memcity_pipeline.settings import SettingsError, build_resources, load_settings
from tests.conftest import POSTGRES_TEST_URL
from tests.scripted_llm_server import ScriptedLLMServer
from tests.unanswering_server import UnansweringServer


def _client(server: ScriptedLLMServer, url: str) -> LLMClient:
    return LLMClient(
        base_url=server.base_url,
        api_key="k",
        model="scripted-model",
        cache_dir=None,
        cache_url=url,
        max_retries=0,
    )


@pytest.mark.postgres
def test_two_clients_share_answers_through_postgres(scripted_llm: ScriptedLLMServer) -> None:
    scripted_llm.responder = lambda request: "the answer"
    question = [{"role": "user", "content": f"question {uuid.uuid4().hex}"}]
    first, second = (
        _client(scripted_llm, POSTGRES_TEST_URL),
        _client(scripted_llm, POSTGRES_TEST_URL),
    )
    try:
        assert first.complete(question).text == "the answer"
        calls = scripted_llm.call_count
        again = second.complete(question)  # another client (another pod): answered by the cache
        assert again.text == "the answer" and again.cached
        assert scripted_llm.call_count == calls
    finally:
        first.close()
        second.close()
    with psycopg.connect(POSTGRES_TEST_URL) as conn:
        (rows,) = conn.execute(
            "SELECT count(*) FROM llm_cache WHERE text = 'the answer'"
        ).fetchone()
    assert rows >= 1


@pytest.mark.postgres
def test_a_database_that_is_down_is_a_miss_not_an_error(scripted_llm: ScriptedLLMServer) -> None:
    cache = PostgresLLMCache("postgresql://postgres@127.0.0.1:9/none")
    assert cache.get("k") is None
    cache.put("k", CachedAnswer("m", "t", 1, 1, None))  # logged, not raised
    scripted_llm.responder = lambda request: "still answered"
    client = _client(scripted_llm, "postgresql://postgres@127.0.0.1:9/none")
    try:
        assert client.complete([{"role": "user", "content": "hi"}]).text == "still answered"
    finally:
        client.close()


@pytest.mark.postgres
def test_a_database_that_never_answers_costs_one_deadline_then_the_cache_rests() -> None:
    """A server that lets the cache log in and then never answers: its first statement ends at
    the client-side deadline, and while the cache rests every read is a miss and every write
    skipped, without trying Postgres again."""
    deadlines = Deadlines(connect_s=2, statement_s=1, lock_s=1, total_s=2)
    with UnansweringServer(postgres_login=True) as server:
        cache = PostgresLLMCache(server.url, deadlines=deadlines, rest_s=600)
        tried = server.connections
        assert tried == 1  # creating the table: no answer
        assert cache.get("k") is None  # resting: a miss at once, without a connection
        cache.put("k", CachedAnswer("m", "t", 1, 1, None))
        assert server.connections == tried
    cache = PostgresLLMCache(POSTGRES_TEST_URL, deadlines=deadlines, rest_s=0)
    key = f"k-{uuid.uuid4().hex}"
    cache.put(key, CachedAnswer("m", "t", 1, 1, None))
    assert cache.get(key) == CachedAnswer("m", "t", 1, 1, None)
    cache.close()


def test_the_setting_needs_a_postgres_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMCITY_LLM_CACHE", "postgres")
    with pytest.raises(
        SettingsError, match="MEMCITY_LLM_CACHE=postgres needs MEMCITY_POSTGRES_URL"
    ):
        load_settings()
    monkeypatch.setenv("MEMCITY_POSTGRES_URL", POSTGRES_TEST_URL)
    llm = build_resources(load_settings())["llm"]
    assert llm.cache_url is not None and llm.cache_url.env_var_name == "MEMCITY_POSTGRES_URL"
