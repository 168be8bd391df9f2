"""The LLM layer against a real HTTP server (scripted) with the real openai client, and one
structured call against the real embedded SmolLM2 server."""

import json
import logging
import multiprocessing
import threading
from email.utils import formatdate
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pydantic import BaseModel

from memcity_pipeline.llm import providers
from memcity_pipeline.llm.cache import CACHE_FILE, CachedAnswer, LLMCache
from memcity_pipeline.llm.client import (
    LLMClient,
    LLMError,
    LLMResult,
    StructuredOutputError,
    parse_retry_after,
)
from memcity_pipeline.llm.local_server import LocalLLMServer, child_environment, smollm2_model_path
from memcity_pipeline.llm.usage import Usage
from memcity_pipeline.resources.llm import LLMResource
from memcity_pipeline.settings import build_resources, get_settings
from tests.scripted_llm_server import Fault, ScriptedLLMServer

QUESTION = [{"role": "user", "content": "Name a city."}]


class City(BaseModel):
    name: str
    country: str


def make_client(server: ScriptedLLMServer, cache_dir: Path | None, **kwargs: Any) -> LLMClient:
    """A client of the scripted server with fast backoff (tests do not wait for jitter)."""
    options: dict[str, Any] = {
        "base_url": server.base_url,
        "api_key": "test-key",
        "model": "scripted-model",
        "cache_dir": cache_dir,
        "timeout_s": 5.0,
        "max_retries": 4,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        **kwargs,
    }
    return LLMClient(**options)


@pytest.fixture
def client(scripted_llm: ScriptedLLMServer, tmp_path: Path) -> Any:
    with make_client(scripted_llm, tmp_path / "cache") as c:
        yield c


# -- plain and structured completions -------------------------------------------------------


def test_plain_completion(scripted_llm: ScriptedLLMServer, client: LLMClient) -> None:
    scripted_llm.push("Lisbon")
    result = client.complete(QUESTION, max_tokens=20)
    assert isinstance(result, LLMResult)
    assert (result.text, result.parsed, result.cached) == ("Lisbon", None, False)
    assert result.attempts == 1
    assert result.model == "scripted-model"
    assert (result.prompt_tokens, result.completion_tokens) == (3, 1)
    sent = scripted_llm.chat_requests[0]
    assert sent.body["messages"] == QUESTION
    assert sent.body["max_tokens"] == 20 and sent.body["temperature"] == 0.0
    assert sent.headers["authorization"] == "Bearer test-key"
    assert "response_format" not in sent.body


def test_structured_output_valid(scripted_llm: ScriptedLLMServer, client: LLMClient) -> None:
    scripted_llm.push('{"name": "Porto", "country": "Portugal"}')
    result = client.complete(QUESTION, schema=City)
    assert result.parsed == City(name="Porto", country="Portugal")
    fmt = scripted_llm.chat_requests[0].body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["name"] == "City" and fmt["json_schema"]["strict"] is False
    assert fmt["json_schema"]["schema"]["required"] == ["name", "country"]


@pytest.mark.parametrize("mode", ["json_object_schema", "json_object"])
def test_structured_modes_send_their_format(
    scripted_llm: ScriptedLLMServer, tmp_path: Path, mode: str
) -> None:
    scripted_llm.push('```json\n{"name": "Faro", "country": "Portugal"}\n```')
    with make_client(scripted_llm, None, structured_mode=mode) as c:
        result = c.complete(
            [{"role": "system", "content": "You are terse."}, *QUESTION], schema=City
        )
    assert result.parsed == City(name="Faro", country="Portugal")  # fences accepted
    body = scripted_llm.chat_requests[0].body
    system = body["messages"][0]["content"]
    if mode == "json_object_schema":
        assert body["response_format"] == {
            "type": "json_object",
            "schema": City.model_json_schema(),
        }
        assert system == "You are terse."
    else:
        assert body["response_format"] == {"type": "json_object"}
        assert system.startswith("You are terse.") and '"country"' in system


