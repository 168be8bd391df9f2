"""The RLM query (the spec's `rlmQuery`): `rlm_query(...) -> RLMResult` over a sandbox backend.

The caller resolves the LLM client and the sandbox backend (`memcity_pipeline.api.rlm_query`
does it from settings, the `rlm_query` job from its resources). A wrong request (missing
parameter, unknown org/user/knowledge base, bad config) raises :class:`RLMRequestError` before
any LLM call or sandbox. Everything after that ends in an `RLMResult` and one session row, never
an exception: a limit (iterations, budget, errors, timeout) gives the best answer so far with a
`warning` and status `partial` or `timeout`; a failure (the LLM or the sandbox unavailable) gives
status `failed` and an `error`.

The answer comes before the bookkeeping: a caller's `on_answer` receives the result as soon as
the answer is known (`memcity query` prints it then), and only then is the session recorded (the
trajectory uploaded, the row written to the lake and Postgres), within the deadlines of
`rlm.sessions` (a Postgres that does not answer leaves the row in the lake, marked pending).

Runtime ``bun`` runs the generated code as JavaScript (``repl_server.js`` under Bun or Node.js).
When that runtime fails (no interpreter, the server dies or breaks the protocol), the whole query
runs again on ``python`` if ``runtime_fallback_to_python`` (the default); the session row keeps
the requested runtime, the one used and the reason. Cost, tokens and the time limit cover both
attempts.

The sandboxed code's `search(query, k)` (a `documents` or `memories` context) is answered on the
host by `rlm.tools.SandboxTools`, over the query's own org and knowledge base or user, whatever
the code sends; the embedder comes from the caller (`embedder`), built on the first search.

Each query is traced (`rlm.tracing`): an `rlm.query` span over the run and the session row,
with the session id, org, context type, status and the figures of the result (iterations,
sub-calls, searches, tokens, cost) as attributes; the query text and context never are. Spans
are exported only when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`).

This module stays whole (about 500 lines) because it is one flow: a request, its attempts, and
the session row they end in.
"""

import itertools
import json
import logging
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import trace
from pydantic import BaseModel
from rlm.logger import RLMLogger
from rlm.utils.exceptions import (
    BudgetExceededError,
    CancellationError,
    ErrorThresholdExceededError,
    TimeoutExceededError,
    TokenLimitExceededError,
)

from memcity_pipeline.lake.files import put_bytes
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.lake.tables import trajectory_key
from memcity_pipeline.llm.client import LLMClient, LLMError, parse_structured
from memcity_pipeline.rlm.config import (
    AVAILABLE_RUNTIMES,
    MAX_PROMPT_CHARS,
    RLMConfig,
    RLMRequestError,
    RLMResult,
    Status,
    parse_config,
)
from memcity_pipeline.rlm.context import (
    MAX_CUSTOM_CHARS,
    ContextError,
    GatheredContext,
    gather_context,
)
from memcity_pipeline.rlm.engine import (
    PRELUDES,
    Deadline,
    ProgressFn,
    SandboxRLM,
    Spend,
    SubCallBroker,
)
from memcity_pipeline.rlm.prompts import describe_context, system_prompt
from memcity_pipeline.rlm.sessions import SessionStore, now_utc
from memcity_pipeline.rlm.tools import EmbedderSource, SandboxTools, SearchScope
from memcity_pipeline.rlm.tracing import set_attributes, setup_tracing, tracer
from memcity_pipeline.sandbox.base import (
    ExecResult,
    SandboxBackend,
    SandboxError,
    SandboxSession,
)

log = logging.getLogger(__name__)

AnswerFn = Callable[[RLMResult], None]
"""Receives a query's result once its answer is known, before the session is recorded (its
`logged_to_postgres` is still false then; the same object is completed and returned after)."""


class RuntimeFailure(Exception):
    """The REPL of a non-python runtime failed (no interpreter, died, broke the protocol)."""


