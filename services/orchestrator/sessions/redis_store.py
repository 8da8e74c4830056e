"""SessionStore on Redis (redis.asyncio): a hash per session, a list of messages, and the turn
lease as ``SET NX PX`` released by a compare-and-delete script, so it holds across replicas.

A session's proposed actions live under its key prefix: a hash (action id -> JSON) and a
list of ids in insertion order. Adding an action also reserves its id store-wide
(``<prefix>action:<id>``, ``SET NX``), because the idempotency key derives from the id alone.
Adding and transitioning are Lua scripts, atomic across replicas."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from services.orchestrator.loop.types import Action, ActionState, Message
from services.orchestrator.sessions import redis_scripts
from services.orchestrator.sessions.action_rules import check_replacement
from services.orchestrator.sessions.base import (
    UNFENCED,
    LeaseLost,
    SessionRecord,
    SessionState,
    TurnRecord,
)
from services.orchestrator.sessions.record_codec import session_fields, session_from_fields
from shared.errors import AlreadyExists, NotFound, Unavailable

P = ParamSpec("P")
R = TypeVar("R")


def _reachable(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """A Redis that cannot be reached (refused, reset, timed out) is UNAVAILABLE: retryable,
    and the client reconnects by itself when the server is back."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise Unavailable(
                "the session store cannot be reached; retry", reason="SESSION_STORE_UNAVAILABLE"
            ) from exc

    return call


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

    def _action_id_key(self, action_id: str) -> str:
        return f"{self._prefix}action:{action_id}"

    async def _fenced(
        self,
        session_id: str,
        token: int,
        queue: Callable[[Any], None],
        watch: Sequence[str] = (),
        before: Callable[[Any], Any] | None = None,
    ) -> list[Any]:
        """Runs the commands ``queue`` adds in one MULTI/EXEC. With a token, the transaction
        WATCHes the session's fencing token (and ``watch``) and runs only if the token is
        still ``token``: a newer lease holder in between makes it LeaseLost. ``before`` may
        read the watched keys (immediate mode) before the transaction starts."""
        token_key = self._key(session_id, "lease_token")
        async with self.client.pipeline(transaction=True) as pipe:
            if token != UNFENCED or watch:
                await pipe.watch(token_key, *watch)
                if token != UNFENCED and await pipe.get(token_key) != str(token):
                    raise LeaseLost(session_id)
                if before is not None:
                    await before(pipe)
                pipe.multi()  # type: ignore[no-untyped-call]
            queue(pipe)
            try:
                return list(await pipe.execute())
            except WatchError:
                raise LeaseLost(session_id) from None

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

    @_reachable
    async def create(self, record: SessionRecord) -> None:
        flat = [str(item) for pair in session_fields(record).items() for item in pair]
        created = await self.client.eval(  # type: ignore[misc]
            redis_scripts.CREATE_IF_ABSENT, 1, self._key(record.session_id), *flat
        )
        if not created:
            raise AlreadyExists(
                "a session with this id exists", metadata={"session_id": record.session_id}
            )

    @_reachable
    async def get(
        self, session_id: str, *, last_messages: int | None = None
    ) -> SessionRecord | None:
        # LRANGE of the list's tail; a window of 0 reads nothing (-0 would be the whole list).
        first = 0 if last_messages is None else -last_messages
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._key(session_id))
            if last_messages is not None and last_messages <= 0:
                pipe.lrange(self._key(session_id, "messages"), 1, 0)
            else:
                pipe.lrange(self._key(session_id, "messages"), first, -1)
            pipe.lrange(self._key(session_id, "action_ids"), 0, -1)
            pipe.hgetall(self._key(session_id, "actions"))
            data, raw_messages, action_ids, raw_actions = await pipe.execute()
        if not data:
            return None
        return session_from_fields(
            session_id,
            data,
            [Message.from_dict(json.loads(m)) for m in raw_messages],
            oldest_first(action_ids, raw_actions),
        )

    @_reachable
    async def append_messages(
        self,
        session_id: str,
        turn_index: int,
        messages: Sequence[Message],
        *,
        token: int = UNFENCED,
    ) -> None:
        if not messages:
            return
        encoded = [
            json.dumps({**m.to_dict(), "turn_index": turn_index}, separators=(",", ":"))
            for m in messages
        ]

        def queue(pipe: Any) -> None:
            pipe.rpush(self._key(session_id, "messages"), *encoded)
            pipe.hset(self._key(session_id), "updated_at", repr(time.time()))

        await self._fenced(session_id, token, queue)

    @_reachable
    async def update_counters(
        self,
        session_id: str,
        *,
        turn_count: int,
        task_tool_calls: int,
        task_time_used_s: float,
        token: int = UNFENCED,
    ) -> None:
        mapping = {
            "turn_count": turn_count,
            "task_tool_calls": task_tool_calls,
            "task_time_used_s": repr(task_time_used_s),
            "updated_at": repr(time.time()),
        }
        await self._fenced(
            session_id, token, lambda pipe: pipe.hset(self._key(session_id), mapping=mapping)
        )

    @_reachable
    async def end(self, session_id: str) -> bool:
        key = self._key(session_id)
        if not await self.client.exists(key):
            return False
        await self.client.hset(  # type: ignore[misc]
            key, mapping={"state": SessionState.ENDED.value, "updated_at": repr(time.time())}
        )
        return True

    @_reachable
    async def acquire_lease(self, session_id: str, owner: str, ttl_s: float) -> int:
        token = await self.client.eval(  # type: ignore[misc]
            redis_scripts.ACQUIRE_LEASE,
            2,
            self._key(session_id, "lease"),
            self._key(session_id, "lease_token"),
            owner,
            str(max(1, int(ttl_s * 1000))),
        )
        return int(token)

    @_reachable
    async def renew_lease(self, session_id: str, owner: str, token: int, ttl_s: float) -> bool:
        renewed = await self.client.eval(  # type: ignore[misc]
            redis_scripts.RENEW_LEASE,
            2,
            self._key(session_id, "lease"),
            self._key(session_id, "lease_token"),
            owner,
            str(token),
            str(max(1, int(ttl_s * 1000))),
        )
        return bool(int(renewed))

    @_reachable
    async def release_lease(self, session_id: str, owner: str) -> None:
        await self.client.eval(
            redis_scripts.RELEASE_LEASE, 1, self._key(session_id, "lease"), owner
        )  # type: ignore[misc]

    @_reachable
    async def add_action(self, action: Action, *, token: int = UNFENCED) -> None:
        sid, aid = action.session_id, action.action_id
        (outcome,) = await self._fenced(
            sid,
            token,
            lambda pipe: pipe.eval(
                redis_scripts.ADD_ACTION,
                4,
                self._key(sid),
                self._action_id_key(aid),
                self._key(sid, "actions"),
                self._key(sid, "action_ids"),
                aid,
                sid,
                encode_action(action),
            ),
        )
        if int(outcome) < 0:
            raise NotFound("no session with this id", metadata={"session_id": sid})
        if int(outcome) == 0:
            raise AlreadyExists("an action with this id exists", metadata={"action_id": aid})

    @_reachable
    async def get_action(self, session_id: str, action_id: str) -> Action | None:
        raw = await self.client.hget(self._key(session_id, "actions"), action_id)  # type: ignore[misc]
        return None if raw is None else Action.from_dict(json.loads(raw))

    @_reachable
    async def transition_action(
        self,
        session_id: str,
        action_id: str,
        *,
        expected: Sequence[ActionState],
        new: Action,
        token: int = UNFENCED,
    ) -> Action | None:
        check_replacement(session_id, action_id, new)
        (raw,) = await self._fenced(
            session_id,
            token,
            lambda pipe: pipe.eval(
                redis_scripts.TRANSITION_ACTION,
                1,
                self._key(session_id, "actions"),
                action_id,
                encode_action(new),
                *(state.value for state in expected),
            ),
        )
        return None if raw is None else Action.from_dict(json.loads(raw))

    @_reachable
    async def get_turn(self, session_id: str, request_id: str) -> TurnRecord | None:
        raw = await self.client.hget(self._key(session_id, "turns"), request_id)  # type: ignore[misc]
        if raw is None:
            return None
        data = json.loads(raw)
        return TurnRecord(session_id=session_id, request_id=request_id, **data)

    @_reachable
    async def put_turn(self, turn: TurnRecord, *, token: int) -> None:
        data = {
            "turn_index": turn.turn_index,
            "turn_id": turn.turn_id,
            "finished": turn.finished,
            "final_json": turn.final_json,
            "updated_at": time.time(),
        }
        key = self._key(turn.session_id, "turns")
        encoded = json.dumps(data, separators=(",", ":"))
        await self._fenced(
            turn.session_id, token, lambda pipe: pipe.hset(key, turn.request_id, encoded)
        )

    @_reachable
    async def record_tool_results(
        self, session_id: str, request_id: str, results: Mapping[str, str], *, token: int
    ) -> None:
        if not results:
            return
        key = self._key(session_id, f"tool_results:{request_id}")
        mapping = dict(results)
        await self._fenced(session_id, token, lambda pipe: pipe.hset(key, mapping=mapping))

    @_reachable
    async def tool_results(self, session_id: str, request_id: str) -> dict[str, str]:
        key = self._key(session_id, f"tool_results:{request_id}")
        found = await self.client.hgetall(key)  # type: ignore[misc]
        return {str(k): str(v) for k, v in found.items()}

    @_reachable
    async def discard_turn_messages(self, session_id: str, turn_index: int, *, token: int) -> int:
        key = self._key(session_id, "messages")
        kept: list[str] = []
        dropped = 0

        async def read(pipe: Any) -> None:
            nonlocal dropped
            for raw in await pipe.lrange(key, 0, -1):
                if json.loads(raw).get("turn_index") == turn_index:
                    dropped += 1
                else:
                    kept.append(raw)

        def queue(pipe: Any) -> None:
            pipe.delete(key)
            if kept:
                pipe.rpush(key, *kept)

        await self._fenced(session_id, token, queue, watch=[key], before=read)
        return dropped


def encode_action(action: Action) -> str:
    return json.dumps(action.to_dict(), separators=(",", ":"), sort_keys=True)


def oldest_first(action_ids: Sequence[str], raw_actions: dict[str, str]) -> list[Action]:
    """The actions by created_at; the (stable) sort keeps insertion order among ties."""
    actions = [Action.from_dict(json.loads(raw_actions[aid])) for aid in action_ids]
    return sorted(actions, key=lambda a: a.created_at)
