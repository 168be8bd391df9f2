"""BM25, vectors, reciprocal rank fusion, the hybrid index and the embedders."""

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memcity_pipeline.search.bm25 import BM25Index, analyse
from memcity_pipeline.search.embeddings import (
    LocalMiniLMEmbedder,
    OpenAIEmbedder,
    embed_whole,
    embedder_from_setting,
    embedding_text,
    windows,
)
from memcity_pipeline.search.fusion import HybridIndex, rrf_fuse, score_fuse, vector_top_k

CORPUS = {
    "med": "The physician prescribed medication for the patient's hypertension.",
    "cook": "Whisk the eggs with sugar, then fold in the flour and bake for twenty minutes.",
    "car": "Replace the engine oil and the oil filter every ten thousand kilometres.",
    "tax": "Quarterly tax returns are due thirty days after the end of each quarter.",
    "git": "Rebase your feature branch onto main before opening a pull request.",
    "cat": "Cats sleep for most of the day and hunt at dusk.",
    "sea": "The tide rises twice a day because of the moon's gravity.",
    "bank": "Interest on savings accounts is paid monthly into the same account.",
    "hike": "Carry water, a map and warm clothes when walking in the mountains.",
    "piano": "Practise scales slowly with a metronome to build finger strength.",
    "plant": "Water succulents sparingly; their roots rot in soggy soil.",
    "train": "The night train to Vienna leaves the central station at ten.",
    "code": "Indexing the column speeds up queries that filter on it.",
    "index": "Search engines build inverted indexes over tokenised documents.",
    "moon": "Astronauts first walked on the moon in nineteen sixty-nine.",
    "coffee": "Grind the beans just before brewing for the best flavour.",
    "soccer": "The striker scored twice in the second half of the final.",
    "paint": "Let the first coat of paint dry completely before the second.",
    "bird": "Swallows migrate south to Africa every autumn.",
    "rain": "Umbrellas sell out quickly during the monsoon season.",
}
PARAPHRASE = "doctor gave drugs for high blood pressure"


def test_rrf_fuses_ranks_with_the_expected_order_and_scores() -> None:
    fused = rrf_fuse({"bm25": ["a", "b", "c"], "vector": ["c", "a", "d"]}, k=60)
    assert [h.id for h in fused] == ["a", "c", "b", "d"]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1].score == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2].score == pytest.approx(1 / 62)
    assert fused[0].retrievers == {"bm25": 1, "vector": 2}
    assert fused[3].retrievers == {"vector": 3}


def test_rrf_ties_duplicates_and_k() -> None:
    fused = rrf_fuse({"x": ["p", "q", "p"], "y": ["q", "p"]}, k=0)
    assert [(h.id, h.score) for h in fused] == [("p", 1.5), ("q", 1.5)]  # tie: id order
    assert fused[0].retrievers == {"x": 1, "y": 2}  # the repeated "p" counts at its first place
    assert rrf_fuse({}) == []
    with pytest.raises(ValueError):
        rrf_fuse({"x": ["a"]}, k=-1)


def test_vector_top_k_orders_by_cosine_and_honours_the_mask() -> None:
    matrix = np.array([[1, 0], [0, 1], [0.8, 0.6], [-1, 0]], dtype=np.float32)
    top = vector_top_k(matrix, np.array([2.0, 0.0]), 3)
    assert [p for p, _ in top] == [0, 2, 1]
    assert [s for _, s in top] == pytest.approx([1.0, 0.8, 0.0])
    assert [p for p, _ in vector_top_k(matrix, np.array([1.0, 0.0]), 10)] == [0, 2, 1, 3]
    mask = np.array([False, True, True, True])
    assert [p for p, _ in vector_top_k(matrix, np.array([1.0, 0.0]), 2, mask=mask)] == [2, 1]
    with pytest.raises(ValueError, match="dimension"):
        vector_top_k(matrix, np.ones(3), 1)


def test_weighted_rrf_scales_each_list() -> None:
    fused = rrf_fuse({"bm25": ["a", "b"], "vector": ["b", "a"]}, k=10, weights={"vector": 2.0})
    assert [h.id for h in fused] == ["b", "a"]
    assert fused[0].score == pytest.approx(1 / 12 + 2 / 11)
    with pytest.raises(ValueError, match="weights"):
        rrf_fuse({"x": ["a"]}, weights={"x": -1.0})


def test_score_fusion_normalises_each_list() -> None:
    fused = score_fuse(
        {"bm25": [("a", 12.0), ("b", 4.0), ("c", 2.0)], "vector": [("c", 0.9), ("b", 0.5)]},
        weights={"vector": 2.0},
    )
    assert [h.id for h in fused] == ["c", "a", "b"]
    assert [h.score for h in fused] == pytest.approx([2.0, 1.0, 0.2])
    assert fused[0].retrievers == {"bm25": 3, "vector": 1}
    assert [h.score for h in score_fuse({"x": [("p", 3.0), ("q", 3.0)]})] == [1.0, 1.0]


