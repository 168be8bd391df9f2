"""OpenTelemetry traces of RLM queries, exported over OTLP only when an endpoint is configured.

Contract:

- **Spans** (tracer `memcity_pipeline.rlm`), nested as they run: `rlm.query` (the whole query)
  > `rlm.iteration` (one root-LLM turn of an RLM; a child RLM's turns sit under the sub-call
  that started it) > `rlm.execute` (one code block in the sandbox) > `rlm.sub_call` (one
  `llm_query` prompt, or a child RLM) and `rlm.search` (one `search` call). Sub-calls and
  searches are answered on the sandbox session's own threads; the execution's context is handed
  to them explicitly, so they nest under their execution.
- **Attributes** carry counts, tokens and cost (`rlm.prompt_tokens`, `rlm.completion_tokens`,
  `rlm.cost_usd`), ids and models, never the org's data: no context, no prompt or answer text,
  no search query or hits (only their sizes: `rlm.query_chars`, `rlm.prompt_chars`,
  `rlm.code_lines`, `rlm.output_chars`). An attribute that is unknown (a cost the provider did
  not report) is left out, not set to 0.
- **Export:** `setup_tracing()` (called by every query; idempotent) installs an SDK
  `TracerProvider` with a batching OTLP/HTTP exporter when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the exporter reads the standard `OTEL_*`
  variables itself (headers, timeout, `OTEL_SERVICE_NAME`, default `memcity-pipeline`). Without
  an endpoint nothing is installed: spans are no-ops, nothing is exported, no connection is
  made. A tracer provider the host application set already is kept (its spans get ours).
- **Never an error:** a tracing failure (setup, an attribute) is logged and the query goes on.
"""

import logging
import os
import threading
from typing import Any

from opentelemetry import trace

log = logging.getLogger(__name__)

TRACER_NAME = "memcity_pipeline.rlm"
SERVICE_NAME = "memcity-pipeline"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

_setup_lock = threading.Lock()
_setup_done = False
_installed = False


def tracer() -> trace.Tracer:
    """The tracer of the RLM spans (a no-op one while no provider is set)."""
    return trace.get_tracer(TRACER_NAME)


def endpoint_configured() -> bool:
    """Whether an OTLP endpoint is set in the environment."""
    return any(os.environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def setup_tracing() -> bool:
    """Install the OTLP exporter once, when an endpoint is configured and no provider is set.

    Returns whether this process exports through the exporter installed here. Never raises.
    """
    global _setup_done, _installed
    with _setup_lock:
        if _setup_done:
            return _installed
        _setup_done = True
        if not endpoint_configured():
            return False
        if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            log.info("tracing: a tracer provider is already set; the RLM spans go to it")
            return False
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            service = os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME
            provider = TracerProvider(resource=Resource.create({"service.name": service}))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            trace.set_tracer_provider(provider)
        except Exception as exc:  # tracing must never fail a query
            log.warning("tracing: the OTLP exporter could not be set up: %s", exc)
            return False
        _installed = True
        log.info("tracing: RLM spans are exported over OTLP")
        return True


def set_attributes(span: trace.Span, attributes: dict[str, Any]) -> None:
    """Set the attributes that are known (None is left out); never raises."""
    try:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
    except Exception as exc:  # tracing must never fail a query
        log.debug("tracing: attributes not set: %s", exc)
