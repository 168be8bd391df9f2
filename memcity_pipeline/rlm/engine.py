"""The RLM loop of `rlms`, with its REPL in our sandbox and its LLM calls through our client.

- :class:`HostLM` is an `rlms` client (`BaseLM`) over our :class:`LLMClient`: usage and cost
  land in `rlms`'s `LMHandler` (so `max_budget` works), and every call is bounded by the time
  left (`Deadline`) and the budget left (`Spend`). A call abandoned at the deadline runs out
  on a daemon thread with the time left as its limit: it never holds the process. Sub-calls
  (`llm_query` answered by an LLM) run at the query's `sub_temperature` and, with
  `cache_sub_calls`, through the client's persistent LLM cache: a prompt already answered for
  the same model and parameters is served from it, counted in `Spend.sub_call_cache_hits`,
  and adds no tokens and no cost (so nothing against `max_budget`). Root calls never use the
  cache.
- :class:`Deadline` also records what the time ran out during (a root LLM call, a sub-call, a
  code execution; a child RLM's are named as such), so a timeout says where the time went.
  An iteration counts once the root LLM has answered it.
- :class:`SandboxREPL` is an `rlms` environment whose `execute_code` runs in a persistent
  session of the sandbox resource; `llm_query` calls made in the sandbox come back to the host
  (the session's LLM handler) and are answered through the same `LMHandler` clients.
- :class:`SandboxRLM` subclasses `rlms`'s `RLM` and overrides `_spawn_completion_context`
  (its `get_environment` is a closed switch) and `_setup_prompt` (our prompts and metadata).

Accounting covers the whole tree of RLMs of a query (`max_depth` 2 or 3): child RLMs share the
root's `Spend` (tokens, cost, cache hits) and `Deadline`, so `max_budget` and `max_timeout`
bound the tree, and the budget is checked against the tree's spend after every iteration of
every RLM. Each RLM adds up its children's `tree_iterations` and `tree_sub_calls` (an
`llm_query` a child answered counts once, the child's own sub-calls count too) and the deepest
level that ran (`depth_reached`: 1 for the root alone, 2 once a child RLM ran, 3 for a
grandchild), also when a child ends on a limit.

`FINAL(value)` / `FINAL_VAR(name)` are defined by a prelude in the sandbox (`PRELUDE` for the
python runtime, `JS_PRELUDE` for the bun runtime); they set `__final__`, which the REPL server
reports and `SandboxREPL` turns into `final_answer`, the signal that ends `rlms`'s loop.

Tracing (`rlm.tracing`): each iteration is an `rlm.iteration` span, each code block an
`rlm.execute` span under it, each `llm_query` prompt an `rlm.sub_call` span under its execution
(a child RLM's iterations under that). Sub-calls and tool calls arrive on the sandbox session's
threads, so `SandboxREPL` hands the execution's span context to its `SubCallBroker`, which
attaches it around each call it answers (and each tool call, through `broker.tools(...)`).

What the sandboxed code sends is bounded on the host (see `sandbox.base`), and so is what the
broker keeps of it: an execution's trajectory keeps its first `MAX_KEPT_CALLS` sub-calls and as
many searches, with at most `MAX_KEPT_CALL_CHARS` characters of prompts, answers and child
trajectories; the calls
past that are answered and counted (`SandboxResult.sub_calls_left_out` and
`searches_left_out`, the same keys in the trajectory, and in the progress figures) but not
kept. A query asks for at most `MAX_SUB_MODELS` models by name in
`llm_query(..., model=...)`; another name is an error in the code.

Progress (`progress`, the root RLM's only): `sandbox_opening`, `context_loaded`,
`iteration_start` and `iteration_done`, the last with what the iteration did (code blocks and
lines, characters printed, errors, sub-calls and searches, whether it ended with FINAL) and what
the query has spent so far (sub-calls of the tree, tokens, cost); `rlm.trajectory.iteration_line`
writes it as a line. Each execution's `search` calls are kept in the trajectory beside its
sub-calls (`SandboxResult.tool_calls`).

This module stays whole: its subclasses of the `rlms` LM client, environment and loop work as
one (the deadline, the budget and the sub-call broker are shared by all three).
"""

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from rlm import RLM
from rlm.clients.base_lm import BaseLM
from rlm.core.lm_handler import LMHandler
from rlm.core.types import (
    CodeBlock,
    ModelUsageSummary,
    REPLResult,
    RLMChatCompletion,
    RLMIteration,
    UsageSummary,
)
from rlm.environments.base_env import IsolatedEnv
from rlm.logger import RLMLogger
from rlm.utils.exceptions import BudgetExceededError, TimeoutExceededError
from rlm.utils.parsing import find_code_blocks

