"""Traces of RLM queries: the spans a scripted query makes (read with an in-memory exporter on a
test tracer provider), and what `setup_tracing` installs with and without an OTLP endpoint (in a
fresh interpreter each, since a process sets its tracer provider once).

The query reuses `test_search`'s lake (an indexed knowledge base), a real local sandbox and the
scripted LLM; its code searches and makes a sub-call, so every kind of span appears.
"""

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from memcity_pipeline.resources.sandbox import LocalSandboxResource
from memcity_pipeline.rlm.tracing import TRACER_NAME
from tests.rlm import test_search
from tests.rlm.test_rlm import SUB, Script, repl
from tests.scripted_llm_server import ScriptedLLMServer

ROOT_DIR = Path(__file__).resolve().parents[2]
COST = 0.001  # per LLM call, as the scripted provider reports it

# test_search's lake, embeddings endpoint, settings and sandbox
embeddings_server = test_search.embeddings_server
search_lake = test_search.search_lake
settings_env = test_search.settings_env
sandbox = test_search.sandbox


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """An in-memory exporter on the process's tracer provider (a test one, set here once)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


@pytest.mark.bwrap
@pytest.mark.skipif(not Path(test_search.BWRAP).exists(), reason="bubblewrap is not installed")
def test_a_query_is_traced_with_nested_spans_tokens_and_cost(
    spans: InMemorySpanExporter,
    scripted_llm: ScriptedLLMServer,
    sandbox: LocalSandboxResource,
    settings_env: Path,
) -> None:
    script = Script(
        repl(
            "hits = search('lighthouse vault code', k=3)\n"
            "answer = llm_query('Repeat the code in: ' + hits[0]['text'])\n"
            "print(len(hits), answer)"
        ),
        repl("try:\n    search('vault', k=0)\nexcept RuntimeError:\n    pass\nFINAL(answer)"),
        sub=lambda prompt: "7741",
        cost=COST,
    )
    scripted_llm.responder = script
    spans.clear()
    result = test_search.query(scripted_llm, sandbox, "documents")
    assert result.status == "completed", result
    assert result.answer == "7741"

    finished = [
        s for s in spans.get_finished_spans() if s.instrumentation_scope.name == TRACER_NAME
    ]
    query = _one(finished, "rlm.query")
    iterations = sorted(
        (s for s in finished if s.name == "rlm.iteration"),
        key=lambda s: s.attributes["rlm.iteration"],
    )
    executions = [s for s in finished if s.name == "rlm.execute"]
    search, bad_search = sorted(
        (s for s in finished if s.name == "rlm.search"), key=lambda s: s.start_time
    )
    sub_call = _one(finished, "rlm.sub_call")
    assert len(finished) == 1 + 2 + 2 + 2 + 1, [s.name for s in finished]

    # One trace, nested: the query > its iterations > their executions > the search and the
    # sub-call of the first execution (answered on the sandbox session's threads).
    assert {s.context.trace_id for s in finished} == {query.context.trace_id}
    assert query.parent is None
    assert [s.attributes["rlm.iteration"] for s in iterations] == [1, 2]
    assert {_parent(s) for s in iterations} == {query.context.span_id}
    first_execution = next(s for s in executions if _parent(s) == iterations[0].context.span_id)
    assert {_parent(s) for s in executions} == {s.context.span_id for s in iterations}
    assert _parent(search) == first_execution.context.span_id
    assert _parent(sub_call) == first_execution.context.span_id
    assert _parent(bad_search) != first_execution.context.span_id
    assert _parent(bad_search) in {s.context.span_id for s in executions}

    # The query's figures are the result's.
    q = query.attributes
    assert q["rlm.session_id"] == result.session_id
    assert (q["rlm.org_id"], q["rlm.context_type"], q["rlm.status"]) == (
        test_search.ORG,
        "documents",
        "completed",
    )
    assert (q["rlm.iterations"], q["rlm.sub_calls"], q["rlm.search_calls"]) == (2, 1, 1)
    assert q["rlm.prompt_tokens"] == result.prompt_tokens > 0
    assert q["rlm.completion_tokens"] == result.completion_tokens > 0
    assert q["rlm.cost_usd"] == pytest.approx(result.cost) == pytest.approx(3 * COST)

    # Each iteration carries what was spent during it; together they are the query's spend.
    assert sum(s.attributes["rlm.prompt_tokens"] for s in iterations) == result.prompt_tokens
    assert sum(s.attributes["rlm.completion_tokens"] for s in iterations) == (
        result.completion_tokens
    )
    assert iterations[0].attributes["rlm.cost_usd"] == pytest.approx(2 * COST)  # root + sub
    assert iterations[1].attributes["rlm.cost_usd"] == pytest.approx(COST)

    # The sub-call: its model, tokens and cost; the LLM answered it (no cache here).
    s = sub_call.attributes
    assert s["rlm.model"] == SUB and s["rlm.cache_hit"] is False
    assert s["rlm.prompt_tokens"] > 0 and s["rlm.completion_tokens"] == 1
    assert s["rlm.cost_usd"] == pytest.approx(COST)

    # The search: sizes, never the query text nor the hits.
    assert dict(search.attributes) == {
        "rlm.search.scope": "documents",
        "rlm.search.k": 3,
        "rlm.query_chars": len("lighthouse vault code"),
        "rlm.search.hits": 3,
    }
    # A refused search: its kind of error, no message (it may name the scope).
    assert dict(bad_search.attributes) == {
        "rlm.search.scope": "documents",
        "rlm.search.k": 0,
        "rlm.query_chars": len("vault"),
        "rlm.error": "ToolError",
    }
    assert bad_search.status.status_code == trace.StatusCode.ERROR
    assert not bad_search.events
    first = first_execution.attributes
    assert (first["rlm.code_lines"], first["rlm.error"], first["rlm.sub_calls"]) == (3, False, 1)
    assert first["rlm.output_chars"] == len("3 7741\n")
    # No span carries the org's data or the question.
    values = json.dumps([dict(s.attributes) for s in finished])
    for secret in ("7741", "lighthouse", "What is the vault code?"):
        assert secret not in values


@pytest.mark.bwrap
@pytest.mark.skipif(not Path(test_search.BWRAP).exists(), reason="bubblewrap is not installed")
def test_a_child_rlm_is_traced_under_the_sub_call_it_answers(
    spans: InMemorySpanExporter,
    scripted_llm: ScriptedLLMServer,
    sandbox: LocalSandboxResource,
    settings_env: Path,
) -> None:
    scripted_llm.responder = Script(
        repl("a = llm_query('count: a b c')\nprint(a)"),
        repl("n = llm_query('how many words: ' + context)\nFINAL(n)"),  # the child RLM
        repl("FINAL(a)"),
        sub=lambda prompt: "3",
        cost=COST,
    )
    spans.clear()
    result = test_search.query(
        scripted_llm, sandbox, "custom", custom_context="x", rlm_config={"max_depth": 2}
    )
    assert result.status == "completed", result
    assert (result.answer, result.depth_reached, result.iterations) == ("3", 2, 3)

    finished = [
        s for s in spans.get_finished_spans() if s.instrumentation_scope.name == TRACER_NAME
    ]
    by_id = {s.context.span_id: s for s in finished}

    def chain(span: ReadableSpan) -> list[str]:
        """The span's name and its ancestors', innermost first, with the depth where set."""
        names = []
        node: ReadableSpan | None = span
        while node is not None:
            depth = node.attributes.get("rlm.depth")
            names.append(node.name if depth is None else f"{node.name}@{depth}")
            node = by_id.get(_parent(node)) if node.parent is not None else None
        return names

    plain = next(
        s for s in finished if s.name == "rlm.sub_call" and "rlm.child_rlm" not in s.attributes
    )
    assert chain(plain) == [
        "rlm.sub_call",
        "rlm.execute@1",
        "rlm.iteration@1",
        "rlm.sub_call",
        "rlm.execute@0",
        "rlm.iteration@0",
        "rlm.query",
    ]
    child = by_id[_parent(by_id[_parent(by_id[_parent(plain)])])]
    assert child.attributes["rlm.child_rlm"] is True
    # The child's call carries the child's spend: its root turn and its own sub-call.
    assert child.attributes["rlm.cost_usd"] == pytest.approx(2 * COST)
    assert _one(finished, "rlm.query").attributes["rlm.cost_usd"] == pytest.approx(4 * COST)


# -- setup_tracing, in a fresh interpreter ------------------------------------------------------

SETUP = """
import json, sys
from opentelemetry import trace
from memcity_pipeline.rlm.tracing import setup_tracing, tracer
if sys.argv[1] == "host-provider":
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())
installed = [setup_tracing(), setup_tracing()]
with tracer().start_as_current_span("rlm.query") as span:
    span.set_attribute("rlm.iterations", 1)
    recording = span.is_recording()
