"""Knowledge base: index persistence, Qdrant parity, keyword blending, recall@3 (real model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.tools.adapters.kb import (
    Article,
    Embedder,
    KnowledgeBase,
    LocalVectorIndex,
    MiniLmEmbedder,
    QdrantVectorIndex,
    VectorIndex,
    snippet,
)
from services.tools.kb_articles import build_articles
from tests.tools.fakes import HashEmbedder

QUERIES = Path(__file__).parent / "data" / "kb_queries.json"
RECALL_FLOOR = 0.8


def _index(kind: str, folder: Path) -> VectorIndex:
    if kind == "qdrant":
        return QdrantVectorIndex.create(collection="kb_test", path=folder / "qdrant")
    return LocalVectorIndex(folder / "local")


def test_corpus_is_large_varied_and_stable() -> None:
    articles = build_articles()
    assert len(articles) >= 60
    assert len({a.article_id for a in articles}) == len(articles)
    assert {a.category for a in articles} >= {"plans", "billing", "troubleshooting"}
    assert all(len(a.body) > 150 for a in articles)
    assert [a.article_id for a in build_articles()] == [a.article_id for a in articles]


@pytest.mark.parametrize("kind", ["local", "qdrant"])
async def test_index_is_persisted_and_reloaded_without_re_embedding(
    kind: str, tmp_path: Path
) -> None:
    embedder = HashEmbedder()
    articles = build_articles()
    kb = KnowledgeBase(embedder, _index(kind, tmp_path))
    assert await kb.start(articles) is True
    assert embedder.embedded_texts == len(articles)
    first = await kb.search("Error E611 SSO audience", top_k=3)
    await kb.close()

    reopened = HashEmbedder()
    kb2 = KnowledgeBase(reopened, _index(kind, tmp_path))
    assert await kb2.start(articles) is False  # already there: no reseed
    assert reopened.embedded_texts == 0
    assert kb2.article_count == len(articles)
    second = await kb2.search("Error E611 SSO audience", top_k=3)
    await kb2.close()
    assert second == first
    assert kb2.source == f"kb:{kind}"


async def test_a_different_model_rebuilds_the_local_index(tmp_path: Path) -> None:
    articles = build_articles()[:10]
    kb = KnowledgeBase(HashEmbedder(), LocalVectorIndex(tmp_path))
    await kb.start(articles)

    class OtherModel(HashEmbedder):
        name = "another-model"

    other = OtherModel()
    kb2 = KnowledgeBase(other, LocalVectorIndex(tmp_path))
    assert await kb2.start(articles) is True
    assert other.embedded_texts == len(articles)


async def test_results_carry_id_title_snippet_score(tmp_path: Path) -> None:
    kb = KnowledgeBase(HashEmbedder(), LocalVectorIndex(tmp_path))
    await kb.start(build_articles())
    result = await kb.search("what does error E310 mean", top_k=4)
    assert len(result["results"]) == 4
    top = result["results"][0]
    assert set(top) == {"article_id", "title", "category", "snippet", "score"}
    assert top["title"] == "Error E310: what it means"
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True)
    assert "E310" in top["snippet"]


async def test_keyword_blending_finds_exact_terms(tmp_path: Path) -> None:
    """With only keywords (dense weight 0) an error code still ranks its article first."""
    kb = KnowledgeBase(HashEmbedder(), LocalVectorIndex(tmp_path), dense_weight=0.0)
    await kb.start(build_articles())
    result = await kb.search("E720", top_k=1)
    assert result["results"][0]["title"] == "Error E720: what it means"


async def test_empty_knowledge_base_returns_no_results(tmp_path: Path) -> None:
    kb = KnowledgeBase(HashEmbedder(), LocalVectorIndex(tmp_path))
    assert await kb.start(None) is False
    assert (await kb.search("anything"))["results"] == []


def test_snippet_picks_the_relevant_sentences() -> None:
    body = "Intro sentence here. Refunds take ten days to arrive. Unrelated closing words."
    assert snippet(body, ["refund"]).startswith("Refunds take ten days")
    assert len(snippet("word " * 400, ["word"])) <= 320


async def _recall_at_3(embedder: Embedder, index: VectorIndex) -> float:
    labelled = json.loads(QUERIES.read_text())["queries"]
    kb = KnowledgeBase(embedder, index)
    await kb.start(build_articles())
    hits = 0
    misses = []
    for item in labelled:
        got = [r["article_id"] for r in (await kb.search(item["query"], top_k=3))["results"]]
        if set(got) & set(item["relevant"]):
            hits += 1
        else:
            misses.append((item["query"], got, item["relevant"]))
    await kb.close()
    recall = hits / len(labelled)
    print(f"\nrecall@3 = {recall:.3f} ({hits}/{len(labelled)}) on {index.name}; misses: {misses}")
    return recall


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "qdrant"])
async def test_recall_at_3_with_the_real_model(
    minilm: MiniLmEmbedder, kind: str, tmp_path: Path
) -> None:
    assert minilm.dim == 384
    recall = await _recall_at_3(minilm, _index(kind, tmp_path))
    assert recall >= RECALL_FLOOR


@pytest.mark.slow
async def test_embeddings_are_normalised_and_meaningful(minilm: MiniLmEmbedder) -> None:
    vectors = await minilm.embed(
        ["I was charged twice", "duplicate payment on my card", "configure SAML SSO"]
    )
    norms = (vectors**2).sum(axis=1)
    assert all(abs(n - 1.0) < 1e-4 for n in norms)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])


def test_article_round_trips_through_json() -> None:
    article = Article("KB-1", "T", "Body.", "billing", ("a", "b"))
    assert Article.from_json(json.loads(json.dumps(article.to_json()))) == article


async def test_query_embeddings_run_on_the_configured_intra_op_threads() -> None:
    """One embedding call computes on ``threads`` torch threads (OpenMP's count belongs to
    the thread that calls it: the worker the encode runs in), whatever torch's default is,
    and the caller's own count is left as it was."""
    import numpy as np
    import torch

    seen: list[int] = []

    class Model:
        def get_sentence_embedding_dimension(self) -> int:
            return 384

        def encode(self, texts: list[str], **kwargs: object) -> object:
            seen.append(torch.get_num_threads())
            return np.ones((len(texts), 384), dtype=np.float32)

    before = torch.get_num_threads()
    for threads in (1, 2):
        embedder = MiniLmEmbedder(Model(), name="spy", threads=threads)
        vectors = await embedder.embed(["refund for a duplicate charge"])
        assert vectors.shape == (1, 384)
    assert seen == [1, 2]
    assert torch.get_num_threads() == before


@pytest.mark.slow
async def test_the_real_model_encodes_on_the_configured_threads_alike(
    minilm: MiniLmEmbedder,
) -> None:
    """The same on the real model (its encode wrapped to note torch's thread count): the
    setting reaches sentence-transformers' encode, and the vectors do not depend on it."""
    import numpy as np
    import torch

    real = minilm._model
    seen: list[int] = []

    class Noting:
        def get_embedding_dimension(self) -> int:
            return int(real.get_embedding_dimension())

        def encode(self, texts: list[str], **kwargs: object) -> object:
            seen.append(torch.get_num_threads())
            return real.encode(texts, **kwargs)

    texts = ["refund for a duplicate charge", "reset my password"]
    before = torch.get_num_threads()
    vectors = [
        await MiniLmEmbedder(Noting(), name="noted", threads=threads).embed(texts)
        for threads in (1, 2)
    ]
    assert seen == [1, 2]
    assert vectors[0].shape == (2, 384)
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)
    assert torch.get_num_threads() == before
