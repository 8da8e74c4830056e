"""The lane directory: every lane's pool of inference endpoints, live and verified.

An endpoint is one inference process (``ip:port``); pools share endpoints by address (a
process hosting planner and heavy sits in both pools, behind one channel). ``refresh``
re-resolves every ``dns:///`` target (the A records of a headless Service), opens channels to
new endpoints, closes those that left, and asks each endpoint's ``ListLanes`` which lanes it
hosts, their state and in-flight counts. A target configured for a lane it does not host is
a configuration error (``problems``); warm-up refuses to start on one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from agentmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from services.orchestrator.clients import GrpcInference
from services.orchestrator.topology.rendezvous import ranked
from services.orchestrator.topology.settings import DNS_PREFIX, TopologySettings

log = logging.getLogger("agentmesh.orchestrator.topology")

ChannelFactory = Callable[[str], grpc.aio.Channel]
# (host, port) -> the addresses ("ip:port") the name resolves to now.
Resolver = Callable[[str, int], Awaitable[list[str]]]
LIST_LANES_TIMEOUT_S = 2.0


async def dns_resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (a headless Service: one per ready pod)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found = set()
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        found.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(found)


@dataclass
class LaneLoad:
    """A lane as one endpoint's last ListLanes reported it."""

    serving: bool
    in_flight: int
    max_concurrency: int


@dataclass
class Endpoint:
    address: str
    channel: grpc.aio.Channel
    client: GrpcInference
    # Lanes from the last ListLanes; empty until one answered.
    lanes: dict[str, LaneLoad] = field(default_factory=dict)
    reachable: bool = False
    # Skipped until then after a call found it unavailable.
    down_until: float = 0.0
    # Per lane: skipped until then after an admission refusal (RESOURCE_EXHAUSTED).
    full_until: dict[str, float] = field(default_factory=dict)
    # Per lane: this orchestrator's calls in flight now, and at the last ListLanes.
    local_in_flight: dict[str, int] = field(default_factory=dict)
    _local_at_refresh: dict[str, int] = field(default_factory=dict)
    last_error: str = ""

    def load(self, lane: str) -> int:
        """In-flight calls on ``lane``: others' (as of ListLanes) plus ours now."""
        reported = self.lanes.get(lane)
        ours = self.local_in_flight.get(lane, 0)
        if reported is None:
            return ours
        others = max(0, reported.in_flight - self._local_at_refresh.get(lane, 0))
        return others + ours

    def begin(self, lane: str) -> None:
        self.local_in_flight[lane] = self.local_in_flight.get(lane, 0) + 1

    def end(self, lane: str) -> None:
        self.local_in_flight[lane] = max(0, self.local_in_flight.get(lane, 0) - 1)