provider = trace.get_tracer_provider()
processor = getattr(provider, "_active_span_processor", None)
exporters = [
    type(getattr(p, "span_exporter", None) or getattr(p, "_batch_processor", None)).__name__
    for p in getattr(processor, "_span_processors", ())
]
if hasattr(provider, "force_flush"):
    provider.force_flush()
print(json.dumps({"installed": installed, "provider": type(provider).__name__,
                  "processors": len(exporters), "recording": recording}))
"""


def _setup_in_fresh_python(mode: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environment.update(env, PYTHONPATH=str(ROOT_DIR))
    done = subprocess.run(
        [sys.executable, "-c", SETUP, mode],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


class _Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, int]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.received.append((self.path, self.headers.get("content-type", ""), len(body)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, int]]]]:
    """An OTLP/HTTP endpoint on 127.0.0.1 that records what it receives."""
    received: list[tuple[str, str, int]] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_without_an_endpoint_no_exporter_is_installed_and_spans_are_no_ops() -> None:
    got = _setup_in_fresh_python("plain")
    assert got == {
        "installed": [False, False],
        "provider": "ProxyTracerProvider",
        "processors": 0,
        "recording": False,
    }


def test_with_an_endpoint_spans_are_exported_over_otlp_http(
    collector: tuple[str, list[tuple[str, str, int]]],
) -> None:
    url, received = collector
    got = _setup_in_fresh_python("plain", OTEL_EXPORTER_OTLP_ENDPOINT=url)
    assert got == {
        "installed": [True, True],
        "provider": "TracerProvider",
        "processors": 1,
        "recording": True,
    }
    assert [(path, kind) for path, kind, _ in received] == [
        ("/v1/traces", "application/x-protobuf")
    ]
    assert received[0][2] > 0


def test_a_tracer_provider_the_host_set_is_kept(
    collector: tuple[str, list[tuple[str, str, int]]],
) -> None:
    url, received = collector
    got = _setup_in_fresh_python("host-provider", OTEL_EXPORTER_OTLP_ENDPOINT=url)
    assert got == {
        "installed": [False, False],
        "provider": "TracerProvider",
        "processors": 0,
        "recording": True,
    }
    assert received == []
