"""A scripted OpenAI-compatible HTTP server for tests.

It speaks the parts of the OpenAI API the project uses, over real HTTP on 127.0.0.1:

- `POST /v1/chat/completions` (non-streaming, with `usage` and optionally `usage.cost`),
- `GET /v1/models`,
- `POST /v1/embeddings` (deterministic hashed vectors).

What a chat completion answers is scripted, in this order of precedence:

1. random faults (`fail_rate`, `seed`) for chaos tests,
2. the queue (`server.push("content")`, `server.push(Fault(...))`), first in first out,
3. the responder, `responder(request_json) -> str | dict | Fault`
   (str = assistant content, dict = the whole response body, Fault = an injected error),
4. otherwise the content `"ok"`.

Every request is recorded in `server.requests` with the server's own timestamps, and the server
tracks how many chat completions were in flight at once (`max_in_flight`).
"""

import hashlib
import json
import math
import random
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_MODEL = "scripted-model"
EMBEDDING_DIM = 64


@dataclass
class Fault:
    """An injected failure (or a slow answer) for one request.

    - `status`: HTTP status to send (429, 500, ... or 200 for a body-level fault or a delay).
    - `body`: raw body (str/bytes sent as is, dict as JSON); None means a default: an OpenAI-style
      error object for status >= 400, a normal completion of `content` for status 200.
    - `headers`: extra headers, e.g. `{"Retry-After": "1"}`.
    - `delay_s`: wait this long before answering (longer than the client timeout = a timeout).
    - `truncate`: announce a longer Content-Length than sent, then close the connection.
    - `content`: the assistant content of a status-200 answer without `body`.
    """

    status: int = 500
    body: str | bytes | dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    truncate: bool = False
    content: str = "ok"


Reply = str | dict[str, Any] | Fault
Responder = Callable[[dict[str, Any]], Reply]


@dataclass
class RecordedRequest:
    """One request as the server saw it (`t_received`/`t_done` are `time.monotonic()` values)."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: dict[str, Any] | None
    t_received: float
    t_done: float | None = None
    reply_kind: str = ""  # content | body | fault:<status> | error


def approx_tokens(text: str) -> int:
    """A stable, cheap token count for `usage` (words, at least 1 for non-empty text)."""
    return max(1, len(text.split())) if text else 0


def hashed_embedding(text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    """A deterministic unit vector: each word adds +-1 at a hashed position.

    Texts sharing words get a positive cosine similarity, which is enough for retrieval tests.
    """
    vec = [0.0] * dim
    for word in text.lower().split() or [""]:
        digest = hashlib.sha256(word.encode("utf-8")).digest()
        index = int.from_bytes(digest[:4], "little") % dim
        vec[index] += 1.0 if digest[4] % 2 == 0 else -1.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def completion_body(
    content: str, request: dict[str, Any], *, cost: float | None = None
) -> dict[str, Any]:
    """An OpenAI chat.completion response body for `content`, with `usage` (and `usage.cost`)."""
    prompt = " ".join(str(m.get("content") or "") for m in request.get("messages") or [])
    usage: dict[str, Any] = {
        "prompt_tokens": approx_tokens(prompt),
        "completion_tokens": approx_tokens(content),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if cost is not None:
        usage["cost"] = cost
    return {
        "id": f"chatcmpl-{hashlib.sha1(content.encode()).hexdigest()[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model") or DEFAULT_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }


def error_body(status: int, message: str) -> dict[str, Any]:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": "scripted_error", "code": status}}


def random_fault(rng: random.Random, hang_s: float = 0.0) -> Fault:
    """One of the transient faults a real provider produces; with `hang_s`, also an answer
    that comes only after `hang_s` seconds (longer than the client's timeout: a timeout)."""
    faults = [
        Fault(500),
        Fault(502),
        Fault(503),
        Fault(429, headers={"Retry-After": "0"}),
        Fault(200, body="{not json", headers={"Content-Type": "application/json"}),
        Fault(200, truncate=True),
    ]
    if hang_s > 0:
        faults.append(Fault(200, delay_s=hang_s))
    return rng.choice(faults)


class ScriptedLLMServer:
    """A real OpenAI-compatible HTTP server on 127.0.0.1 whose answers a test scripts.

    Use as a context manager, or call `start()` / `stop()`. `base_url` ends with `/v1`.
    """

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        cost: float | None = None,
        fail_rate: float = 0.0,
        seed: int | None = None,
        hang_s: float = 0.0,
        model: str = DEFAULT_MODEL,
    ) -> None:
        self.responder = responder
        self.cost = cost
        self.fail_rate = fail_rate
        self.hang_s = hang_s
        self.model = model
        self.requests: list[RecordedRequest] = []
        self.max_in_flight = 0
        self._rng = random.Random(seed)
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "ScriptedLLMServer":
        """Bind a free port and serve in a background thread."""
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="scripted-llm", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; delayed answers still pending are abandoned."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "ScriptedLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the scripted server is not running")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- scripting -------------------------------------------------------------------------

    def push(self, *replies: Reply) -> None:
        """Queue replies for the next chat completions (used before the responder)."""
        with self._lock:
            self._queue.extend(replies)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """The recorded chat completion requests, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    @property
    def call_count(self) -> int:
        """How many chat completions were requested."""
        return len(self.chat_requests)

    def reset(self) -> None:
        """Forget recorded requests, queued replies and the in-flight maximum."""
        with self._lock:
            self.requests.clear()
            self._queue.clear()
            self.max_in_flight = 0

    # -- internals used by the handler -----------------------------------------------------

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(record)

    def _enter_flight(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave_flight(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _next_reply(self, request: dict[str, Any]) -> Reply:
        with self._lock:
            if self.fail_rate and self._rng.random() < self.fail_rate:
                return random_fault(self._rng, self.hang_s)
            if self._queue:
                return self._queue.popleft()
        if self.responder is not None:
            return self.responder(request)
        return "ok"

    def _wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; False if the server is stopping."""
        return not self._stopping.wait(seconds)


