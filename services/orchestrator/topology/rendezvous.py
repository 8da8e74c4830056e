"""Rendezvous (highest-random-weight) hashing: the replica a (session, lane) sticks to.

Every caller ranks the pool's endpoints by ``hash(key, endpoint)`` and takes the best live
one. When an endpoint leaves only the keys that ranked it first move (to their second
choice); when it comes back they return. No shared state, the same answer on every
orchestrator replica.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def score(key: str, endpoint: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{endpoint}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranked(key: str, endpoints: Iterable[str]) -> list[str]:
    """``endpoints`` best first for ``key`` (ties broken by name, so the order is total)."""
    return sorted(endpoints, key=lambda e: (-score(key, e), e))


def affinity_key(session_id: str, lane: str) -> str:
    return f"{session_id}\x00{lane}"