class _FailFastSession(SandboxSession):
    """A session whose sandbox failures end the query (to retry it on python) instead of
    becoming error text for the root LLM."""

    def __init__(self, session: SandboxSession) -> None:
        self.session = session
        self.session_id = session.session_id
        self.org_id = session.org_id

    def load_context(self, context: str | list | dict) -> None:
        self.session.load_context(context)

    def execute(self, code: str, timeout_s: float | None = None) -> ExecResult:
        try:
            return self.session.execute(code, timeout_s)
        except SandboxError as exc:
            raise RuntimeFailure(str(exc)) from exc

    def get_variable(self, name: str) -> str:
        return self.session.get_variable(name)

    def close(self) -> None:
        self.session.close()


def _strip_code(text: str) -> str:
    """A root LLM reply without its code blocks (prose only), or the reply if that is empty."""
    prose = re.sub(r"```.*?```", "", text or "", flags=re.DOTALL).strip()
    return prose or (text or "").strip()


@dataclass(frozen=True)
class PreparedQuery:
    """A checked request with its context gathered: nothing has been started yet."""

    org_id: str
    query: str
    user_id: str | None
    knowledge_base_id: str | None
    config: RLMConfig
    context: GatheredContext
    lake: Lake


def prepare_query(
    org_id: str,
    query: str,
    context_type: str,
    *,
    user_id: str | None = None,
    knowledge_base_id: str | None = None,
    custom_context: str | list[Any] | None = None,
    rlm_config: RLMConfig | dict[str, Any] | None = None,
    lake_dir: Lake | str | Path,
    max_custom_chars: int = MAX_CUSTOM_CHARS,
) -> PreparedQuery:
    """Check a request and gather its context from the lake; RLMRequestError when it is wrong
    (so a wrong request costs no LLM, no sandbox and no model start). A query has at most
    `MAX_PROMPT_CHARS` characters, a custom context `max_custom_chars`."""
    cfg = parse_config(rlm_config)
    if not query or not query.strip():
        raise RLMRequestError("query is empty")
    if len(query) > MAX_PROMPT_CHARS:
        raise RLMRequestError(
            f"query is {len(query):,} characters, over the limit of {MAX_PROMPT_CHARS:,}"
        )
    lake = Lake.of(lake_dir)
    try:
        gathered = gather_context(
            lake,
            org_id,
            context_type,
            user_id=user_id,
            knowledge_base_id=knowledge_base_id,
            custom_context=custom_context,
            max_custom_chars=max_custom_chars,
        )
    except ContextError as exc:
        raise RLMRequestError(str(exc)) from exc
    return PreparedQuery(org_id, query, user_id, knowledge_base_id, cfg, gathered, lake)


def run_query(
    prepared: PreparedQuery,
    *,
    llm: LLMClient,
    sandbox: SandboxBackend,
    session_store: SessionStore | None = None,
    progress: ProgressFn | None = None,
    embedder: EmbedderSource | None = None,
    on_answer: AnswerFn | None = None,
) -> RLMResult:
    """Run a prepared query; always returns a result and records one session row in
    `session_store` (default: the lake only), after giving the result to `on_answer`.
    `embedder` builds the embedder of the lake's indexes for the sandbox's `search` (without
    it, `search` answers with an error)."""
    p = prepared
    run = _Run(p.org_id, p.query, p.user_id, p.knowledge_base_id, p.config, p.context, p.lake)
    run.embedder = embedder
    setup_tracing()
    with tracer().start_as_current_span("rlm.query") as span:
        set_attributes(
            span,
            {
                "rlm.session_id": run.session_id,
                "rlm.org_id": p.org_id,
                "rlm.context_type": p.context.context_type,
                "rlm.query_chars": len(p.query),
            },
        )
        try:
            run.execute(llm, sandbox, progress)
        except Exception as exc:  # whatever happened, the session is recorded
            log.exception("rlm session %s failed", run.session_id)
            run.fail(f"{type(exc).__name__}: {exc}")
        result = run.result()
        try:
            if on_answer is not None:
                on_answer(result)
        finally:  # recorded whatever the callback does
            run.record(result, session_store or SessionStore(p.lake))
        set_attributes(
            span,
            {
                "rlm.status": result.status,
                "rlm.iterations": result.iterations,
                "rlm.sub_calls": result.total_sub_calls,
                "rlm.search_calls": result.search_calls,
                "rlm.sub_call_cache_hits": result.sub_call_cache_hits,
                "rlm.depth_reached": result.depth_reached,
                "rlm.prompt_tokens": result.prompt_tokens,
                "rlm.completion_tokens": result.completion_tokens,
                "rlm.cost_usd": result.cost,
                "rlm.root_model": result.root_model,
                "rlm.sub_model": result.sub_model,
                "rlm.runtime": result.runtime_used,
            },
        )
        if result.status == "failed":
            span.set_status(trace.StatusCode.ERROR, "the query failed")  # its error: the row
        return result