from memcity_pipeline.llm.client import LLMClient
from memcity_pipeline.llm.usage import Usage
from memcity_pipeline.rlm.prompts import ContextMetadata, build_messages, describe_context
from memcity_pipeline.rlm.tracing import set_attributes, tracer
from memcity_pipeline.sandbox.base import (
    SandboxError,
    SandboxSession,
    ToolHandler,
    tool_error_text,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

PRELUDE = '''
def FINAL(answer):
    """End the task: `answer` (a string, or anything str()-able) is the final answer."""
    global __final__
    __final__ = {"kind": "value", "value": str(answer)}
    return answer


def FINAL_VAR(name):
    """End the task with the value of the REPL variable `name` as the final answer."""
    global __final__
    name = str(name).strip().strip("'\\"")
    if name not in globals():
        raise NameError(
            f"FINAL_VAR: no variable {name!r}; create it first (see SHOW_VARS())"
        )
    __final__ = {"kind": "var", "name": name, "value": str(globals()[name])}
    return globals()[name]
'''

JS_PRELUDE = r"""
function __final_text(value) {
  if (typeof value === "string") return value;
  if (value !== null && typeof value === "object" && !(value instanceof Error)) {
    try {
      const json = JSON.stringify(value);
      if (typeof json === "string") return json;
    } catch (e) {}
  }
  return String(value);
}

function FINAL(answer) {
  __final__ = { kind: "value", value: __final_text(answer) };
  return answer;
}

function FINAL_VAR(name) {
  name = String(name).trim().replace(/^['"]|['"]$/g, "");
  if (!(name in globalThis)) {
    throw new ReferenceError(
      `FINAL_VAR: no variable '${name}'; create it first (see SHOW_VARS())`);
  }
  __final__ = { kind: "var", name, value: __final_text(globalThis[name]) };
  return globalThis[name];
}
"""
"""FINAL / FINAL_VAR for the bun runtime (objects and arrays become JSON text)."""
PRELUDES = {"python": PRELUDE, "bun": JS_PRELUDE}

MAX_KEPT_CALLS = 1_000
"""Sub-calls (and, separately, searches) one execution keeps for the trajectory; more are
counted, not kept."""
MAX_KEPT_CALL_CHARS = 4_000_000
"""Characters of prompts and answers (and child RLMs' trajectories) the sub-calls kept for one
execution may hold in all."""
MAX_SUB_MODELS = 8
"""Models one query's code may name in `llm_query(..., model=...)` (each is a client)."""

CHILD_QUERY = (
    "`context` is a request that a program sent to you (an `llm_query` call). Do what it asks, "
    "reading `context` with code, and end with FINAL(answer)."
)

# FINAL(...) / FINAL_VAR(...) written as plain text (outside a ```repl block) on its own line.
_TEXT_FINAL = re.compile(r"^\s*FINAL\((?P<body>.*)\)\s*$", re.DOTALL | re.MULTILINE)
_TEXT_FINAL_VAR = re.compile(r"^\s*FINAL_VAR\(\s*['\"]?(?P<name>\w+)['\"]?\s*\)\s*$", re.MULTILINE)


ROOT_CALL = "a root LLM call"
SUB_CALL = "a sub-call (llm_query from the sandboxed code)"
CODE_EXECUTION = "code execution in the sandbox"
SANDBOX_START = "opening the sandbox and loading the context"


def scoped(what: str, depth: int) -> str:
    """`what` of the RLM at `depth` (0: the query's own; deeper: a child RLM's)."""
    return what if depth == 0 else f"{what} of the child RLM at depth {depth}"


class Deadline:
    """The wall-clock end of a query (None: no limit), and what the time ran out during.

    The steps that spend the query's time (a root LLM call, a sub-call, a code execution) run
    inside `activity(what)`. The first step to end after the deadline records the innermost step
    then in progress (a sub-call inside an execution is the sub-call), so every timeout message
    of the query (`error()`) names where the time went, whichever check raises it.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.started = time.monotonic()
        self.at = None if seconds is None else self.started + seconds
        self.ran_out_during: str | None = None
        self._active: list[str] = []  # steps in progress, in the order they started
        self._lock = threading.Lock()

    def remaining(self) -> float | None:
        """Seconds left (may be negative), or None without a limit."""
        return None if self.at is None else self.at - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def exceeded(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    @contextmanager
    def activity(self, what: str) -> Iterator[None]:
        """Run a step that spends the query's time; see the class docstring."""
        with self._lock:
            self._active.append(what)
        try:
            yield
        finally:
            with self._lock:
                if self.ran_out_during is None and self.exceeded():
                    self.ran_out_during = self._active[-1]
                self._active.remove(what)

    def ran_out(self, what: str) -> None:
        """Record that the time ran out during `what` (unless a step was recorded already)."""
        with self._lock:
            if self.ran_out_during is None:
                self.ran_out_during = what

    def error(
        self, what: str | None = None, partial_answer: str | None = None
    ) -> TimeoutExceededError:
        """The rlms timeout exception, naming the step the time ran out during (the recorded
        one, else `what`)."""
        elapsed = self.elapsed()
        during = self.ran_out_during or what
        where = f": the time ran out during {during}" if during else ""
        return TimeoutExceededError(
            elapsed=elapsed,
            timeout=self.seconds or 0.0,
            partial_answer=partial_answer,
            message=f"max_timeout of {self.seconds:g} s reached after {elapsed:.1f} s{where}",
        )


@dataclass
class Spend:
    """Tokens and cost of every LLM call of one query, shared by its clients (thread-safe).

    `usage` accumulates them (`cost_usd` None while no call reported a cost); `root_calls` and
    `sub_calls` count the calls of each kind; `sub_call_cache_hits` the sub-calls the LLM cache
    answered (counted in `sub_calls`, adding nothing to `usage`).
    """

    max_budget: float | None = None
    usage: Usage = field(default_factory=Usage)
    root_calls: int = 0
    sub_calls: int = 0
    sub_call_cache_hits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, usage: Usage, sub: bool, *, cached: bool = False) -> None:
        """Count one call; a `cached` answer's usage is not new spend and is left out."""
        with self._lock:
            if cached:
                self.sub_call_cache_hits += 1
            else:
                self.usage = self.usage + usage
            if sub:
                self.sub_calls += 1
            else:
                self.root_calls += 1

    @property
    def prompt_tokens(self) -> int:
        return self.usage.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.usage.completion_tokens

    @property
    def cost_usd(self) -> float | None:
        return self.usage.cost_usd

    def over_budget(self) -> bool:
        with self._lock:
            return self.max_budget is not None and (self.cost_usd or 0.0) > self.max_budget