def test_invalid_json_is_repaired_once(scripted_llm: ScriptedLLMServer, client: LLMClient) -> None:
    scripted_llm.push('{"name": "Braga"}', '{"name": "Braga", "country": "Portugal"}')
    result = client.complete(QUESTION, schema=City)
    assert result.parsed == City(name="Braga", country="Portugal")
    assert result.attempts == 2 and scripted_llm.call_count == 2
    repair = scripted_llm.chat_requests[1].body["messages"]
    assert repair[:-2] == QUESTION
    assert repair[-2] == {"role": "assistant", "content": '{"name": "Braga"}'}
    assert "country" in repair[-1]["content"] and "JSON" in repair[-1]["content"]
    assert client.stats.snapshot()["repairs"] == 1
    # tokens of both requests are counted in the one result
    assert result.completion_tokens == 2 + 4


def test_invalid_twice_raises_and_is_not_cached(
    scripted_llm: ScriptedLLMServer, client: LLMClient
) -> None:
    scripted_llm.push("no JSON here", '{"name": 3}')
    with pytest.raises(StructuredOutputError) as info:
        client.complete(QUESTION, schema=City)
    assert info.value.raw_text == '{"name": 3}'
    assert "City" in str(info.value)
    assert client.stats.snapshot()["failures"] == 1
    scripted_llm.push('{"name": "Evora", "country": "Portugal"}')
    assert client.complete(QUESTION, schema=City).parsed.name == "Evora"
    assert scripted_llm.call_count == 3


# -- retries and failures -------------------------------------------------------------------


def test_429_retry_after_is_honoured(scripted_llm: ScriptedLLMServer, client: LLMClient) -> None:
    scripted_llm.push(Fault(429, headers={"Retry-After": "1"}), "after the wait")
    result = client.complete(QUESTION)
    assert result.text == "after the wait" and result.attempts == 2
    first, second = scripted_llm.chat_requests
    assert first.reply_kind == "fault:429"
    # our backoff would be <= 0.05 s: only Retry-After explains a gap of a second
    assert second.t_received - first.t_done >= 1.0
    assert client.stats.snapshot()["retries"] == 1


def test_retry_after_parsing_and_cap(scripted_llm: ScriptedLLMServer, tmp_path: Path) -> None:
    now = 1_800_000_000.0
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    with make_client(scripted_llm, None, max_retry_after_s=2.0) as c:
        assert c._delay(1, 3600.0) == 2.0
        assert 0.0 <= c._delay(3, None) <= 0.04


def test_500_then_success(scripted_llm: ScriptedLLMServer, client: LLMClient) -> None:
    scripted_llm.push(Fault(500), "recovered")
    result = client.complete(QUESTION)
    assert (result.text, result.attempts) == ("recovered", 2)
    assert client.stats.snapshot()["retries"] == 1


def test_408_and_409_are_retried(scripted_llm: ScriptedLLMServer, client: LLMClient) -> None:
    scripted_llm.push(Fault(408), Fault(409), "third time lucky")
    result = client.complete(QUESTION)
    assert (result.text, result.attempts) == ("third time lucky", 3)
    kinds = [r.reply_kind for r in scripted_llm.chat_requests]
    assert kinds == ["fault:408", "fault:409", "content"]
    stats = client.stats.snapshot()
    assert (stats["retries"], stats["requests"], stats["failures"]) == (2, 3, 0)


def test_timeout_then_success(scripted_llm: ScriptedLLMServer, tmp_path: Path) -> None:
    scripted_llm.push(Fault(200, delay_s=10, content="too late"), "in time")
    with make_client(scripted_llm, None, timeout_s=0.5) as c:
        result = c.complete(QUESTION)
    assert (result.text, result.attempts) == ("in time", 2)
    assert [r.reply_kind for r in scripted_llm.chat_requests] == ["fault:200", "content"]


@pytest.mark.parametrize(
    "fault",
    [
        Fault(200, body="{not json", headers={"Content-Type": "application/json"}),
        Fault(200, truncate=True),
        Fault(200, body={"error": {"message": "upstream overloaded"}}),
        Fault(503),
    ],
    ids=["invalid-json-body", "truncated-body", "error-in-body", "503"],
)
def test_garbled_answers_are_retried(
    scripted_llm: ScriptedLLMServer, client: LLMClient, fault: Fault
) -> None:
    scripted_llm.push(fault, "fine")
    assert client.complete(QUESTION).text == "fine"
    assert scripted_llm.call_count == 2


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_fail_at_once(
    scripted_llm: ScriptedLLMServer, client: LLMClient, status: int
) -> None:
    scripted_llm.push(Fault(status, body={"error": {"message": "model does not exist"}}))
    with pytest.raises(LLMError) as info:
        client.complete(QUESTION)
    assert info.value.status == status
    assert f"HTTP {status}" in str(info.value) and "model does not exist" in str(info.value)
    assert scripted_llm.call_count == 1
    assert client.stats.snapshot()["failures"] == 1