def rlm_query(
    org_id: str,
    query: str,
    context_type: str,
    *,
    user_id: str | None = None,
    knowledge_base_id: str | None = None,
    custom_context: str | list[Any] | None = None,
    rlm_config: RLMConfig | dict[str, Any] | None = None,
    llm: LLMClient,
    sandbox: SandboxBackend,
    lake_dir: Lake | str | Path,
    session_store: SessionStore | None = None,
    progress: ProgressFn | None = None,
    embedder: EmbedderSource | None = None,
    on_answer: AnswerFn | None = None,
) -> RLMResult:
    """Answer `query` over the org's context (in the lake at `lake_dir`) with a Recursive
    Language Model whose REPL runs in sessions of `sandbox`: `prepare_query`, then `run_query`
    (`on_answer` gets the result before the session is recorded).

    `progress` receives events (`sandbox_opening`, `context_loaded`, `iteration_start`,
    `iteration_done`). The config's sandbox options are the caller's to apply to `sandbox`,
    except the execution timeout. Raises RLMRequestError for a wrong request; otherwise always
    returns.
    """
    prepared = prepare_query(
        org_id,
        query,
        context_type,
        user_id=user_id,
        knowledge_base_id=knowledge_base_id,
        custom_context=custom_context,
        rlm_config=rlm_config,
        lake_dir=lake_dir,
    )
    return run_query(
        prepared,
        llm=llm,
        sandbox=sandbox,
        session_store=session_store,
        progress=progress,
        embedder=embedder,
        on_answer=on_answer,
    )