def _make_handler(server: ScriptedLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: tests read `server.requests` instead."""

        def _read_json(self) -> dict[str, Any] | None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                return json.loads(raw) if raw else None
            except json.JSONDecodeError:
                return None

        def _send(
            self,
            status: int,
            payload: bytes,
            headers: dict[str, str] | None = None,
            *,
            truncate: bool = False,
        ) -> None:
            merged = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for key, value in merged.items():
                self.send_header(key, value)
            sent = payload[: len(payload) // 2] if truncate else payload
            self.send_header("Content-Length", str(len(payload)))
            if truncate:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(sent)
            self.wfile.flush()

        def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode("utf-8"), headers)

        def do_GET(self) -> None:
            record = RecordedRequest(
                "GET",
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                None,
                time.monotonic(),
                reply_kind="body",
            )
            server._record(record)
            if self.path.rstrip("/").endswith("/models"):
                data = [{"id": server.model, "object": "model", "owned_by": "scripted"}]
                self._send_json(200, {"object": "list", "data": data})
            else:
                self._send_json(404, error_body(404, f"no route {self.path}"))
            record.t_done = time.monotonic()

        def do_POST(self) -> None:
            body = self._read_json()
            record = RecordedRequest(
                "POST",
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                body,
                time.monotonic(),
            )
            server._record(record)
            try:
                if self.path.rstrip("/").endswith("/chat/completions"):
                    self._chat(body, record)
                elif self.path.rstrip("/").endswith("/embeddings"):
                    self._embeddings(body, record)
                else:
                    self._send_json(404, error_body(404, f"no route {self.path}"))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (e.g. its timeout): nothing to answer
            finally:
                record.t_done = time.monotonic()

        def _chat(self, body: dict[str, Any] | None, record: RecordedRequest) -> None:
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                record.reply_kind = "fault:400"
                self._send_json(400, error_body(400, "request body must have 'messages'"))
                return
            server._enter_flight()
            try:
                try:
                    reply = server._next_reply(body)
                except Exception:
                    record.reply_kind = "error"
                    self._send_json(500, error_body(500, traceback.format_exc()))
                    return
                self._answer(reply, body, record)
            finally:
                server._leave_flight()

        def _answer(self, reply: Reply, body: dict[str, Any], record: RecordedRequest) -> None:
            if isinstance(reply, str):
                record.reply_kind = "content"
                self._send_json(200, completion_body(reply, body, cost=server.cost))
            elif isinstance(reply, dict):
                record.reply_kind = "body"
                self._send_json(200, reply)
            elif isinstance(reply, Fault):
                record.reply_kind = f"fault:{reply.status}"
                if reply.delay_s and not server._wait(reply.delay_s):
                    return
                self._send(
                    reply.status,
                    _fault_payload(reply, body, server.cost),
                    reply.headers,
                    truncate=reply.truncate,
                )
            else:
                raise TypeError(f"a responder returned {type(reply).__name__}")

        def _embeddings(self, body: dict[str, Any] | None, record: RecordedRequest) -> None:
            record.reply_kind = "body"
            if not isinstance(body, dict) or "input" not in body:
                self._send_json(400, error_body(400, "request body must have 'input'"))
                return
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            dim = int(body.get("dimensions") or EMBEDDING_DIM)
            data = [
                {"object": "embedding", "index": i, "embedding": hashed_embedding(str(t), dim)}
                for i, t in enumerate(inputs)
            ]
            tokens = sum(approx_tokens(str(t)) for t in inputs)
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": data,
                    "model": body.get("model") or "scripted-embeddings",
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                },
            )

    return Handler


def _fault_payload(fault: Fault, request: dict[str, Any], cost: float | None) -> bytes:
    """The bytes a Fault answers with."""
    if isinstance(fault.body, bytes):
        return fault.body
    if isinstance(fault.body, str):
        return fault.body.encode("utf-8")
    if isinstance(fault.body, dict):
        return json.dumps(fault.body).encode("utf-8")
    if fault.status >= 400:
        return json.dumps(error_body(fault.status, f"scripted fault {fault.status}")).encode()
    return json.dumps(completion_body(fault.content, request, cost=cost)).encode("utf-8")