def test_retries_exhausted(scripted_llm: ScriptedLLMServer, tmp_path: Path) -> None:
    scripted_llm.responder = lambda request: Fault(502)
    with make_client(scripted_llm, None, max_retries=2) as c, pytest.raises(LLMError) as info:
        c.complete(QUESTION)
    assert "3 attempt" in str(info.value) and "HTTP 502" in str(info.value)
    assert scripted_llm.call_count == 3


def test_random_faults_are_survived(tmp_path: Path) -> None:
    with ScriptedLLMServer(fail_rate=0.3, seed=7) as server:
        server.responder = lambda request: request["messages"][-1]["content"].upper()
        with make_client(server, None, max_retries=8) as c:
            results = c.complete_many(
                [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(12)]
            )
        assert [r.text for r in results if isinstance(r, LLMResult)] == [f"Q{i}" for i in range(12)]
        assert server.call_count > 12  # some faults were injected and retried


# -- cache ----------------------------------------------------------------------------------


def test_cache_makes_zero_http_calls(scripted_llm: ScriptedLLMServer, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    scripted_llm.responder = lambda request: '{"name": "Coimbra", "country": "Portugal"}'
    with make_client(scripted_llm, cache_dir) as first:
        fresh = first.complete(QUESTION, schema=City)
        again = first.complete(QUESTION, schema=City)
        assert scripted_llm.call_count == 1
        assert (fresh.cached, again.cached, again.attempts) == (False, True, 0)
        assert again.parsed == fresh.parsed and again.prompt_tokens == fresh.prompt_tokens
        assert first.stats.snapshot()["cache_hits"] == 1
        first.complete(QUESTION, schema=City, temperature=0.7)  # other inputs: a miss
        assert scripted_llm.call_count == 2
    with make_client(scripted_llm, cache_dir, base_url=scripted_llm.base_url + "/") as second:
        result = second.complete(QUESTION, schema=City)
        assert result.cached and result.parsed.name == "Coimbra"
        assert scripted_llm.call_count == 2  # a new client on the same cache: no HTTP
        stats = second.stats.snapshot()
        assert (stats["calls"], stats["cache_hits"], stats["requests"]) == (1, 1, 0)
        assert stats["prompt_tokens"] == 0  # a hit is no new spend
        second.complete(QUESTION, schema=City, use_cache=False)
        assert scripted_llm.call_count == 3


def test_an_answer_the_caller_rejects_is_never_cached_nor_served(
    scripted_llm: ScriptedLLMServer, tmp_path: Path
) -> None:
    """A retry of a rejected answer asks the model again; an accepted one is cached; a cached
    answer the caller now refuses is not served."""
    cache_dir = tmp_path / "cache"
    answers = iter(
        ['{"name": "Lisbon", "country": "Spain"}', '{"name": "Coimbra", "country": "Portugal"}']
    )
    scripted_llm.responder = lambda request: next(answers)

    def right(result: Any) -> bool:
        return result.parsed.country == "Portugal"

    with make_client(scripted_llm, cache_dir) as c:
        wrong = c.complete(QUESTION, schema=City, accept=right)
        assert wrong.parsed.country == "Spain" and c.stats.snapshot()["rejected"] == 1
        retried = c.complete(QUESTION, schema=City, accept=right)  # not the cached "Spain"
        assert (retried.cached, retried.parsed.name, scripted_llm.call_count) == (
            False,
            "Coimbra",
            2,
        )
        assert c.complete(QUESTION, schema=City, accept=right).cached  # accepted: cached
        scripted_llm.responder = lambda request: '{"name": "Faro", "country": "Portugal"}'
        refused = c.complete(QUESTION, schema=City, accept=lambda r: r.parsed.name != "Coimbra")
        assert (refused.cached, refused.parsed.name, scripted_llm.call_count) == (False, "Faro", 3)


def test_corrupt_cache_is_recreated(
    scripted_llm: ScriptedLLMServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / CACHE_FILE).write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.WARNING), make_client(scripted_llm, cache_dir) as c:
        c.complete(QUESTION)
        assert c.complete(QUESTION).cached
    assert scripted_llm.call_count == 1
    assert "unusable" in caplog.text
    assert list(cache_dir.glob(f"{CACHE_FILE}.corrupt-*"))


