"""One client for every LLM call: an OpenAI-compatible chat API with retries, structured
output, a persistent cache, bounded concurrency and per-call accounting.

Retries follow the shared policy of `memcity_pipeline.retry`: timeouts, connection errors,
HTTP 408, 409, 429 and 5xx, and answers without a usable body are retried with exponential
backoff and full jitter (honouring Retry-After, capped); every other 4xx fails at once.
Tokens and cost are `memcity_pipeline.llm.usage.Usage` values.

Plain Python (no Dagster): `memcity_pipeline.resources.llm.LLMResource` builds it from settings.

This module stays whole: structured output, the repair request, the cache, the concurrency bound
and the accounting all act on the same call.
"""

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import openai
from openai import OpenAI
from pydantic import BaseModel, ValidationError

from memcity_pipeline.llm.cache import CachedAnswer, LLMCache, cache_key
from memcity_pipeline.llm.cache_postgres import PostgresLLMCache
from memcity_pipeline.llm.slots import Slots
from memcity_pipeline.llm.usage import Usage, total
from memcity_pipeline.retry import (
    RetriesExhausted,
    Retryable,
    RetryPolicy,
    Transient,
    classify_failure,
    is_transient_status,
    retry_after_of,
    retry_call,
)
from memcity_pipeline.retry import parse_retry_after as parse_retry_after  # re-exported

log = logging.getLogger(__name__)

StructuredMode = Literal["json_schema", "json_object_schema", "json_object"]
STRUCTURED_MODES: tuple[str, ...] = ("json_schema", "json_object_schema", "json_object")

# Placeholder key for servers that need none: the openai package insists on some key, and an
# explicit value keeps it from reading OPENAI_API_KEY from the environment.
NO_API_KEY = "not-needed"


@dataclass
class LLMResult:
    """One completed call.

    `cached` answers carry the tokens and cost recorded when they were first computed, but they
    count as zero new spend in `LLMStats`. `attempts` counts HTTP requests (0 for a cache hit).
    """

    text: str
    parsed: BaseModel | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    cached: bool
    attempts: int
    latency_s: float

    @property
    def usage(self) -> Usage:
        """The tokens and cost of this answer, as one call (recorded ones for a cache hit)."""
        return Usage(self.prompt_tokens, self.completion_tokens, self.cost_usd, 1)