class HostLM(BaseLM):
    """An `rlms` client over our `LLMClient` for one model, bounded by deadline and budget.

    Root calls (the loop's) and sub-calls (the sandbox's `llm_query`) share the same `Spend`;
    `sub` says which kind this instance serves by default (`completion(..., sub=True)` too).
    Sub-calls run at `sub_temperature` and, with `cache_sub_calls`, read and fill the client's
    LLM cache; a cache hit adds no usage (`last_cached()` says whether the caller's last call
    was one).
    Each request runs on a daemon thread with the time left as its own limit: a call abandoned
    at the deadline neither keeps the query waiting nor holds the process at exit, and its HTTP
    request is dropped when that time is up. `depth` names the RLM in timeout messages.
    """

    def __init__(
        self,
        client: LLMClient,
        model_name: str,
        *,
        deadline: Deadline,
        spend: Spend,
        max_tokens: int | None = None,
        depth: int = 0,
        sub_temperature: float = 0.0,
        cache_sub_calls: bool = False,
    ) -> None:
        super().__init__(model_name=model_name, timeout=client.timeout_s)
        self.client = client
        self.deadline = deadline
        self.spend = spend
        self.max_tokens = max_tokens
        self.depth = depth
        self.sub_temperature = sub_temperature
        self.cache_sub_calls = cache_sub_calls
        self._lock = threading.Lock()
        self._local = threading.local()
        self._usage = Usage()

    def completion(self, prompt: str | list[dict[str, Any]], sub: bool = False) -> str:
        """One chat completion; TimeoutExceededError when the query's time runs out first."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        what = scoped(SUB_CALL if sub else ROOT_CALL, self.depth)
        if self.spend.over_budget():
            raise BudgetExceededError(
                spent=self.spend.cost_usd or 0.0,
                budget=self.spend.max_budget or 0.0,
                message=f"max_budget of ${self.spend.max_budget} spent before {what}",
            )
        left = self.deadline.remaining()
        if left is not None and left <= 0:
            raise self.deadline.error(what)
        with self.deadline.activity(what):
            future = _on_daemon_thread(
                lambda: self.client.complete(
                    messages,
                    model=self.model_name,
                    temperature=self.sub_temperature if sub else 0.0,
                    max_tokens=self.max_tokens,
                    use_cache=sub and self.cache_sub_calls,
                    time_limit_s=left,
                ),
                name=f"rlm-llm-{self.model_name}",
            )
            try:
                result = future.result(timeout=left)
            except FutureTimeout:
                self.deadline.ran_out(what)
                raise self.deadline.error(what) from None
        usage = Usage(calls=1) if result.cached else result.usage
        with self._lock:
            self._usage = self._usage + usage
        self.spend.add(usage, sub, cached=result.cached)
        self._local.last = _summary(usage)
        self._local.cached = result.cached
        return result.text

    async def acompletion(self, prompt: str | list[dict[str, Any]]) -> str:
        return await asyncio.to_thread(self.completion, prompt, True)

    def get_usage_summary(self) -> UsageSummary:
        with self._lock:
            usage = self._usage
        if not usage.calls:
            return UsageSummary(model_usage_summaries={})
        return UsageSummary(model_usage_summaries={self.model_name: _summary(usage)})

    def get_last_usage(self) -> ModelUsageSummary:
        return getattr(self._local, "last", ModelUsageSummary(0, 0, 0, None))

    def last_cached(self) -> bool:
        """Whether this thread's last call was answered by the LLM cache."""
        return bool(getattr(self._local, "cached", False))

    def close(self) -> None:
        """Nothing to wait for: calls still in flight end on their own, on daemon threads, by
        their time limit."""