def _fill_cache(cache_dir: str, prefix: str) -> None:
    """Write 100 answers from another process."""
    cache = LLMCache(Path(cache_dir))
    for i in range(100):
        cache.put(f"{prefix}{i}", CachedAnswer("m", f"{prefix} answer {i}", 1, 1, None))
    cache.close()


def test_cache_is_shared_safely_by_processes(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_fill_cache, args=(str(tmp_path), prefix)) for prefix in "ab"]
    for w in writers:
        w.start()
    _fill_cache(str(tmp_path), "c")
    for w in writers:
        w.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    cache = LLMCache(tmp_path)
    assert len(cache) == 300
    assert cache.get("b42") == CachedAnswer("m", "b answer 42", 1, 1, None)


# -- concurrency and accounting -------------------------------------------------------------


def test_concurrency_bound_is_never_exceeded(
    scripted_llm: ScriptedLLMServer, tmp_path: Path
) -> None:
    scripted_llm.responder = lambda request: Fault(200, delay_s=0.15, content="slow")
    with make_client(scripted_llm, None, max_concurrency=2) as c:
        # many threads calling complete() directly share the client's bound
        threads = [
            threading.Thread(target=c.complete, args=([{"role": "user", "content": f"t{i}"}],))
            for i in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = c.complete_many(
            [{"messages": [{"role": "user", "content": f"m{i}"}]} for i in range(6)]
        )
    assert all(isinstance(r, LLMResult) for r in results)
    assert scripted_llm.call_count == 12
    assert scripted_llm.max_in_flight == 2


def test_complete_many_keeps_order_and_errors_in_place(
    scripted_llm: ScriptedLLMServer, client: LLMClient
) -> None:
    def responder(request: dict[str, Any]) -> str | Fault:
        text = request["messages"][-1]["content"]
        return Fault(400) if text == "bad" else f"echo {text}"

    scripted_llm.responder = responder
    prompts = ["a", "b", "bad", "c"]
    results = client.complete_many(
        [{"messages": [{"role": "user", "content": p}]} for p in prompts], max_tokens=5
    )
    assert isinstance(results[2], LLMError)
    assert [r.text for r in results if isinstance(r, LLMResult)] == ["echo a", "echo b", "echo c"]
    assert all(r.body["max_tokens"] == 5 for r in scripted_llm.chat_requests)


def test_cost_none_when_not_reported(scripted_llm: ScriptedLLMServer, client: LLMClient) -> None:
    result = client.complete(QUESTION)
    assert result.cost_usd is None
    assert client.stats.snapshot()["cost_usd"] is None


def test_tokens_and_cost_are_summed(tmp_path: Path) -> None:
    with ScriptedLLMServer(cost=0.0025) as server:
        with make_client(server, tmp_path / "cache", extra_body={"usage": {"include": True}}) as c:
            results = [
                c.complete([{"role": "user", "content": f"question number {i}"}]) for i in range(3)
            ]
            c.complete([{"role": "user", "content": "question number 0"}])  # a cache hit
            stats = c.stats.snapshot()
        assert [r.cost_usd for r in results] == [0.0025] * 3
        assert stats["cost_usd"] == pytest.approx(0.0075)
        assert stats["prompt_tokens"] == 9 and stats["completion_tokens"] == 3
        assert (stats["calls"], stats["cache_hits"], stats["requests"]) == (4, 1, 3)
        assert server.chat_requests[0].body["usage"] == {"include": True}
        assert results[0].usage == Usage(3, 1, 0.0025, 1)
        spent = c.stats.usage()  # new spend: the cache hit adds nothing
        assert (spent.prompt_tokens, spent.completion_tokens, spent.calls) == (9, 3, 3)
        assert spent.cost_usd == pytest.approx(0.0075)


# -- the resource ---------------------------------------------------------------------------


def configured_llm() -> LLMResource:
    return build_resources(get_settings())["llm"]


def test_provider_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert configured_llm().provider == "local"
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-test")
    target = configured_llm().target()
    assert target.provider == "openrouter"
    assert target.base_url == "https://openrouter.ai/api/v1"
    assert target.model == "openai/gpt-4o-mini"
    assert target.extra_body == {"usage": {"include": True}}
    assert "sk-or-test" not in repr(target)
    monkeypatch.setenv("MEMCITY_LLM_BASE_URL", "http://127.0.0.1:9/v1/")
    target = configured_llm().target()
    assert (target.provider, target.base_url) == ("openai-compatible", "http://127.0.0.1:9/v1")
    assert (target.structured_mode, target.extra_body) == ("json_schema", {})
    explicit = LLMResource(base_url="https://openrouter.ai/api/v1", model="x/y").target()
    assert explicit.provider == "openrouter" and explicit.extra_body
    assert not providers.local_server_running()


def test_resource_secret_from_env_var(
    scripted_llm: ScriptedLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMCITY_LLM_API_KEY", "s3cret")
    resource = LLMResource(base_url=scripted_llm.base_url, api_key=dg.EnvVar("MEMCITY_LLM_API_KEY"))
    client = resource.get_client()
    try:
        assert client is resource.get_client()
        assert client.model == "scripted-model" == client.sub_model  # asked from /v1/models
        client.complete(QUESTION)
        assert scripted_llm.chat_requests[0].headers["authorization"] == "Bearer s3cret"
    finally:
        resource.close()


def test_resource_in_a_dagster_run(scripted_llm: ScriptedLLMServer, memcity_home: Path) -> None:
    resource = LLMResource(
        base_url=scripted_llm.base_url,
        model="m-root",
        sub_model="m-sub",
        cache_dir=str(memcity_home / "cache" / "llm"),
    )
    seen: dict[str, Any] = {}

    @dg.asset
    def answer(llm: LLMResource) -> dg.MaterializeResult:
        client = llm.get_client()
        seen["result"] = client.complete(QUESTION)
        seen["sub"] = client.complete(QUESTION, model=client.sub_model)
        return dg.MaterializeResult(metadata=client.stats.snapshot())

    assert dg.materialize([answer], resources={"llm": resource}).success
    assert [r.body["model"] for r in scripted_llm.chat_requests] == ["m-root", "m-sub"]
    assert resource._client is None  # torn down after the run
    assert (memcity_home / "cache" / "llm" / CACHE_FILE).exists()


def test_local_server_gets_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-secret")
    monkeypatch.setenv("MEMCITY_LLM_API_KEY", "sk-secret")
    env = child_environment()
    assert "sk-or-secret" not in env.values() and "sk-secret" not in env.values()
    assert smollm2_model_path().suffix == ".gguf"


@pytest.mark.local_model
def test_real_local_model_structured_call(local_llm_server: LocalLLMServer, tmp_path: Path) -> None:
    with LLMClient(
        base_url=local_llm_server.base_url,
        api_key=None,
        model=local_llm_server.model_name,
        structured_mode="json_object_schema",
        cache_dir=tmp_path / "cache",
        timeout_s=120,
    ) as c:
        result = c.complete(
            [
                {"role": "system", "content": "You answer with JSON."},
                {"role": "user", "content": "Name one city and the country it is in."},
            ],
            schema=City,
            max_tokens=60,
        )
        assert isinstance(result.parsed, City)
        assert result.parsed.name and result.parsed.country
        assert result.prompt_tokens > 0 and result.completion_tokens > 0
        assert json.loads(result.text)["name"] == result.parsed.name
        assert c.complete(
            [
                {"role": "system", "content": "You answer with JSON."},
                {"role": "user", "content": "Name one city and the country it is in."},
            ],
            schema=City,
            max_tokens=60,
        ).cached


def test_structured_output_accepts_raw_newlines_inside_strings() -> None:
    from pydantic import BaseModel

    from memcity_pipeline.llm.client import parse_structured

    class Out(BaseModel):
        summary: str

    parsed = parse_structured('{"summary": "line one\nline two"}', Out)
    assert isinstance(parsed, Out) and parsed.summary == "line one\nline two"