class _Run:
    """One query from start to session row."""

    def __init__(
        self,
        org_id: str,
        query: str,
        user_id: str | None,
        knowledge_base_id: str | None,
        cfg: RLMConfig,
        gathered: GatheredContext,
        lake: Lake,
    ) -> None:
        self.session_id = uuid.uuid4().hex
        self.org_id = org_id
        self.query = query
        self.user_id = user_id
        self.knowledge_base_id = knowledge_base_id
        self.cfg = cfg
        self.gathered = gathered
        self.lake = lake
        self.started_at = now_utc()
        self.t0 = time.monotonic()
        self.deadline = Deadline(cfg.max_timeout)
        self.spend = Spend(max_budget=cfg.max_budget)
        self.answer = ""
        self.status: Status = "failed"
        self.warning: str | None = None
        self.error: str | None = None
        self.iterations = 0
        self.sub_calls = 0
        self.search_calls = 0
        self.depth_reached = 0
        self.embedder: EmbedderSource | None = None
        self.backend = "local"
        self.runtime_used: str | None = None
        self.fallback_reason: str | None = None
        self.root_model: str | None = cfg.model
        self.sub_model: str | None = cfg.sub_model
        self.trajectory: Path | None = None
        self.ended = self.started_at

    def fail(self, message: str) -> None:
        self.status = "failed"
        self.error = message

    def execute(
        self, client: LLMClient, sandbox: SandboxBackend, progress: ProgressFn | None
    ) -> None:
        if self.cfg.runtime not in AVAILABLE_RUNTIMES:
            self.fail(f"runtime {self.cfg.runtime!r} is not available")
            return
        self.backend = sandbox.name
        runtime = self.cfg.runtime
        if runtime != "python":
            try:
                self._loop(client, sandbox, progress, runtime)
                return
            except RuntimeFailure as exc:
                reason = f"runtime {runtime!r} failed: {exc}"
            if not self.cfg.runtime_fallback_to_python:
                self.fail(f"{reason} (runtime_fallback_to_python is false)")
                return
            log.warning("rlm session %s: %s; running it again on python", self.session_id, reason)
            self.fallback_reason = f"{reason}; ran on python"
            self.warning = self.fallback_reason
            self._reset_attempt()
        self._loop(client, sandbox, progress, "python")

    def _reset_attempt(self) -> None:
        """Forget the outcome of a failed attempt (spend and time keep counting)."""
        self.answer = ""
        self.status = "failed"
        self.error = None
        self.iterations = 0
        self.sub_calls = 0
        self.search_calls = 0
        self.depth_reached = 0

    def _loop(
        self,
        client: LLMClient,
        opener: SandboxBackend,
        progress: ProgressFn | None,
        runtime: str,
    ) -> None:
        """One attempt on `runtime`; RuntimeFailure when a non-python runtime fails."""
        cfg = self.cfg
        self.runtime_used = runtime
        fail_fast = runtime != "python"
        self.root_model = cfg.model or client.model
        self.sub_model = cfg.sub_model or cfg.model or client.sub_model
        self.trajectory = _trajectory_file(self.lake, self.session_id)
        logger = RLMLogger(log_dir=str(self.trajectory.parent))
        logger.log_file_path = str(self.trajectory)
        exec_timeout = cfg.sandbox_exec_timeout_s or float(opener.exec_timeout_s or 120.0)
        scope = SearchScope.of_query(
            self.lake,
            self.org_id,
            self.gathered.context_type,
            knowledge_base_id=self.knowledge_base_id,
            user_id=self.user_id,
        )
        tools = SandboxTools(scope, self.embedder)
        searchable = scope.kind if scope is not None and tools.has_search else None

        opened = itertools.count()

        def open_session(broker: SubCallBroker) -> SandboxSession:
            """The query's sandbox session; child RLMs (max_depth > 1) get one each."""
            n = next(opened)
            session = opener.open_session(
                self.org_id,
                broker,
                prelude=PRELUDES[runtime],
                session_id=self.session_id[:32] if n == 0 else f"{self.session_id[:24]}-c{n}",
                runtime=runtime,
                tool_handler=broker.tools(tools),
            )
            return _FailFastSession(session) if fail_fast else session

        meta = describe_context(
            self.gathered.context_type,
            self.gathered.payload,
            truncated=self.gathered.truncated,
            total=self.gathered.total_available,
            cap_note=self.gathered.cap_note,
            searchable=searchable is not None,
        )
        engine = SandboxRLM(
            client=client,
            open_session=open_session,
            metadata=meta,
            query=self.query,
            root_model=self.root_model,
            sub_model=self.sub_model,
            deadline=self.deadline,
            spend=self.spend,
            max_iterations=cfg.max_iterations,
            max_depth=cfg.max_depth,
            max_errors=cfg.max_errors,
            system_prompt=cfg.custom_system_prompt or system_prompt(runtime, searchable),
            exec_timeout_s=exec_timeout,
            logger=logger,
            progress=progress,
            max_tokens_per_call=cfg.max_tokens_per_call,
            sub_temperature=cfg.sub_temperature,
            cache_sub_calls=cfg.caches_sub_calls,
        )
        limit_warning: str | None = None
        try:
            completion = engine.completion(self.gathered.payload, root_prompt=self.query)
            self.answer = completion.response or ""
            if engine.hit_iteration_cap:
                self.status = "partial"
                limit_warning = (
                    f"max_iterations ({cfg.max_iterations}) reached without FINAL; the answer "
                    "is the root model's best answer from the history"
                )
            else:
                self.status = "completed"
        except TimeoutExceededError as exc:
            self.status = "timeout"
            self.answer = _strip_code(exc.partial_answer or engine._best_partial_answer or "")
            limit_warning = f"{exc}; the answer is the best one so far"
        except (BudgetExceededError, ErrorThresholdExceededError, TokenLimitExceededError) as exc:
            self.status = "partial"
            partial = getattr(exc, "partial_answer", None) or engine._best_partial_answer
            self.answer = _strip_code(partial or "")
            limit_warning = f"{exc}; the answer is the best one so far"
        except CancellationError as exc:
            self.status = "partial"
            self.answer = _strip_code(exc.partial_answer or "")
            limit_warning = str(exc)
        except Exception as exc:
            if fail_fast and isinstance(exc, SandboxError | RuntimeFailure):
                raise RuntimeFailure(str(exc)) from exc
            best = _strip_code(engine._best_partial_answer or "")
            if isinstance(exc, LLMError) and best:
                # the LLM gave up for good mid-query (after its retries): keep what we have
                self.status = "partial"
                self.answer = best
                limit_warning = f"the LLM failed ({exc}); the answer is the best one so far"
            else:
                self.fail(f"{type(exc).__name__}: {exc}")
                self.answer = best
        finally:
            self.iterations = engine.tree_iterations
            self.sub_calls = engine.tree_sub_calls
            self.depth_reached = engine.depth_reached
            self.search_calls = tools.search_calls
        if limit_warning:
            self.warning = f"{self.warning}; {limit_warning}" if self.warning else limit_warning

    def _warnings(self) -> str | None:
        """The run's warnings (fallback, limit) and what a context cap left out, as one text."""
        parts = [self.warning] if self.warning else []
        if self.gathered.cap_note:
            parts.append(f"the context was capped: {self.gathered.cap_note} were loaded")
        return "; ".join(parts) or None

    def result(self) -> RLMResult:
        """The query's result, once its answer is known (nothing recorded yet)."""
        self.ended = now_utc()
        return RLMResult(
            answer=self.answer,
            status=self.status,
            iterations=self.iterations,
            total_sub_calls=self.sub_calls,
            search_calls=self.search_calls,
            sub_call_cache_hits=self.spend.sub_call_cache_hits,
            depth_reached=self.depth_reached,
            cost=self.spend.cost_usd,
            prompt_tokens=self.spend.prompt_tokens,
            completion_tokens=self.spend.completion_tokens,
            warning=self._warnings(),
            error=self.error,
            session_id=self.session_id,
            execution_time_s=round(time.monotonic() - self.t0, 3),
            context_type=self.gathered.context_type,
            context_chars=self.gathered.char_count,
            context_items=self.gathered.item_count,
            context_total_items=self.gathered.total_available,
            root_model=self.root_model,
            sub_model=self.sub_model,
            runtime=self.cfg.runtime,
            runtime_used=self.runtime_used,
            trajectory_path=_trajectory_location(self.lake, self.session_id, self.trajectory),
        )

    def record(self, result: RLMResult, store: SessionStore) -> None:
        """Record the session (the trajectory, then the row: the lake, then Postgres) and
        complete `result` with where it went."""
        trajectory = _publish_trajectory(self.lake, self.session_id, self.trajectory)
        result.trajectory_path = trajectory
        row = {
            "session_id": self.session_id,
            "org_id": self.org_id,
            "user_id": self.user_id,
            "knowledge_base_id": self.knowledge_base_id,
            "query": self.query,
            "context_type": result.context_type,
            "context_chars": result.context_chars,
            "context_items": result.context_items,
            "backend": self.backend,
            "runtime": self.cfg.runtime,
            "runtime_used": self.runtime_used,
            "runtime_fallback_reason": self.fallback_reason,
            "root_model": self.root_model,
            "sub_model": self.sub_model,
            "iterations": result.iterations,
            "sub_calls": result.total_sub_calls,
            "search_calls": result.search_calls,
            "sub_call_cache_hits": result.sub_call_cache_hits,
            "depth_reached": result.depth_reached,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "cost_usd": result.cost,
            "execution_time_s": result.execution_time_s,
            "status": result.status,
            "warning": result.warning,
            "error_message": result.error,
            "answer_chars": len(result.answer),
            "trajectory_path": trajectory,
            "started_at": self.started_at,
            "ended_at": self.ended,
        }
        try:
            result.logged_to_postgres = store.record(row)
        except Exception as exc:  # the lake itself failed: say so, still answer
            log.error("rlm session %s: the session row was not written: %s", self.session_id, exc)
            extra = f"session log not written: {exc}"
            result.warning = f"{result.warning}; {extra}" if result.warning else extra


