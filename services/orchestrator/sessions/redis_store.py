"""SessionStore on Redis (redis.asyncio): a hash per session, a list of messages, and the turn
lease as ``SET NX PX`` released by a compare-and-delete script, so it holds across replicas."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import redis.asyncio as aioredis

from services.orchestrator.loop.policy import Caps
from services.orchestrator.loop.types import Message
from services.orchestrator.sessions.base import SessionRecord, SessionState
from shared.errors import AlreadyExists

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


# Create the session hash only if the id is free, in one atomic step.
_CREATE_IF_ABSENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


class RedisSessionStore:
    def __init__(self, url: str, *, key_prefix: str = "agentmesh:") -> None:
        self._url = url
        self._prefix = key_prefix
        self._client: aioredis.Redis | None = None

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("the session store is not open")
        return self._client

    def _key(self, session_id: str, part: str = "") -> str:
        return f"{self._prefix}session:{session_id}{':' + part if part else ''}"

    async def open(self) -> None:
        self._client = aioredis.from_url(self._url, decode_responses=True)
        await self._client.ping()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def drop_keys(self) -> None:
        """Deletes every key under this store's prefix (tests isolate runs by prefix)."""
        async for key in self.client.scan_iter(match=f"{self._prefix}*"):
            await self.client.delete(key)

    async def create(self, record: SessionRecord) -> None:
        fields: dict[str | bytes, str | int | float] = {
            "state": record.state.value,
            "customer_id": record.customer_id,
            "caps_json": record.caps.model_dump_json(),
            "turn_count": record.turn_count,
            "task_tool_calls": record.task_tool_calls,
            "task_time_used_s": repr(record.task_time_used_s),
            "created_at": repr(record.created_at),
            "updated_at": repr(record.updated_at),
            "metadata_json": json.dumps(record.metadata, sort_keys=True),
        }
        flat = [str(item) for pair in fields.items() for item in pair]
        created = await self.client.eval(  # type: ignore[misc]
            _CREATE_IF_ABSENT, 1, self._key(record.session_id), *flat
        )
        if not created:
            raise AlreadyExists(
                "a session with this id exists", metadata={"session_id": record.session_id}
            )

    async def get(self, session_id: str) -> SessionRecord | None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._key(session_id))
            pipe.lrange(self._key(session_id, "messages"), 0, -1)
            data, raw_messages = await pipe.execute()
        if not data:
            return None
        return SessionRecord(
            session_id=session_id,
            caps=Caps.model_validate_json(data["caps_json"]),
            customer_id=data.get("customer_id", ""),
            state=SessionState(data["state"]),
            turn_count=int(data.get("turn_count", 0)),
            task_tool_calls=int(data.get("task_tool_calls", 0)),
            task_time_used_s=float(data.get("task_time_used_s", 0.0)),
            created_at=float(data["created_at"]),
            updated_at=float(data["updated_at"]),
            metadata=json.loads(data.get("metadata_json", "{}")),
            messages=[Message.from_dict(json.loads(m)) for m in raw_messages],
        )

    async def append_messages(
        self, session_id: str, turn_index: int, messages: Sequence[Message]
    ) -> None:
        if not messages:
            return
        encoded = [
            json.dumps({**m.to_dict(), "turn_index": turn_index}, separators=(",", ":"))
            for m in messages
        ]
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.rpush(self._key(session_id, "messages"), *encoded)
            pipe.hset(self._key(session_id), "updated_at", repr(time.time()))
            await pipe.execute()

    async def update_counters(
        self,
        session_id: str,
        *,
        turn_count: int,
        task_tool_calls: int,
        task_time_used_s: float,
    ) -> None:
        await self.client.hset(  # type: ignore[misc]
            self._key(session_id),
            mapping={
                "turn_count": turn_count,
                "task_tool_calls": task_tool_calls,
                "task_time_used_s": repr(task_time_used_s),
                "updated_at": repr(time.time()),
            },
        )

    async def end(self, session_id: str) -> bool:
        key = self._key(session_id)
        if not await self.client.exists(key):
            return False
        await self.client.hset(  # type: ignore[misc]
            key, mapping={"state": SessionState.ENDED.value, "updated_at": repr(time.time())}
        )
        return True

    async def acquire_lease(self, session_id: str, owner: str, ttl_s: float) -> bool:
        key = self._key(session_id, "lease")
        acquired = await self.client.set(key, owner, nx=True, px=max(1, int(ttl_s * 1000)))
        if acquired:
            return True
        return bool(await self.client.get(key) == owner)

    async def release_lease(self, session_id: str, owner: str) -> None:
        await self.client.eval(_RELEASE, 1, self._key(session_id, "lease"), owner)  # type: ignore[misc]
