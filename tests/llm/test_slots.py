"""A client's concurrency slots, and a client over replicas of one model (the embedded model's
server processes): one call at a time per replica, calls spread over all of them."""

import os
import threading
import time
from pathlib import Path

import pytest

from memcity_pipeline.llm.slots import Slots
from tests.llm.test_client import make_client
from tests.scripted_llm_server import Fault, ScriptedLLMServer


def test_a_thread_gets_back_the_slot_it_used_last_when_free() -> None:
    slots = Slots([0, 1, 2])
    got: dict[str, list[int]] = {}

    def worker(name: str) -> None:
        for _ in range(5):
            slot = slots.acquire()
            assert slot is not None
            got.setdefault(name, []).append(slot)
            time.sleep(0.01)
            slots.release(slot)

    threads = [threading.Thread(target=worker, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(set(seq)) == 1 for seq in got.values()), got  # each kept its own slot
    assert got["a"][0] != got["b"][0]


def test_no_free_slot_in_time_is_none_and_a_double_release_is_an_error() -> None:
    slots = Slots([0])
    first = slots.acquire()
    assert first == 0
    started = time.monotonic()
    assert slots.acquire(timeout=0.05) is None
    assert time.monotonic() - started >= 0.05
    slots.release(0)
    with pytest.raises(ValueError, match="released twice"):
        slots.release(0)


def test_calls_spread_over_replicas_one_at_a_time_each(tmp_path: Path) -> None:
    with ScriptedLLMServer() as first, ScriptedLLMServer() as second:
        for server in (first, second):
            server.responder = lambda request: Fault(200, delay_s=0.1, content="ok")
        with make_client(first, None, max_concurrency=8, replica_urls=[second.base_url]) as c:
            assert c.max_concurrency == 2  # one call per replica, whatever was asked
            results = c.complete_many(
                [{"messages": [{"role": "user", "content": f"m{i}"}]} for i in range(8)]
            )
    assert [r.text for r in results] == ["ok"] * 8  # type: ignore[union-attr]
    assert first.max_in_flight == second.max_in_flight == 1
    assert first.call_count >= 2 and second.call_count >= 2
    assert first.call_count + second.call_count == 8


@pytest.mark.local_model
def test_the_embedded_model_runs_as_one_server_per_slot(tmp_path: Path) -> None:
    from memcity_pipeline.llm import providers
    from memcity_pipeline.resources.llm import LLMResource

    resource = LLMResource(local_servers=2, log_dir=str(tmp_path), context_window=2048)
    client = resource.get_client()
    try:
        assert client.max_concurrency == 2
        servers = list(providers._local_servers)
        assert len(servers) == 2 and all(s.running for s in servers)
        assert {s.n_threads for s in servers} == {max(1, (os.cpu_count() or 1) // 2)}
        assert (tmp_path / "llm.log").exists() and (tmp_path / "llm-2.log").exists()
        results = client.complete_many(
            [{"messages": [{"role": "user", "content": f"Say {w}."}]} for w in ("yes", "no")],
            max_tokens=8,
        )
        assert all(not isinstance(r, Exception) and r.completion_tokens > 0 for r in results)
    finally:
        resource.close()
    assert not providers.local_server_running()
    assert all(not s.running for s in servers)