def _trajectory_file(lake: Lake, session_id: str) -> Path:
    """Where the rlms logger writes a session's trajectory: in place on a local lake, else a
    local file uploaded by `_publish_trajectory` when the session ends."""
    if lake.is_local:
        return lake.path / trajectory_key(session_id)
    return Path(tempfile.gettempdir()) / "memcity-trajectories" / f"{session_id}.jsonl"


def _trajectory_location(lake: Lake, session_id: str, local: Path | None) -> str | None:
    """Where `_publish_trajectory` puts the trajectory (None when none was written)."""
    if local is None or not local.exists():
        return None
    return str(local) if lake.is_local else lake.join(trajectory_key(session_id))


def _publish_trajectory(lake: Lake, session_id: str, local: Path | None) -> str | None:
    """The trajectory's location in the lake (uploaded from `local` for object storage)."""
    if local is None or not local.exists():
        return None
    if lake.is_local:
        return str(local)
    key = trajectory_key(session_id)
    try:
        put_bytes(lake, key, local.read_bytes())
    except Exception as exc:  # the session is recorded even when its trajectory is not
        log.warning("rlm session %s: trajectory not uploaded: %s", session_id, exc)
        return None
    local.unlink(missing_ok=True)
    return lake.join(key)


def rlm_extract(
    org_id: str,
    document: str | list[Any],
    instructions: str,
    schema: type[BaseModel],
    *,
    rlm_config: RLMConfig | dict[str, Any] | None = None,
    llm: LLMClient,
    sandbox: SandboxBackend,
    lake_dir: Lake | str | Path,
    session_store: SessionStore | None = None,
) -> tuple[BaseModel | None, RLMResult]:
    """Structured output over a context too long for one call (e.g. phase 1 of enrichment).

    The document is the `custom` context; the root model is told to end with `FINAL` of one
    JSON object matching `schema`. Returns the validated object (None when the session did
    not end with a valid one: then `result.error` says why) and the session's result.
    """
    dump = (
        "JSON.stringify(result)"
        if parse_config(rlm_config).runtime == "bun"
        else "json.dumps(result)"
    )
    query = (
        f"{instructions}\n\nEnd with FINAL({dump}) where `result` is one JSON object "
        "matching this JSON schema:\n"
        + json.dumps(schema.model_json_schema(), separators=(",", ":"))
    )
    result = rlm_query(
        org_id,
        query,
        "custom",
        custom_context=document,
        rlm_config=rlm_config,
        llm=llm,
        sandbox=sandbox,
        lake_dir=lake_dir,
        session_store=session_store,
    )
    if result.status == "failed":
        return None, result
    try:
        return parse_structured(result.answer, schema), result
    except ValueError as exc:
        result.error = f"the answer does not match {schema.__name__}: {exc}"
        return None, result