def test_an_item_with_several_vectors_scores_by_its_best() -> None:
    # item 0 owns rows 0-1, item 1 row 2, item 2 rows 3-5
    matrix = np.array([[0, 1], [0.6, 0.8], [0.8, 0.6], [-1, 0], [0, -1], [1, 0]], dtype=np.float32)
    parts = np.array([2, 1, 3])
    top = vector_top_k(matrix, np.array([1.0, 0.0]), 3, parts=parts)
    assert [p for p, _ in top] == [2, 1, 0]
    assert [s for _, s in top] == pytest.approx([1.0, 0.8, 0.6])
    masked = vector_top_k(matrix, np.array([1.0, 0.0]), 3, parts=parts, mask=np.array([1, 1, 0]))
    assert [p for p, _ in masked] == [1, 0]
    bm25 = BM25Index.build(["x", "y", "z"], ["alpha", "beta", "gamma"])
    index = HybridIndex(["x", "y", "z"], bm25, matrix, "m", parts=parts)
    assert [
        h.id for h in index.search("beta", k=3, query_vector=np.array([1.0, 0.0]), fusion="rrf")
    ][:2] == [
        "y",
        "z",
    ]
    with pytest.raises(ValueError, match="own"):
        HybridIndex(["x", "y", "z"], bm25, matrix, "m", parts=np.array([1, 1, 1]))


def test_windows_hold_a_long_text_whole_within_the_window() -> None:
    from memcity_pipeline.enrichment.tokens import count_tokens

    words = [f"word{i % 97}" for i in range(700)]
    lead = "Manual › Chapter two"
    text = lead + "\n\n" + " ".join(words)
    parts = windows(text, lead, 100)
    assert len(parts) > 2
    assert all(p.startswith(lead + "\n\n") and count_tokens(p) <= 100 for p in parts)
    bodies = [p.removeprefix(lead + "\n\n") for p in parts]
    assert " ".join(bodies).split() == words  # every word once, in order, none cut
    assert windows("short text", "", 100) == ["short text"]


