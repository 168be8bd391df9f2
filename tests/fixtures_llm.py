"""LLM fixtures: a scripted OpenAI-compatible server, and the real embedded SmolLM2 server."""

from collections.abc import Iterator

import pytest

from memcity_pipeline.llm.local_server import LocalLLMServer
from tests.scripted_llm_server import ScriptedLLMServer


@pytest.fixture
def scripted_llm() -> Iterator[ScriptedLLMServer]:
    """A running scripted server (answers "ok" until a test pushes replies or sets a responder)."""
    with ScriptedLLMServer() as server:
        yield server


@pytest.fixture(scope="session")
def local_llm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalLLMServer]:
    """The real SmolLM2-135M-Instruct server on loopback, once per session (tests: slow)."""
    log_path = tmp_path_factory.mktemp("local-llm") / "server.log"
    server = LocalLLMServer(n_ctx=4096, log_path=log_path)
    server.start(timeout_s=180)
    try:
        yield server
    finally:
        server.stop()