class LLMError(Exception):
    """A call that failed for good: after all retries, or at once for a request the provider
    rejects (4xx other than 408, 409 and 429). The message says why (status, timeout, ...)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class StructuredOutputError(LLMError):
    """The answer was not valid JSON for the schema, even after one repair request."""

    def __init__(self, message: str, *, raw_text: str) -> None:
        super().__init__(message)
        self.raw_text = raw_text


@dataclass
class LLMStats:
    """Thread-safe counters of one client.

    - `calls`: `complete()` calls (cache hits included), `cache_hits`: those served from cache;
    - `requests`: HTTP requests sent (retries and repairs included);
    - `prompt_tokens`, `completion_tokens`, `cost_usd`: new spend only (not cache hits), kept
      as one `Usage` (`usage()`); `cost_usd` stays None until some answer reports a cost;
    - `failures`: calls that raised; `retries`: transport retries; `repairs`: repair requests;
    - `rejected`: answers the caller's `accept` refused (not cached).
    """

    calls: int = 0
    cache_hits: int = 0
    requests: int = 0
    failures: int = 0
    retries: int = 0
    repairs: int = 0
    rejected: int = 0
    _spent: Usage = field(default_factory=Usage)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, spent: Usage | None = None, **counts: int) -> None:
        """Add new spend and counter increments atomically."""
        with self._lock:
            if spent is not None:
                self._spent = self._spent + spent
            for name, delta in counts.items():
                setattr(self, name, getattr(self, name) + delta)

    @property
    def prompt_tokens(self) -> int:
        return self._spent.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._spent.completion_tokens

    @property
    def cost_usd(self) -> float | None:
        return self._spent.cost_usd

    def usage(self) -> Usage:
        """The new spend: tokens and cost of answers from the API (not cache hits), over the
        `complete()` calls not served from the cache."""
        with self._lock:
            return Usage(
                self._spent.prompt_tokens,
                self._spent.completion_tokens,
                self._spent.cost_usd,
                self.calls - self.cache_hits,
            )

    def snapshot(self) -> dict[str, Any]:
        """The counters as a plain dict (a consistent copy)."""
        with self._lock:
            return {
                "calls": self.calls,
                "cache_hits": self.cache_hits,
                "requests": self.requests,
                "prompt_tokens": self._spent.prompt_tokens,
                "completion_tokens": self._spent.completion_tokens,
                "cost_usd": self._spent.cost_usd,
                "failures": self.failures,
                "retries": self.retries,
                "repairs": self.repairs,
                "rejected": self.rejected,
            }


@dataclass
class _Answer:
    """One HTTP answer, already checked to have a message; `usage` is this request's tokens
    and cost, `attempts` the HTTP requests it took."""

    text: str
    model: str
    usage: Usage
    attempts: int = 1


_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def extract_json_text(text: str) -> str:
    """The JSON inside `text`: unwraps ``` fences; else the outermost {...} if there is prose."""
    stripped = text.strip()
    match = _FENCE.match(stripped)
    if match:
        return match.group(1).strip()
    if stripped.startswith(("{", "[")):
        return stripped
    start, end = stripped.find("{"), stripped.rfind("}")
    if 0 <= start < end:
        return stripped[start : end + 1]
    return stripped


def parse_structured(text: str, schema: type[BaseModel]) -> BaseModel:
    """Validate `text` against `schema`; raises ValueError (JSON or validation) with details."""
    candidate = extract_json_text(text)
    try:
        # strict=False: raw newlines and tabs inside strings are common in model output.
        data = json.loads(candidate, strict=False)
    except json.JSONDecodeError as exc:
        raise ValueError(f"(root): Invalid JSON: {exc}") from exc
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_short_validation_error(exc)) from exc


def _short_validation_error(exc: ValidationError, limit: int = 8) -> str:
    """A compact, model-readable description of a pydantic error."""
    lines = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        lines.append(f"{loc}: {err.get('msg')}")
    return "; ".join(lines)


def schema_response_format(schema: type[BaseModel], mode: str) -> dict[str, Any]:
    """The `response_format` to send for `schema` in a structured mode."""
    json_schema = schema.model_json_schema()
    if mode == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": _schema_name(schema), "schema": json_schema, "strict": False},
        }
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": json_schema}
    if mode == "json_object":
        return {"type": "json_object"}
    raise ValueError(f"structured_mode must be one of {STRUCTURED_MODES}, not {mode!r}")


def _schema_name(schema: type[BaseModel]) -> str:
    """A name OpenAI accepts (letters, digits, _ and -, at most 64)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", schema.__name__)[:64] or "output"


def with_schema_instructions(
    messages: list[dict[str, str]], schema: type[BaseModel]
) -> list[dict[str, str]]:
    """Messages with the JSON schema spelled out in the system prompt (for `json_object` mode)."""
    note = "Reply with one JSON object only, no prose, matching this JSON schema:\n" + json.dumps(
        schema.model_json_schema(), separators=(",", ":")
    )
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0].get('content', '')}\n\n{note}"
    else:
        out.insert(0, {"role": "system", "content": note})
    return out


def repair_messages(
    messages: list[dict[str, str]], bad_text: str, error: str
) -> list[dict[str, str]]:
    """The conversation asking the model to correct an invalid structured answer."""
    return [
        *messages,
        {"role": "assistant", "content": bad_text},
        {
            "role": "user",
            "content": "Your reply is not valid JSON for the required schema. Error: "
            f"{error}\nReply with the corrected JSON object only, nothing else.",
        },
    ]


class LLMClient:
    """A thread-safe client of one OpenAI-compatible chat API.

    At most `max_concurrency` calls are in flight. `replica_urls` are more servers of the same
    model, each taking one call at a time (the embedded model's processes): then the bound is
    one call per server, `base_url`'s included, and a call goes to a free one (`llm.slots`).

    Retries timeouts, connection errors, 408, 409, 429 and 5xx up to `max_retries` times, with
    exponential backoff and full jitter (`backoff_base_s`, at most `backoff_max_s`), honouring
    Retry-After (capped at `max_retry_after_s`); fails at once on other 4xx.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        model: str,
        sub_model: str | None = None,
        structured_mode: StructuredMode = "json_schema",
        cache_dir: Path | None,
        max_concurrency: int = 4,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        extra_body: dict[str, Any] | None = None,
        context_window: int = 8192,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_retry_after_s: float = 60.0,
        cache_url: str | None = None,
        replica_urls: Sequence[str] = (),
    ) -> None:
        if structured_mode not in STRUCTURED_MODES:
            raise ValueError(
                f"structured_mode must be one of {STRUCTURED_MODES}, not {structured_mode!r}"
            )
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if not model:
            raise ValueError("an LLM model name is required")
        self.base_url = base_url
        self.model = model
        self.sub_model = sub_model or model
        self.structured_mode: StructuredMode = structured_mode
        urls = [base_url, *replica_urls]
        self._slots = Slots(list(range(len(urls))) if replica_urls else [0] * max_concurrency)
        self.max_concurrency = len(self._slots)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.extra_body = dict(extra_body or {})
        self.context_window = context_window
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.stats = LLMStats()
        self.cache: LLMCache | PostgresLLMCache | None = (
            PostgresLLMCache(cache_url)  # shared by every machine using this database
            if cache_url
            else LLMCache(cache_dir)
            if cache_dir is not None
            else None
        )
        self._backends = [
            OpenAI(base_url=url, api_key=api_key or NO_API_KEY, max_retries=0, timeout=timeout_s)
            for url in urls
        ]

    def __repr__(self) -> str:
        return f"LLMClient(base_url={self.base_url!r}, model={self.model!r})"

    @property
    def retry_policy(self) -> RetryPolicy:
        """The retry policy of this client's HTTP requests (from its settings)."""
        return RetryPolicy(
            attempts=self.max_retries + 1,
            base_delay_s=self.backoff_base_s,
            max_delay_s=self.backoff_max_s,
            max_retry_after_s=self.max_retry_after_s,
        )

    # -- public API ------------------------------------------------------------------------

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        model: str | None = None,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        schema: type[BaseModel] | None = None,
        use_cache: bool = True,
        time_limit_s: float | None = None,
        accept: Callable[[LLMResult], bool] | None = None,
    ) -> LLMResult:
        """One chat completion; with `schema`, the answer validated into `parsed`.

        `use_cache=False` neither reads nor writes the cache. `accept` is the caller's own
        verdict on an answer: one it refuses is returned but never cached, and a cached answer
        it refuses is not served (the model is asked again), so a retry of a rejected answer
        never gets that answer back from the cache. `time_limit_s` bounds the whole
        call (waits for a free slot, retries and a repair included): each HTTP request gets
        the time left as its timeout (never more than the client's `timeout_s`), so a request
        still unanswered then is dropped, and no request starts once the time is spent.
        Raises LLMError (transport, after retries, or out of time) or StructuredOutputError
        (invalid twice).
        """
        started = time.monotonic()
        until = None if time_limit_s is None else started + time_limit_s
        model = model or self.model
        self.stats.add(calls=1)
        send_messages = messages
        response_format = None
        if schema is not None:
            response_format = schema_response_format(schema, self.structured_mode)
            if self.structured_mode == "json_object":
                send_messages = with_schema_instructions(messages, schema)
        key = cache_key(
            model=model,
            messages=send_messages,
            temperature=temperature,
            max_tokens=max_tokens,
            response_format=response_format,
        )
        if use_cache and self.cache is not None:
            hit = self._from_cache(key, schema, started)
            if hit is not None and (accept is None or accept(hit)):
                self.stats.add(cache_hits=1)
                return hit
        try:
            result = self._call(
                send_messages,
                model,
                temperature,
                max_tokens,
                schema,
                response_format,
                started,
                until,
            )
        except LLMError:
            self.stats.add(failures=1)
            raise
        if accept is not None and not accept(result):
            self.stats.add(rejected=1)
        elif use_cache and self.cache is not None:
            answer = CachedAnswer(
                result.model,
                result.text,
                result.prompt_tokens,
                result.completion_tokens,
                result.cost_usd,
            )
            self.cache.put(key, answer)
        return result

    def complete_many(
        self, requests: Sequence[dict[str, Any]], **defaults: Any
    ) -> list[LLMResult | LLMError]:
        """Run many `complete()` calls concurrently (bounded by `max_concurrency`), in order.

        Each request is a dict of `complete()` keyword arguments (`messages` required);
        `defaults` apply where a request does not say. A failed call is its LLMError, in place.
        """
        if not requests:
            return []

        def run(request: dict[str, Any]) -> LLMResult | LLMError:
            kwargs = {**defaults, **request}
            try:
                return self.complete(kwargs.pop("messages"), **kwargs)
            except LLMError as exc:
                return exc

        workers = min(self.max_concurrency, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llm") as pool:
            return list(pool.map(run, requests))

    def close(self) -> None:
        """Release the HTTP connections and the cache file."""
        for backend in self._backends:
            backend.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> "LLMClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _from_cache(
        self, key: str, schema: type[BaseModel] | None, started: float
    ) -> LLMResult | None:
        """A cached result, or None (missing, or no longer valid for the schema)."""
        assert self.cache is not None
        hit = self.cache.get(key)
        if hit is None:
            return None
        parsed = None
        if schema is not None:
            try:
                parsed = parse_structured(hit.text, schema)
            except ValueError:
                return None
        return LLMResult(
            text=hit.text,
            parsed=parsed,
            model=hit.model,
            prompt_tokens=hit.prompt_tokens,
            completion_tokens=hit.completion_tokens,
            cost_usd=hit.cost_usd,
            cached=True,
            attempts=0,
            latency_s=time.monotonic() - started,
        )

    def _call(
        self,
        messages: list[dict[str, str]],
        model: str,
        temperature: float,
        max_tokens: int | None,
        schema: type[BaseModel] | None,
        response_format: dict[str, Any] | None,
        started: float,
        until: float | None = None,
    ) -> LLMResult:
        """Send, validate, repair once if needed; totals cover every request of the call
        (which ends by `until`, a `time.monotonic()` value, when given)."""
        first = self._send(messages, model, temperature, max_tokens, response_format, until)
        answers = [first]
        parsed = None
        text = first.text
        if schema is not None:
            try:
                parsed = parse_structured(first.text, schema)
            except ValueError as exc:
                self.stats.add(repairs=1)
                log.info("structured answer invalid (%s); asking for a repair", exc)
                fix = repair_messages(messages, first.text, str(exc))
                second = self._send(fix, model, temperature, max_tokens, response_format, until)
                answers.append(second)
                text = second.text
                try:
                    parsed = parse_structured(second.text, schema)
                except ValueError as exc2:
                    raise StructuredOutputError(
                        f"{model} did not return valid JSON for {schema.__name__} after one "
                        f"repair: {exc2}",
                        raw_text=second.text,
                    ) from exc2
        spent = total(a.usage for a in answers)
        return LLMResult(
            text=text,
            parsed=parsed,
            model=answers[-1].model,
            prompt_tokens=spent.prompt_tokens,
            completion_tokens=spent.completion_tokens,
            cost_usd=spent.cost_usd,
            cached=False,
            attempts=sum(a.attempts for a in answers),
            latency_s=time.monotonic() - started,
        )

    def _send(
        self,
        messages: list[dict[str, str]],
        model: str,
        temperature: float,
        max_tokens: int | None,
        response_format: dict[str, Any] | None,
        until: float | None = None,
    ) -> _Answer:
        """One chat completion over HTTP under the retry policy, ending by `until` (a
        `time.monotonic()` value) when given; spend goes into `stats`."""
        params: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "temperature": temperature,
        }
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if response_format is not None:
            params["response_format"] = response_format
        if self.extra_body:
            params["extra_body"] = self.extra_body
        try:
            done = retry_call(
                lambda: self._attempt(params, until),
                self.retry_policy,
                what=f"LLM call to {model}",
                classify=_classify,
                on_retry=lambda _failure: self.stats.add(retries=1),
                logger=log,
            )
        except RetriesExhausted as exc:
            raise LLMError(
                f"LLM call to {model} at {self.base_url} failed after {exc.attempts} "
                f"attempt(s): {exc.last}"
            ) from exc.last
        done.value.attempts = done.attempts
        return done.value

    def _delay(self, attempt: int, retry_after_s: float | None) -> float:
        """Seconds before retry number `attempt`: Retry-After (capped), else full jitter."""
        return self.retry_policy.delay(attempt, retry_after_s)

    def _attempt(self, params: dict[str, Any], until: float | None = None) -> _Answer:
        """One HTTP request under the concurrency bound, within `until` (a `time.monotonic()`
        value) when given; classifies every failure."""
        slot = self._slots.acquire(None if until is None else until - time.monotonic())
        if slot is None:
            raise self._out_of_time(params["model"])
        try:
            timeout = self._request_timeout(until)
            if timeout <= 0:
                raise self._out_of_time(params["model"])
            self.stats.add(requests=1)
            response = self._request(self._backends[self._slots.backends[slot]], params, timeout)
        finally:
            self._slots.release(slot)
        answer = _read_answer(response, params["model"])
        self.stats.add(answer.usage)
        return answer

    def _request_timeout(self, until: float | None) -> float:
        """The timeout of the next HTTP request: the client's, or less when `until` is nearer."""
        return self.timeout_s if until is None else min(self.timeout_s, until - time.monotonic())

    def _out_of_time(self, model: str) -> LLMError:
        return LLMError(f"LLM call to {model} at {self.base_url} ran out of its time limit")

    def _request(self, backend: OpenAI, params: dict[str, Any], timeout: float) -> Any:
        """The HTTP request itself (`timeout` seconds at most); every failure classified."""
        try:
            return backend.chat.completions.create(**params, timeout=timeout)
        except openai.APITimeoutError as exc:
            raise Transient(f"timed out after {round(timeout, 2):g}s") from exc
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise Transient(f"connection error ({type(cause).__name__}: {cause})") from exc
        except openai.APIStatusError as exc:
            raise self._classify_status(exc) from exc
        except openai.APIResponseValidationError as exc:
            raise Transient(f"malformed response: {exc}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Transient(f"response body is not valid JSON: {exc}") from exc

    def _classify_status(self, exc: openai.APIStatusError) -> Exception:
        """A Transient for 408, 409, 429 and 5xx (with Retry-After), an LLMError for other
        statuses."""
        status = exc.status_code
        detail = _error_detail(exc)
        if is_transient_status(status):
            return Transient(f"HTTP {status}: {detail}", retry_after_of(exc))
        return LLMError(
            f"LLM request to {self.base_url} rejected with HTTP {status}: {detail}", status=status
        )


def _classify(exc: BaseException) -> Retryable | None:
    """Only the failures `_attempt` classified as transient are retried."""
    return classify_failure(exc) if isinstance(exc, Transient) else None


def _error_detail(exc: openai.APIStatusError) -> str:
    """The provider's error message, short."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message:
            return str(message)[:500]
    return str(exc.message)[:500]


def _read_answer(response: Any, requested_model: str) -> _Answer:
    """Content and usage of a ChatCompletion; a body without a message is transient."""
    choices = getattr(response, "choices", None)
    if not choices:
        error = getattr(response, "error", None) or (
            response.model_extra.get("error") if hasattr(response, "model_extra") else None
        )
        what = f"error in body: {error}" if error else f"no choices in response: {response!r}"
        raise Transient(what[:500])
    message = choices[0].message
    text = (message.content if message is not None else None) or ""
    usage = getattr(response, "usage", None)
    prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    cost = getattr(usage, "cost", None) if usage is not None else None
    if cost is None and usage is not None and usage.model_extra:
        cost = usage.model_extra.get("cost")
    return _Answer(
        text=text,
        model=getattr(response, "model", None) or requested_model,
        usage=Usage(
            prompt_tokens, completion_tokens, float(cost) if isinstance(cost, int | float) else None
        ),
    )