def test_embed_whole_gives_a_long_text_several_vectors(minilm: LocalMiniLMEmbedder) -> None:
    long = "Heading\n\n" + " ".join(["The harbour crane lifts containers."] * 120)
    vectors, parts = embed_whole(minilm, ["a short one", long], ["", "Heading"])
    assert parts.tolist()[0] == 1 and parts.tolist()[1] >= 3
    assert vectors.shape == (int(parts.sum()), 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_bm25_analysis_stems_and_drops_stopwords() -> None:
    assert analyse("The Indexes of the INDEXING") == ["index", "index"]
    index = BM25Index.build(list(CORPUS), list(CORPUS.values()))
    hits = index.query("indexing documents", k=3)
    assert [i for i, _ in hits][:2] == ["index", "code"]
    assert all(score > 0 for _, score in hits)
    assert index.query("the and of", k=5) == []  # stopwords only
    assert index.query("zeppelin", k=5) == []  # unknown term
    mask = np.array([i != "index" for i in CORPUS])
    assert [i for i, _ in index.query("indexing documents", k=3, mask=mask)] == ["code"]


def test_bm25_save_and_load_give_the_same_results(tmp_path: Path) -> None:
    tmp_path = tmp_path / "indexes"
    index = BM25Index.build(list(CORPUS), list(CORPUS.values()))
    index.save(tmp_path / "bm25")
    index.save(tmp_path / "bm25")  # saving over an existing index replaces it
    loaded = BM25Index.load(tmp_path / "bm25")
    for query in ["oil engine", "moon gravity tide", "water", "quarterly tax returns"]:
        assert loaded.query(query, k=5) == index.query(query, k=5)
        assert loaded.query(query, k=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bm25"]  # no temporary leftovers
    empty = BM25Index.build([], [])
    empty.save(tmp_path / "empty")
    assert BM25Index.load(tmp_path / "empty").query("anything") == []
    termless = BM25Index.build(["a", "b"], ["x", ""])  # no word of two letters or more
    termless.save(tmp_path / "termless")
    assert BM25Index.load(tmp_path / "termless").query("x") == []
    assert len(BM25Index.load(tmp_path / "termless")) == 2
    with pytest.raises(FileNotFoundError):
        BM25Index.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="unique"):
        BM25Index.build(["a", "a"], ["x", "y"])


@pytest.fixture(scope="module")
def minilm() -> LocalMiniLMEmbedder:
    return LocalMiniLMEmbedder()


@pytest.mark.slow
def test_local_minilm_embeds_unit_vectors_offline(minilm: LocalMiniLMEmbedder) -> None:
    vectors = minilm.embed(["a cat on a mat", "a kitten on a rug", "quarterly tax returns", ""])
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    assert np.linalg.norm(vectors[:3], axis=1) == pytest.approx([1, 1, 1], abs=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    assert minilm.embed([]).shape == (0, 384)
    assert minilm.model_name == "all-MiniLM-L6-v2"


def _sample_corpus_paragraphs() -> list[str]:
    from memcity_pipeline.cli.runner import sample_corpus_dir

    texts: list[str] = []
    for path in sorted(sample_corpus_dir().rglob("*")):
        if path.suffix in (".md", ".txt", ".html"):
            body = path.read_text(encoding="utf-8", errors="replace")
            texts += [p for p in body.split("\n\n") if p.strip()]
    return texts


@pytest.mark.slow
def test_onnx_and_torch_give_the_same_vectors(minilm: LocalMiniLMEmbedder) -> None:
    texts = _sample_corpus_paragraphs()
    texts += ["", "ünïcödé – “quotes” 東京", "word " * 600]  # empty, non-ASCII, over the window
    torch_vectors = LocalMiniLMEmbedder(backend="torch").embed(texts, batch_size=16)
    onnx_vectors = minilm.embed(texts, batch_size=16)
    assert len(texts) > 100 and minilm.backend == "onnx"
    cosines = (onnx_vectors * torch_vectors).sum(axis=1)
    assert cosines.min() >= 0.999
    # The int8 model is close but not the same, so it has a name of its own (a switch
    # re-embeds everything).
    int8 = embedder_from_setting("local-int8", base_url=None, api_key=None)
    assert int8.model_name == "all-MiniLM-L6-v2-int8" != minilm.model_name
    int8_vectors = int8.embed(texts, batch_size=16)
    assert np.allclose(np.linalg.norm(int8_vectors[:-3], axis=1), 1.0, atol=1e-5)
    assert (int8_vectors[:-3] * onnx_vectors[:-3]).sum(axis=1).min() >= 0.97


@pytest.mark.slow
def test_onnx_export_is_cached_and_embedding_imports_no_torch(tmp_path: Path) -> None:
    from memcity_pipeline.search.onnx_minilm import ensure_model, model_path

    path = ensure_model(tmp_path)
    assert path == model_path(tmp_path) and path.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".onnx"] == [path.name]
    exported_at = path.stat().st_mtime_ns
    assert ensure_model(tmp_path).stat().st_mtime_ns == exported_at  # not exported twice

    code = (
        "import sys; from pathlib import Path;"
        "from memcity_pipeline.search.embeddings import LocalMiniLMEmbedder;"
        f"v = LocalMiniLMEmbedder(cache_dir=Path({str(tmp_path)!r})).embed(['a cat']);"
        "print(v.shape, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["(1,", "384)", "False", "False"]


@pytest.mark.slow
def test_hybrid_search_finds_a_paraphrase_bm25_misses(
    minilm: LocalMiniLMEmbedder, tmp_path: Path
) -> None:
    ids, texts = list(CORPUS), list(CORPUS.values())
    index = HybridIndex.build(ids, texts, None, minilm)
    assert index.bm25.query(PARAPHRASE, k=10) == []  # no shared term with the target

    hits = index.search(PARAPHRASE, k=3, candidates=5)
    assert hits[0].id == "med"
    assert hits[0].retrievers == {"vector": 1}
    assert hits[0].retriever_scores["vector"] > 0.3

    both = index.search("engine oil filter", k=3)
    assert both[0].id == "car" and both[0].retrievers == {"bm25": 1, "vector": 1}
    assert both[0].retriever_scores["bm25"] > 0

    index.save(tmp_path / "hybrid")
    loaded = HybridIndex.load(tmp_path / "hybrid", minilm)
    assert loaded.search(PARAPHRASE, k=3, candidates=5) == hits
    query_vector = minilm.embed([PARAPHRASE])[0]
    no_embedder = HybridIndex.load(tmp_path / "hybrid", mmap=True)
    assert no_embedder.search(PARAPHRASE, 3, 5, query_vector) == hits
    with pytest.raises(ValueError, match="query_vector"):
        no_embedder.search(PARAPHRASE)

    mask = np.array([i != "med" for i in ids])
    assert "med" not in {h.id for h in index.search(PARAPHRASE, k=20, mask=mask)}


def test_hybrid_index_refuses_a_different_query_model(tmp_path: Path) -> None:
    vectors = np.eye(3, 4, dtype=np.float32)
    index = HybridIndex.build(["a", "b", "c"], ["x", "y", "z"], vectors, None, model_name="m1")
    index.save(tmp_path / "h")

    class OtherModel:
        model_name = "m2"
        dimension = 4

        def embed(self, texts: Any, batch_size: int = 64) -> np.ndarray:
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="built with m1"):
        HybridIndex.load(tmp_path / "h", OtherModel())
    with pytest.raises(ValueError, match="empty"):
        index.search("  ", query_vector=np.ones(4))


def test_embedding_text_puts_header_summary_and_key_terms_before_the_text() -> None:
    text = embedding_text(
        "  Acme raised prices by 5%.  ", ["Acme", "pricing", "acme", " "], "Acme's 2024 price rise."
    )
    assert (
        text == "Acme's 2024 price rise.\n\nKey terms: Acme, pricing.\n\nAcme raised prices by 5%."
    )
    assert embedding_text("Body.", None, None, header="Prices › 2024") == "Prices › 2024\n\nBody."
    assert embedding_text("plain", None, None) == "plain"
    assert embedding_text("plain", [], "  ") == "plain"


class _EmbeddingsServer:
    """A real OpenAI-compatible `/v1/embeddings` endpoint on 127.0.0.1, scripted per request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.failures: list[int] = []  # status codes to answer with, one per request, first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), **body}
                )
                if outer.failures:
                    status = outer.failures.pop(0)
                    payload = json.dumps({"error": {"message": f"scripted {status}"}}).encode()
                    self.send_response(status)
                    self.send_header("Retry-After", "0")
                else:
                    data = [
                        {"object": "embedding", "index": i, "embedding": [float(len(t)), 3.0, 4.0]}
                        for i, t in enumerate(body["input"])
                    ]
                    payload = json.dumps(
                        {
                            "object": "list",
                            "model": body["model"],
                            "data": data[::-1],  # out of order: the client must sort by index
                            "usage": {"prompt_tokens": 1, "total_tokens": 1},
                        }
                    ).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def embeddings_server() -> Iterator[_EmbeddingsServer]:
    server = _EmbeddingsServer()
    yield server
    server.close()


def test_openai_embedder_batches_normalises_and_retries(
    embeddings_server: _EmbeddingsServer,
) -> None:
    embedder = embedder_from_setting(
        "openai:test-embed", base_url=embeddings_server.base_url, api_key="secret"
    )
    assert isinstance(embedder, OpenAIEmbedder)
    embedder.backoff_s = 0.01
    assert embedder.model_name == "openai:test-embed"
    embeddings_server.failures = [429, 500]
    texts = ["", "ab", "abcd", "x" * 12, "y"]
    vectors = embedder.embed(texts, batch_size=2)
    assert vectors.shape == (5, 3) and vectors.dtype == np.float32
    expected = np.array([[1, 3, 4], [2, 3, 4], [4, 3, 4], [12, 3, 4], [1, 3, 4]], dtype=float)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert vectors == pytest.approx(expected, abs=1e-6)
    assert embedder.dimension == 3
    assert embedder.retries == 2
    served = embeddings_server.requests
    assert [len(r["input"]) for r in served] == [2, 2, 2, 2, 1]  # two refused, then 3 batches
    assert {r["path"] for r in served} == {"/v1/embeddings"}
    assert {r["auth"] for r in served} == {"Bearer secret"}
    assert served[0]["input"][0] == " " and served[0]["model"] == "test-embed"


def test_openai_embedder_gives_up_after_its_retries(embeddings_server: _EmbeddingsServer) -> None:
    embedder = OpenAIEmbedder(
        "m", base_url=embeddings_server.base_url, api_key="k", max_retries=2, backoff_s=0.01
    )
    embeddings_server.failures = [503, 503, 503, 503]
    with pytest.raises(RuntimeError, match="failed after 3 tries"):
        embedder.embed(["text"])
    embeddings_server.failures = [400]  # a wrong request is not retried
    with pytest.raises(Exception, match="scripted 400"):
        embedder.embed(["text"])
    assert len(embeddings_server.requests) == 4


def test_embedder_from_setting_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="unknown embeddings setting"):
        embedder_from_setting("bert", base_url=None, api_key=None)
    local = embedder_from_setting("local", base_url=None, api_key=None)
    on_torch = embedder_from_setting("local-torch", base_url=None, api_key=None)
    assert isinstance(local, LocalMiniLMEmbedder) and local.backend == "onnx"
    assert isinstance(on_torch, LocalMiniLMEmbedder) and on_torch.backend == "torch"
    assert on_torch.model_name == local.model_name  # the same vectors: no re-embedding