def _on_daemon_thread(fn: Callable[[], T], *, name: str) -> "Future[T]":
    """`fn()` run on a new daemon thread; its outcome in the returned future."""
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # the waiting caller gets it from the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def tool_call_record(tool: str, args: Any) -> dict[str, Any]:
    """What the trajectory keeps of a tool call: the tool, and the query and k it was sent
    (when they are what they should be; the call's own checks say what is wrong otherwise)."""
    record: dict[str, Any] = {"tool": str(tool)[:100]}
    if isinstance(args, dict):
        query, k = args.get("query"), args.get("k")
        if isinstance(query, str):
            record["query"] = query[:500]
        if isinstance(k, int | float) and not isinstance(k, bool):
            record["k"] = k
    return record


class SandboxResult(REPLResult):
    """`rlms`'s REPL result plus the tool calls (`search`) the code made, in the trajectory."""

    def __init__(
        self,
        *args: Any,
        tool_calls: list[dict[str, Any]] | None = None,
        left_out: tuple[int, int] = (0, 0),
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self.tool_calls = tool_calls or []
        # answered and counted, not kept (MAX_KEPT_CALLS, MAX_KEPT_CALL_CHARS)
        self.sub_calls_left_out, self.searches_left_out = left_out

    def to_dict(self) -> dict[str, Any]:
        kept = {**super().to_dict(), "tool_calls": self.tool_calls}
        if self.sub_calls_left_out:
            kept["sub_calls_left_out"] = self.sub_calls_left_out
        if self.searches_left_out:
            kept["searches_left_out"] = self.searches_left_out
        return kept


def _lines(code: str) -> int:
    """The number of lines of a code block."""
    return len(code.splitlines())


def _summary(usage: Usage) -> ModelUsageSummary:
    """`usage` as `rlms` counts it."""
    return ModelUsageSummary(
        int(usage.calls), usage.prompt_tokens, usage.completion_tokens, usage.cost_usd
    )


# (prompt, model or None) -> the completion of a child RLM whose `context` is the prompt
ChildRLM = Callable[[str, str | None], RLMChatCompletion]


class SubCallBroker:
    """The sandbox session's LLM handler: answers `llm_query` prompts on the host.

    Prompts go to the `LMHandler`'s client for the requested model (the sub-model by default),
    so usage and cost are tracked where `rlms` checks the budget; with `child` (when the depth
    allows recursion) each prompt is answered by a child RLM instead. Each answered prompt is
    kept as an `RLMChatCompletion` for the trajectory of the current execution (a child's carries
    the child's own trajectory as its metadata, as in `rlms`).
    """

    def __init__(self, make_client: Callable[[str], HostLM], child: ChildRLM | None = None) -> None:
        self.handler: LMHandler | None = None
        self._make_client = make_client
        self._child = child
        self._lock = threading.Lock()
        self._calls: list[RLMChatCompletion] = []
        self._tool_calls: list[dict[str, Any]] = []
        self._kept_chars = 0
        self._sub_calls_left_out = 0  # since the last take_left_out(): answered, not kept
        self._searches_left_out = 0
        self.total = 0
        # the span context of the code execution in progress (set by SandboxREPL)
        self.trace_context: Context | None = None

    def __call__(self, prompts: list[str], model: str | None) -> list[str]:
        with self._traced():
            return [self._one(prompt, model) for prompt in prompts]

    @contextmanager
    def _traced(self) -> Iterator[None]:
        """Run a call from the sandbox in the span context of the execution that made it."""
        token = otel_context.attach(self.trace_context) if self.trace_context else None
        try:
            yield
        finally:
            if token is not None:
                otel_context.detach(token)

    def tools(self, handler: ToolHandler) -> ToolHandler:
        """`handler` (the session's tool handler) run in the span context of the execution,
        each call kept for the trajectory (`take_tool_calls`)."""

        def traced(tool: str, args: Any) -> Any:
            started = time.perf_counter()
            record = tool_call_record(tool, args)
            try:
                with self._traced():
                    result = handler(tool, args)
            except Exception as exc:
                record["error"] = tool_error_text(exc)  # what the sandboxed code was told
                raise
            else:
                if isinstance(result, list):
                    record["hits"] = len(result)
                return result
            finally:
                record["seconds"] = round(time.perf_counter() - started, 3)
                with self._lock:
                    if len(self._tool_calls) < MAX_KEPT_CALLS:
                        self._tool_calls.append(record)
                    else:
                        self._searches_left_out += 1

        return traced

    def take_tool_calls(self) -> list[dict[str, Any]]:
        """The tool calls (`search`) made since the last `take_tool_calls()` (the first
        `MAX_KEPT_CALLS` of them)."""
        with self._lock:
            calls, self._tool_calls = self._tool_calls, []
        return calls

    def take_left_out(self) -> tuple[int, int]:
        """How many sub-calls and searches were answered and not kept since the last
        `take_left_out()`."""
        with self._lock:
            left_out = (self._sub_calls_left_out, self._searches_left_out)
            self._sub_calls_left_out = self._searches_left_out = 0
        return left_out

    def _client(self, model: str | None) -> HostLM:
        assert self.handler is not None, "the broker is not attached to an LMHandler"
        with self._lock:
            if model and model not in self.handler.clients:
                if len(self.handler.clients) >= MAX_SUB_MODELS:
                    raise ValueError(
                        f"a query may name at most {MAX_SUB_MODELS} models; {model!r} is one more"
                    )
                self.handler.register_client(model, self._make_client(model))
            client = self.handler.get_client(model, depth=1)
        assert isinstance(client, HostLM)
        return client

    def _one(self, prompt: str, model: str | None) -> str:
        if self._child is not None:
            return self._one_child(prompt, model)
        client = self._client(model)
        started = time.perf_counter()
        with tracer().start_as_current_span("rlm.sub_call") as span:
            set_attributes(span, {"rlm.model": client.model_name, "rlm.prompt_chars": len(prompt)})
            try:
                text = client.completion(prompt, sub=True)
            except (TimeoutExceededError, BudgetExceededError) as exc:
                raise RuntimeError(str(exc)) from None
            usage = client.get_last_usage()
            cached = client.last_cached()
            set_attributes(
                span,
                {
                    "rlm.prompt_tokens": usage.total_input_tokens,
                    "rlm.completion_tokens": usage.total_output_tokens,
                    "rlm.cost_usd": usage.total_cost,
                    "rlm.cache_hit": cached,
                },
            )
        record = RLMChatCompletion(
            root_model=client.model_name,
            prompt=prompt,
            response=text,
            usage_summary=UsageSummary(model_usage_summaries={client.model_name: usage}),
            execution_time=time.perf_counter() - started,
            metadata={"cache_hit": True} if cached else None,
        )
        self._keep(record)
        return text

    def _one_child(self, prompt: str, model: str | None) -> str:
        assert self._child is not None
        with tracer().start_as_current_span("rlm.sub_call") as span:
            set_attributes(
                span,
                {"rlm.model": model, "rlm.prompt_chars": len(prompt), "rlm.child_rlm": True},
            )
            completion = self._child(prompt, model)
            usage = completion.usage_summary
            set_attributes(
                span,
                {
                    "rlm.prompt_tokens": usage.total_input_tokens,
                    "rlm.completion_tokens": usage.total_output_tokens,
                    "rlm.cost_usd": usage.total_cost,
                },
            )
        self._keep(completion)
        return completion.response or ""

    def _keep(self, record: RLMChatCompletion) -> None:
        size = len(record.prompt if isinstance(record.prompt, str) else str(record.prompt))
        size += len(record.response or "")
        if record.metadata:  # a child RLM's whole trajectory
            size += len(json.dumps(record.metadata, default=str))
        with self._lock:
            self.total += 1
            if len(self._calls) < MAX_KEPT_CALLS and self._kept_chars + size <= MAX_KEPT_CALL_CHARS:
                self._calls.append(record)
                self._kept_chars += size
            else:
                self._sub_calls_left_out += 1

    def take(self) -> list[RLMChatCompletion]:
        """The sub-calls answered since the last `take()` (those kept: see `MAX_KEPT_CALLS`)."""
        with self._lock:
            calls, self._calls = self._calls, []
            self._kept_chars = 0
        return calls


class SandboxREPL(IsolatedEnv):
    """An `rlms` environment running code in one persistent session of our sandbox."""

    def __init__(
        self,
        session: SandboxSession,
        broker: SubCallBroker,
        deadline: Deadline,
        *,
        context_payload: str | list | dict | None = None,
        exec_timeout_s: float = 120.0,
        depth: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(persistent=False, depth=depth, **kwargs)
        self.session = session
        self.broker = broker
        self.deadline = deadline
        self.exec_timeout_s = exec_timeout_s
        self.executions = 0
        self.errors = 0
        self.setup()
        if context_payload is not None:
            self.load_context(context_payload)

    def setup(self) -> None:
        """Nothing to do: the session is opened (with the prelude) by the caller."""

    def load_context(self, context_payload: dict | list | str) -> None:
        """Send the context into the sandbox as `context`."""
        self.session.load_context(context_payload)

    def _timeout(self) -> float | None:
        left = self.deadline.remaining()
        if left is None:
            return self.exec_timeout_s
        return max(0.05, min(self.exec_timeout_s, left))

    def execute_code(self, code: str) -> REPLResult:
        """Run one code block in the sandbox; errors become stderr (the loop goes on). Traced
        as an `rlm.execute` span, the parent of the sub-calls and searches the code makes."""
        with tracer().start_as_current_span("rlm.execute") as span:
            set_attributes(span, {"rlm.depth": self.depth - 1, "rlm.code_lines": _lines(code)})
            self.broker.trace_context = otel_context.get_current()
            try:
                result = self._execute_code(code)
            finally:
                self.broker.trace_context = None
            set_attributes(
                span,
                {
                    "rlm.output_chars": len(result.stdout or ""),
                    "rlm.error": bool(result.stderr),
                    "rlm.sub_calls": len(result.rlm_calls)
                    + getattr(result, "sub_calls_left_out", 0),
                    "rlm.final": result.final_answer is not None,
                },
            )
            return result

    def _execute_code(self, code: str) -> REPLResult:
        started = time.perf_counter()
        self.executions += 1
        self.broker.take()
        self.broker.take_tool_calls()
        self.broker.take_left_out()
        what = scoped(CODE_EXECUTION, self.depth - 1)
        if self.deadline.exceeded():
            raise self.deadline.error(what)
        try:
            with self.deadline.activity(what):
                result = self.session.execute(code, timeout_s=self._timeout())
        except SandboxError as exc:
            self.errors += 1
            return SandboxResult(
                stdout="",
                stderr=f"SandboxError: {exc}",
                locals={},
                execution_time=time.perf_counter() - started,
                rlm_calls=self.broker.take(),
                tool_calls=self.broker.take_tool_calls(),
                left_out=self.broker.take_left_out(),
            )
        stderr = result.stderr
        if result.error:
            self.errors += 1
            stderr = f"{stderr}\n{result.error}" if stderr else result.error
        final = None
        if result.final is not None:
            final = str(result.final.get("value", ""))
        return SandboxResult(
            stdout=result.stdout,
            stderr=stderr,
            locals={},
            execution_time=result.duration_s,
            rlm_calls=self.broker.take(),
            final_answer=final,
            tool_calls=self.broker.take_tool_calls(),
            left_out=self.broker.take_left_out(),
        )

    def read_variable(self, name: str) -> str | None:
        """`str()` of a sandbox variable, or None."""
        try:
            return self.session.get_variable(name)
        except (KeyError, SandboxError):
            return None

    def cleanup(self) -> None:
        """Close the sandbox session."""
        self.session.close()


@dataclass
class EngineOutcome:
    """How the loop ended, before it becomes an `RLMResult`."""

    answer: str
    final: bool  # True when FINAL/FINAL_VAR ended the loop
    iterations: int
    limit: str | None = None  # max_iterations | max_budget | max_errors | max_tokens | max_timeout
    warning: str | None = None
    error: str | None = None


ProgressFn = Callable[[str, dict[str, Any]], None]


class SandboxRLM(RLM):
    """`rlms`'s RLM with the REPL in our sandbox and the LLM calls through our client.

    `open_session(broker)` opens the sandbox session (with `PRELUDE`) whose LLM handler is the
    broker. One instance serves one query. With `max_depth > 1`, an `llm_query` made at a depth
    below it is answered by a child `SandboxRLM` (its own sandbox session, the prompt as its
    `context`), which shares this query's deadline, budget and LLM client (as `rlms` does).
    """

    def __init__(
        self,
        *,
        client: LLMClient,
        open_session: Callable[[SubCallBroker], SandboxSession],
        metadata: ContextMetadata,
        query: str,
        root_model: str,
        sub_model: str,
        deadline: Deadline,
        spend: Spend,
        max_iterations: int = 20,
        max_depth: int = 1,
        max_errors: int | None = None,
        system_prompt: str,
        exec_timeout_s: float = 120.0,
        logger: RLMLogger | None = None,
        progress: ProgressFn | None = None,
        max_tokens_per_call: int | None = None,
        depth: int = 0,
        sub_temperature: float = 0.0,
        cache_sub_calls: bool = False,
    ) -> None:
        super().__init__(
            backend="openai",
            backend_kwargs={"model_name": root_model, "base_url": client.base_url},
            environment="sandbox",  # type: ignore[arg-type]
            environment_kwargs={"exec_timeout_s": exec_timeout_s},
            depth=depth,
            max_depth=max_depth,
            max_iterations=max_iterations,
            max_budget=spend.max_budget,
            max_timeout=deadline.seconds,
            max_errors=max_errors,
            custom_system_prompt=system_prompt,
            other_backends=["openai"] if sub_model != root_model else None,
            other_backend_kwargs=[{"model_name": sub_model}] if sub_model != root_model else None,
            logger=logger,
        )
        self.client = client
        self.open_session = open_session
        self.metadata = metadata
        self.query = query
        self.root_model = root_model
        self.sub_model = sub_model
        self.deadline = deadline
        self.spend = spend
        self.exec_timeout_s = exec_timeout_s
        self.progress = progress
        self.max_tokens_per_call = max_tokens_per_call
        self.sub_temperature = sub_temperature
        self.cache_sub_calls = cache_sub_calls
        self.iterations_run = 0
        self.children_iterations = 0  # every descendant's iterations
        self.children_sub_calls = 0  # every descendant's sub-calls
        self.depth_reached = 0  # 1 + the depth of the deepest RLM of this tree that ran
        self._tally_lock = threading.Lock()
        self.hit_iteration_cap = False
        self.environment: SandboxREPL | None = None
        self.broker: SubCallBroker | None = None
        self._clients: list[HostLM] = []

    @property
    def tree_iterations(self) -> int:
        """Iterations of this RLM and of every child RLM below it."""
        return self.iterations_run + self.children_iterations

    @property
    def tree_sub_calls(self) -> int:
        """Sub-calls answered for this RLM's code and for every child RLM's below it."""
        return (self.broker.total if self.broker else 0) + self.children_sub_calls

    def _host_client(self, model: str) -> HostLM:
        client = HostLM(
            self.client,
            model,
            deadline=self.deadline,
            spend=self.spend,
            max_tokens=self.max_tokens_per_call,
            depth=self.depth,
            sub_temperature=self.sub_temperature,
            cache_sub_calls=self.cache_sub_calls,
        )
        self._clients.append(client)
        return client

    def _notify(self, event: str, **data: Any) -> None:
        if self.progress is not None:
            try:
                self.progress(event, data)
            except Exception as exc:  # a progress display must never break a query
                log.debug("progress callback failed: %s", exc)

    @contextmanager
    def _spawn_completion_context(
        self, prompt: str | dict[str, Any]
    ) -> Iterator[tuple[LMHandler, SandboxREPL]]:
        """An LMHandler over our client(s) and a SandboxREPL with the context loaded."""
        self.depth_reached = max(self.depth_reached, self.depth + 1)
        root = self._host_client(self.root_model)
        sub = self._host_client(self.sub_model) if self.sub_model != self.root_model else None
        handler = LMHandler(root, other_backend_client=sub)
        if sub is not None:
            handler.register_client(sub.model_name, sub)
        recursive = self.depth + 1 < self.max_depth
        broker = SubCallBroker(self._host_client, self._child_answer if recursive else None)
        broker.handler = handler
        self.broker = broker
        environment: SandboxREPL | None = None
        try:
            self._notify("sandbox_opening")
            with self.deadline.activity(scoped(SANDBOX_START, self.depth)):
                session = self.open_session(broker)
                try:
                    environment = SandboxREPL(
                        session,
                        broker,
                        self.deadline,
                        context_payload=prompt,
                        exec_timeout_s=self.exec_timeout_s,
                        depth=self.depth + 1,
                    )
                except BaseException:
                    session.close()
                    raise
            self.environment = environment
            self._notify("context_loaded")
            yield handler, environment
        finally:
            if environment is not None:
                environment.cleanup()
            for client in self._clients:
                client.close()

    def _child_answer(self, prompt: str, model: str | None) -> RLMChatCompletion:
        """An `llm_query` answered by a child RLM one level deeper (rlms's recursion).

        The child logs in memory when we log: its trajectory comes back as the completion's
        metadata and lands in our trajectory file inside this iteration's sub-calls.
        """
        child = SandboxRLM(
            client=self.client,
            open_session=self.open_session,
            metadata=describe_context("custom", prompt),
            query=CHILD_QUERY,
            root_model=model or self.root_model,
            sub_model=self.sub_model,
            deadline=self.deadline,
            spend=self.spend,
            max_iterations=self.max_iterations,
            max_depth=self.max_depth,
            max_errors=self.max_errors,
            system_prompt=self.system_prompt,
            exec_timeout_s=self.exec_timeout_s,
            max_tokens_per_call=self.max_tokens_per_call,
            depth=self.depth + 1,
            logger=RLMLogger() if self.logger else None,
            sub_temperature=self.sub_temperature,
            cache_sub_calls=self.cache_sub_calls,
        )
        self._notify("child_start", depth=child.depth)
        try:
            completion = child.completion(prompt, root_prompt=CHILD_QUERY)
        except (TimeoutExceededError, BudgetExceededError) as exc:
            raise RuntimeError(str(exc)) from None
        finally:
            with self._tally_lock:  # children of one llm_query_batched run concurrently
                self.children_iterations += child.tree_iterations
                self.children_sub_calls += child.tree_sub_calls
                self.depth_reached = max(self.depth_reached, child.depth_reached)
        return completion

    def _setup_prompt(
        self, prompt: str | dict[str, Any], root_prompt: str | None = None
    ) -> list[dict[str, Any]]:
        """Our system prompt and the metadata message (never the context itself)."""
        return build_messages(self.system_prompt, self.metadata, root_prompt or self.query)

    def _check_timeout(self, iteration: int, time_start: float) -> None:
        """The query's deadline (shared with child RLMs), checked before each iteration; the
        timeout names the step the time ran out during."""
        if self.deadline.exceeded():
            raise self.deadline.error(partial_answer=self._best_partial_answer)

    def _completion_turn(
        self, prompt: str | dict[str, Any], lm_handler: LMHandler, environment: Any
    ) -> RLMIteration:
        """One iteration (as rlms's), plus FINAL(...) written as plain text outside a code
        block. It counts in `iterations_run` once the root LLM has answered: a root call cut
        by the deadline is no turn made. Traced as an `rlm.iteration` span with the tokens and
        cost the query spent during it (its sub-calls and child RLMs included)."""
        with tracer().start_as_current_span("rlm.iteration") as span:
            set_attributes(
                span, {"rlm.iteration": self.iterations_run + 1, "rlm.depth": self.depth}
            )
            spent = (self.spend.prompt_tokens, self.spend.completion_tokens, self.spend.cost_usd)
            try:
                return self._turn(prompt, lm_handler, environment)
            finally:
                cost = self.spend.cost_usd
                set_attributes(
                    span,
                    {
                        "rlm.prompt_tokens": self.spend.prompt_tokens - spent[0],
                        "rlm.completion_tokens": self.spend.completion_tokens - spent[1],
                        "rlm.cost_usd": None if cost is None else cost - (spent[2] or 0.0),
                    },
                )

    def _turn(
        self, prompt: str | dict[str, Any], lm_handler: LMHandler, environment: Any
    ) -> RLMIteration:
        started = time.perf_counter()
        self._notify("iteration_start", iteration=self.iterations_run + 1)
        response = lm_handler.completion(prompt)
        self.iterations_run += 1
        if response and response.strip():
            self._best_partial_answer = response
        codes = find_code_blocks(response)
        code_blocks = [
            CodeBlock(code=code, result=environment.execute_code(code)) for code in codes
        ]
        iteration = RLMIteration(
            prompt=prompt,
            response=response,
            code_blocks=code_blocks,
            iteration_time=time.perf_counter() - started,
        )
        if not iteration.code_blocks:
            text_final = self._text_final(iteration)
            if text_final is not None:
                iteration.code_blocks.append(_text_final_block(text_final))
        results = [b.result for b in iteration.code_blocks]
        self._notify(
            "iteration_done",
            iteration=self.iterations_run,
            depth=self.depth,
            seconds=iteration.iteration_time,
            code_blocks=len(codes),
            code_lines=sum(_lines(code) for code in codes),
            output_chars=sum(len(r.stdout or "") + len(r.stderr or "") for r in results),
            errors=sum(1 for r in results if r.stderr),
            sub_calls=sum(len(r.rlm_calls) + getattr(r, "sub_calls_left_out", 0) for r in results),
            search_calls=sum(  # the searches answered (a refused call is an error in the code)
                1 for r in results for c in getattr(r, "tool_calls", []) if "hits" in c
            )
            + sum(getattr(r, "searches_left_out", 0) for r in results),
            final=any(r.final_answer is not None for r in results),
            total_sub_calls=self.tree_sub_calls,
            tokens=self.spend.prompt_tokens + self.spend.completion_tokens,
            cost_usd=self.spend.cost_usd,
        )
        return iteration

    def _check_iteration_limits(
        self, iteration: RLMIteration, iteration_num: int, lm_handler: LMHandler
    ) -> None:
        """rlms's checks after an iteration, with `max_budget` checked against the spend of
        the whole tree (rlms's own check sees this RLM's handler only)."""
        if self.spend.over_budget():
            raise BudgetExceededError(
                spent=self.spend.cost_usd or 0.0,
                budget=self.spend.max_budget or 0.0,
                message=(
                    f"Budget exceeded after iteration {iteration_num + 1}"
                    f"{'' if self.depth == 0 else f' of the child RLM at depth {self.depth}'}: "
                    f"spent ${self.spend.cost_usd or 0.0:.6f} of ${self.spend.max_budget:.6f} "
                    "(every LLM call of the query, child RLMs included)"
                ),
            )
        super()._check_iteration_limits(iteration, iteration_num, lm_handler)

    def _text_final(self, iteration: RLMIteration) -> str | None:
        """The answer of a `FINAL(...)`/`FINAL_VAR(...)` line outside code blocks, if any."""
        text = re.sub(r"```.*?```", "", iteration.response or "", flags=re.DOTALL)
        match = _TEXT_FINAL_VAR.search(text)
        if match and self.environment is not None:
            return self.environment.read_variable(match.group("name"))
        match = _TEXT_FINAL.search(text)
        if match:
            body = match.group("body").strip()
            if len(body) >= 2 and body[0] == body[-1] and body[0] in "'\"":
                body = body[1:-1]
            return body or None
        return None

    def _default_answer(self, message_history: list[dict[str, Any]], lm_handler: LMHandler) -> str:
        """Out of iterations: ask the root model for its best answer (rlms's behaviour)."""
        self.hit_iteration_cap = True
        return super()._default_answer(message_history, lm_handler)


def _text_final_block(answer: str) -> CodeBlock:
    """A code-block record carrying a plain-text FINAL answer (so the loop stops on it)."""
    return CodeBlock(
        code="# FINAL(...) given as text",
        result=REPLResult(stdout="", stderr="", locals={}, execution_time=0.0, final_answer=answer),
    )