class LaneDirectory:
    """Lane -> live endpoints; see the module docstring."""

    def __init__(
        self,
        settings: TopologySettings,
        channel_factory: ChannelFactory,
        *,
        resolver: Resolver = dns_resolve,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._channel_factory = channel_factory
        self._resolver = resolver
        self._clock = clock
        self._endpoints: dict[str, Endpoint] = {}
        # Lane -> addresses of its pool, as of the last refresh.
        self._pools: dict[str, list[str]] = {lane: [] for lane in settings.lanes}
        self._problems: list[str] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()

    # ------------------------------------------------------------------ reading

    @property
    def lanes(self) -> list[str]:
        return list(self.settings.lanes)

    def problems(self) -> list[str]:
        """Configuration errors found by the last refresh (a target not hosting its lane)."""
        return list(self._problems)

    def pool(self, lane: str) -> list[Endpoint]:
        return [self._endpoints[a] for a in self._pools.get(lane, []) if a in self._endpoints]

    def live(self, lane: str) -> list[Endpoint]:
        """Endpoints of ``lane``'s pool that answered ListLanes with the lane SERVING and
        did not fail a call since (or whose back-off ran out)."""
        now = self._clock()
        return [
            e
            for e in self.pool(lane)
            if e.reachable
            and now >= e.down_until
            and (load := e.lanes.get(lane)) is not None
            and load.serving
        ]

    def overloaded(self, endpoint: Endpoint, lane: str) -> bool:
        if self._clock() < endpoint.full_until.get(lane, 0.0):
            return True
        load = endpoint.lanes.get(lane)
        if load is None or load.max_concurrency <= 0:
            return False
        return endpoint.load(lane) >= load.max_concurrency * self.settings.overload_fraction

    def candidates(self, lane: str, key: str) -> list[Endpoint]:
        """Live endpoints of ``lane`` in rendezvous order for ``key``; overloaded ones last
        (still tried: their admission may have room again)."""
        live = {e.address: e for e in self.live(lane)}
        order = [live[a] for a in ranked(key, live)]
        return [e for e in order if not self.overloaded(e, lane)] + [
            e for e in order if self.overloaded(e, lane)
        ]

    def describe(self) -> dict[str, list[str]]:
        """Lane -> "address (state)" for logs and errors."""
        out: dict[str, list[str]] = {}
        for lane in self._pools:
            live = {e.address for e in self.live(lane)}
            out[lane] = [
                f"{e.address} ({'live' if e.address in live else e.last_error or 'down'})"
                for e in self.pool(lane)
            ]
        return out

    # ------------------------------------------------------------------ call outcomes

    def mark_down(self, endpoint: Endpoint, why: str) -> None:
        endpoint.down_until = self._clock() + self.settings.dead_retry_s
        endpoint.last_error = why
        log.warning("inference endpoint %s is down: %s", endpoint.address, why)
        self.changed.set()

    def mark_full(self, endpoint: Endpoint, lane: str, retry_after_s: float) -> None:
        endpoint.full_until[lane] = self._clock() + max(0.05, retry_after_s)

    def mark_not_hosting(self, endpoint: Endpoint, lane: str) -> None:
        """The endpoint answered NOT_FOUND for ``lane``: it no longer hosts it."""
        endpoint.lanes.pop(lane, None)
        self.changed.set()

    # ------------------------------------------------------------------ refresh

    async def refresh(self) -> list[str]:
        """Re-resolve every pool, verify every endpoint with ListLanes. Returns problems."""
        async with self._lock:
            pools: dict[str, list[str]] = {}
            for lane, targets in self.settings.lanes.items():
                addresses: list[str] = []
                for target in targets:
                    addresses.extend(await self._resolve(target))
                pools[lane] = sorted(set(addresses))
            wanted = {a for addresses in pools.values() for a in addresses}
            for address in list(self._endpoints):
                if address not in wanted:
                    gone = self._endpoints.pop(address)
                    log.info("inference endpoint %s left its pool", address)
                    await gone.channel.close()
            for address in sorted(wanted - set(self._endpoints)):
                channel = self._channel_factory(address)
                self._endpoints[address] = Endpoint(address, channel, GrpcInference(channel))
            await asyncio.gather(*(self._probe(e) for e in self._endpoints.values()))
            self._pools = pools
            self._problems = self._verify(pools)
            for problem in self._problems:
                log.error("lane directory: %s", problem)
            return list(self._problems)

    async def _resolve(self, target: str) -> list[str]:
        if not target.startswith(DNS_PREFIX):
            return [target]
        host, _, port = target.removeprefix(DNS_PREFIX).rpartition(":")
        try:
            return await self._resolver(host, int(port))
        except OSError as exc:
            # No ready pod (NXDOMAIN on a headless Service with none): an empty pool for now.
            log.info("%s resolves to nothing yet (%s)", target, exc.__class__.__name__)
            return []

    async def _probe(self, endpoint: Endpoint) -> None:
        stub = inference_pb2_grpc.InferenceServiceStub(endpoint.channel)
        try:
            reply: inference_pb2.ListLanesResponse = await stub.ListLanes(
                inference_pb2.ListLanesRequest(), timeout=LIST_LANES_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            endpoint.reachable = False
            endpoint.last_error = f"ListLanes {exc.code().name}"
            return
        endpoint.lanes = {
            info.name: LaneLoad(
                serving=info.state == inference_pb2.LANE_STATE_SERVING,
                in_flight=info.in_flight,
                max_concurrency=info.max_concurrency,
            )
            for info in reply.lanes
        }
        endpoint._local_at_refresh = dict(endpoint.local_in_flight)
        endpoint.reachable = True
        endpoint.down_until = 0.0
        endpoint.last_error = ""

    def _verify(self, pools: Mapping[str, Sequence[str]]) -> list[str]:
        problems = []
        for lane, addresses in pools.items():
            for address in addresses:
                endpoint = self._endpoints[address]
                if endpoint.reachable and lane not in endpoint.lanes:
                    hosted = ", ".join(endpoint.lanes) or "none"
                    problems.append(
                        f"{address} is in lane {lane!r}'s pool but does not host it "
                        f"(hosts: {hosted})"
                    )
        return problems

    # ------------------------------------------------------------------ lifecycle

    async def wait_live(self, lane: str, wait_s: float) -> None:
        """Refreshes until ``lane`` has a live endpoint (warm-up)."""
        deadline = self._clock() + wait_s
        delay = 0.1
        while True:
            await self.refresh()
            if self.live(lane):
                return
            if self._clock() > deadline:
                raise TimeoutError(
                    f"lane {lane!r} has no live inference endpoint after {wait_s:.0f} s "
                    f"({self.describe().get(lane) or 'empty pool'})"
                )
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    def start(self) -> None:
        """Refresh every ``refresh_s`` (sooner after a call found an endpoint down)."""
        if self._task is None:
            self._task = asyncio.create_task(self._refresher(), name="lane-directory")

    async def _refresher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), self.settings.refresh_s)
            self.changed.clear()
            try:
                await self.refresh()
            except Exception:  # keep refreshing whatever one round hit
                log.exception("lane directory refresh failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for endpoint in self._endpoints.values():
            await endpoint.channel.close()
        self._endpoints.clear()
