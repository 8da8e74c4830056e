"""Lanes across deployments, replicas with cache affinity, failover: the orchestrator over
real gRPC to several fake inference deployments (tests/orchestrator/topology_fakes.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb
from agentmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.orchestrator.config import OrchestratorSettings
from services.orchestrator.loop.policy import Caps
from services.orchestrator.service import OrchestratorService
from services.orchestrator.topology.directory import Endpoint, LaneDirectory
from services.orchestrator.topology.rendezvous import affinity_key, ranked
from services.orchestrator.topology.settings import TopologySettings
from shared.server import GrpcServer
from tests.orchestrator.grpc_fakes import FakeToolServicer, start_fake
from tests.orchestrator.topology_fakes import LaneFake, start_lane_fake

LADDER = ["workhorse", "planner", "heavy"]


@dataclass
class Topo:
    tools_address: str
    store_url: str
    servers: list[GrpcServer] = field(default_factory=list)
    fakes: dict[str, tuple[GrpcServer, LaneFake]] = field(default_factory=dict)

    async def deployment(
        self, name: str, hosted: Sequence[str], *, cache_blocks: int = 1_000_000
    ) -> LaneFake:
        server, fake = await start_lane_fake(name, hosted, cache_blocks=cache_blocks)
        self.fakes[name] = (server, fake)
        return fake

    def address(self, name: str) -> str:
        return self.fakes[name][0].address

    async def kill(self, name: str) -> None:
        await self.fakes[name][0].stop(grace=0)

    def settings(self, lanes: dict[str, list[str]], **overrides: Any) -> OrchestratorSettings:
        values: dict[str, Any] = {
            "port": 0,
            "metrics_port": 0,
            "grace_seconds": 1.0,
            "inference": {"target": "127.0.0.1:9"},  # unused with a topology
            "tools": {"target": self.tools_address},
            "session_store_url": self.store_url,
            "caps": Caps(turn_budget_s=20, task_budget_s=400, max_rounds_per_turn=1),
            "dependency_wait_s": 10,
            "topology": {"lanes": lanes, "refresh_s": 3600},
            "ceilings": {"forceable_lanes": ["workhorse", "speed"]},
        }
        values.update(overrides)
        return OrchestratorSettings(**values)

    async def orchestrator(
        self, lanes: dict[str, list[str]], **overrides: Any
    ) -> tuple[GrpcServer, OrchestratorService]:
        settings = self.settings(lanes, **overrides)
        service = OrchestratorService(settings)
        server = GrpcServer(service, settings, metrics_registry=service.metrics_registry)
        await server.start()
        await server.wait_until_serving(20)
        self.servers.append(server)
        return server, service


@pytest.fixture
async def topo(tmp_path: Path) -> AsyncIterator[Topo]:
    tools_server, tools = await start_fake("tools")
    assert isinstance(tools, FakeToolServicer)
    # Tool results the size of real CRM records and KB snippets (~300 tokens each): what a
    # session's history is mostly made of, and what its replica's prefix cache keeps.
    for name in ("crm_lookup", "kb_search", "billing_lookup"):
        tools.bodies[name] = json.dumps(
            {"tool": name, "records": [f"{name} row {i}: " + "x" * 40 for i in range(24)]}
        )
    t = Topo(tools_server.address, f"sqlite+aiosqlite:///{tmp_path / 'sessions.sqlite'}")
    try:
        yield t
    finally:
        for server in [*t.servers, *(s for s, _ in t.fakes.values()), tools_server]:
            await server.stop(grace=0.2)


async def channel_stub(server: GrpcServer) -> tuple[grpc.aio.Channel, Any]:
    channel = grpc.aio.insecure_channel(server.address)
    return channel, orchestrator_pb2_grpc.AgentServiceStub(channel)


async def run_turn(stub: Any, session_id: str, text: str, **kw: Any) -> list[pb.RunTurnResponse]:
    request = pb.RunTurnRequest(session_id=session_id, user_message=text, **kw)
    return [r async for r in stub.RunTurn(request)]


def completed(events: list[pb.RunTurnResponse]) -> pb.TurnCompleted:
    done = [e.turn_completed for e in events if e.HasField("turn_completed")]
    assert len(done) == 1
    return done[0]


# ---------------------------------------------------------------------- pure parts


def test_rendezvous_moves_only_the_keys_of_the_endpoint_that_left() -> None:
    endpoints = [f"10.0.0.{i}:50052" for i in range(1, 5)]
    keys = [affinity_key(f"s{i}", "workhorse") for i in range(400)]
    before = {k: ranked(k, endpoints)[0] for k in keys}
    gone = endpoints[1]
    after = {k: ranked(k, [e for e in endpoints if e != gone])[0] for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == gone}
    # Every endpoint gets a share (400 keys over 4: none empty).
    assert set(before.values()) == set(endpoints)


def test_topology_settings_reject_a_target_without_a_port() -> None:
    with pytest.raises(ValueError, match="not host:port"):
        TopologySettings(lanes={"workhorse": ["inference-workhorse"]})
    with pytest.raises(ValueError, match="empty pool"):
        TopologySettings(lanes={"workhorse": []})


async def test_dns_targets_are_re_resolved_and_replicas_that_left_are_dropped(
    topo: Topo,
) -> None:
    await topo.deployment("a", ["workhorse"])
    await topo.deployment("b", ["workhorse"])
    answers = {"inference-workhorse": [topo.address("a"), topo.address("b")]}

    async def resolver(host: str, port: int) -> list[str]:
        return list(answers[host])

    settings = TopologySettings(lanes={"workhorse": ["dns:///inference-workhorse:50052"]})
    directory = LaneDirectory(settings, grpc.aio.insecure_channel, resolver=resolver)
    try:
        assert await directory.refresh() == []
        assert {e.address for e in directory.live("workhorse")} == {
            topo.address("a"),
            topo.address("b"),
        }
        answers["inference-workhorse"] = [topo.address("b")]  # pod a scaled away
        await directory.refresh()
        assert [e.address for e in directory.live("workhorse")] == [topo.address("b")]
    finally:
        await directory.close()


async def test_a_target_that_does_not_host_its_lane_refuses_warm_up(topo: Topo) -> None:
    await topo.deployment("a", ["workhorse"])
    settings = topo.settings({"workhorse": [topo.address("a")], "planner": [topo.address("a")]})
    service = OrchestratorService(settings)
    server = GrpcServer(service, settings, metrics_registry=service.metrics_registry)
    directory = LaneDirectory(settings.topology, grpc.aio.insecure_channel)
    try:
        problems = await directory.refresh()
        assert problems == [
            f"{topo.address('a')} is in lane 'planner''s pool but does not host it "
            "(hosts: workhorse)"
        ]
        await server.start()
        with pytest.raises(ValueError, match="does not host it"):
            await service.warm_up(server.health)
    finally:
        await directory.close()
        await server.stop(grace=0)


# ---------------------------------------------------------------------- lanes across deployments


async def test_escalation_and_a_forced_lane_reach_the_deployment_hosting_the_lane(
    topo: Topo,
) -> None:
    a = await topo.deployment("a", ["workhorse"])
    b = await topo.deployment("b", ["planner", "heavy", "speed"])
    a.invalid_on = {"workhorse"}  # every workhorse tool call fails validation
    server, _ = await topo.orchestrator(
        {
            "workhorse": [topo.address("a")],
            "planner": [topo.address("b")],
            "heavy": [topo.address("b")],
            "speed": [topo.address("b")],
        }
    )
    channel, stub = await channel_stub(server)
    async with channel:
        session = (
            await stub.CreateSession(pb.CreateSessionRequest(customer_id="CUST-0042"))
        ).session
        events = await run_turn(stub, session.session_id, "Why was I charged twice?")
        escalations = [e.escalation for e in events if e.HasField("escalation")]
        assert [(x.kind, x.from_lane, x.to_lane) for x in escalations] == [
            (pb.Escalation.KIND_REPROMPT_WITH_SCHEMA, "workhorse", "workhorse"),
            (pb.Escalation.KIND_LANE_ESCALATION, "workhorse", "planner"),
        ]
        finished = [e.tool_call_finished for e in events if e.HasField("tool_call_finished")]
        assert {f.name for f in finished if f.status == "OK"} == {
            "crm_lookup",
            "kb_search",
            "billing_lookup",
        }
        # Re-prompt on workhorse (deployment a), the escalated emission on planner (b).
        assert [k for _, lane, k in a.served if k == "call_tools"] == ["call_tools"] * 2
        assert [lane for _, lane, k in b.served if k == "call_tools"] == ["planner"]
        usage = {u.lane for u in completed(events).usage}
        assert usage == {"workhorse", "planner"}

        forced = await run_turn(stub, session.session_id, "And my invoice?", lane="speed")
        assert {u.lane for u in completed(forced).usage} == {"speed"}
        assert {lane for _, lane, _ in b.served[-3:]} == {"speed"}
    assert {lane for _, lane, _ in a.served} == {"workhorse"}


async def test_a_lane_whose_pool_is_down_fails_over_to_the_next_rung_with_the_reason(
    topo: Topo,
) -> None:
    await topo.deployment("a", ["workhorse"])
    b = await topo.deployment("b", ["planner", "heavy"])
    server, _ = await topo.orchestrator(
        {
            "workhorse": [topo.address("a")],
            "planner": [topo.address("b")],
            "heavy": [topo.address("b")],
        }
    )
    channel, stub = await channel_stub(server)
    async with channel:
        session = (
            await stub.CreateSession(pb.CreateSessionRequest(customer_id="CUST-0042"))
        ).session
        dead = topo.address("a")
        await topo.kill("a")
        events = await run_turn(stub, session.session_id, "Why was I charged twice?")
        done = completed(events)
        assert done.outcome == pb.TURN_OUTCOME_COMPLETED
        assert {u.lane for u in done.usage} == {"planner"}
        # The replica that refused the first call, named in the turn's note.
        (note,) = done.notes
        assert note.startswith("lane workhorse was unavailable (")
        assert note.endswith("; failed over to planner)")
        assert dead in note
        assert {lane for _, lane, _ in b.served} == {"planner"}


# ---------------------------------------------------------------------- replicas


class RoundRobinDirectory(LaneDirectory):
    """The baseline: every call to the next live replica, whoever's session it is."""

    turn = 0

    def candidates(self, lane: str, key: str) -> list[Endpoint]:
        live = sorted(self.live(lane), key=lambda e: e.address)
        self.turn += 1
        shift = self.turn % len(live)
        return live[shift:] + live[:shift]


CUSTOMERS = [f"CUST-{i:04d}" for i in range(1, 17)]
# A replica's prefix cache: 800 blocks of 16 tokens (12,800 tokens). Sixteen sessions with
# ~1,800-token answer prompts do not all fit in one replica's cache, half of them do: what
# affinity buys is that each replica only has to hold its own sessions.
REPLICA_CACHE_BLOCKS = 800
LONG_ANSWER = " ".join(["Your invoice INV-00012 was charged twice and we are on it."] * 10)
QUESTIONS = ["Why was I charged twice?", "Can you refund it?", "When does it arrive?"]


async def _conversations(stub: Any) -> dict[str, int]:
    """Sixteen sessions, three turns each, sessions interleaved per turn. Returns the cached
    prompt tokens of turns 2 and 3 per session."""
    sessions = {}
    for customer in CUSTOMERS:
        reply = await stub.CreateSession(pb.CreateSessionRequest(customer_id=customer))
        sessions[customer] = reply.session.session_id
    later: dict[str, int] = dict.fromkeys(CUSTOMERS, 0)
    for index, question in enumerate(QUESTIONS):
        for customer, session_id in sessions.items():
            done = completed(await run_turn(stub, session_id, question))
            assert done.outcome == pb.TURN_OUTCOME_COMPLETED
            if index:
                later[customer] += sum(u.usage.cached_prompt_tokens for u in done.usage)
    return later


async def test_sessions_stick_to_one_replica_and_reuse_its_prefix_cache(topo: Topo) -> None:
    """Same run, same fakes' cache model: rendezvous affinity vs round-robin."""
    for name in ("r1", "r2", "rr1", "rr2"):
        fake = await topo.deployment(name, LADDER, cache_blocks=REPLICA_CACHE_BLOCKS)
        fake.answer = LONG_ANSWER
    pool = [topo.address("r1"), topo.address("r2")]
    server, _ = await topo.orchestrator(dict.fromkeys(LADDER, pool))
    channel, stub = await channel_stub(server)
    async with channel:
        affine = await _conversations(stub)
    r1, r2 = topo.fakes["r1"][1], topo.fakes["r2"][1]
    # Every session's calls on exactly one replica, and both replicas in use.
    assert r1.customers() | r2.customers() == set(CUSTOMERS)
    assert r1.customers() & r2.customers() == set()
    assert r1.customers() and r2.customers()

    rr_pool = [topo.address("rr1"), topo.address("rr2")]
    settings = topo.settings(dict.fromkeys(LADDER, rr_pool))
    baseline = RoundRobinDirectory(settings.topology, grpc.aio.insecure_channel)
    service = OrchestratorService(settings, directory=baseline)
    rr_server = GrpcServer(service, settings, metrics_registry=service.metrics_registry)
    await rr_server.start()
    await rr_server.wait_until_serving(20)
    topo.servers.append(rr_server)
    channel, stub = await channel_stub(rr_server)
    async with channel:
        round_robin = await _conversations(stub)
    rr1, rr2 = topo.fakes["rr1"][1], topo.fakes["rr2"][1]
    assert rr1.customers() & rr2.customers() == set(CUSTOMERS)  # the baseline spreads them

    ratio = sum(affine.values()) / sum(round_robin.values())
    print(
        f"cached_prompt_tokens on turns 2-3: affinity {sum(affine.values())}, "
        f"round-robin {sum(round_robin.values())}, ratio {ratio:.2f}"
    )
    assert sum(affine.values()) > sum(round_robin.values())


async def test_killing_a_replica_moves_only_its_sessions_without_a_failed_turn(
    topo: Topo,
) -> None:
    # Three replicas: after one dies, the sessions of the other two stay where they were.
    names = ("r1", "r2", "r3")
    for name in names:
        await topo.deployment(name, LADDER)
    pool = [topo.address(n) for n in names]
    server, _ = await topo.orchestrator(dict.fromkeys(LADDER, pool))
    fakes = {n: topo.fakes[n][1] for n in names}
    channel, stub = await channel_stub(server)
    async with channel:
        sessions = {}
        for customer in CUSTOMERS:
            reply = await stub.CreateSession(pb.CreateSessionRequest(customer_id=customer))
            sessions[customer] = reply.session.session_id
            completed(await run_turn(stub, sessions[customer], QUESTIONS[0]))
        before = {n: f.customers() for n, f in fakes.items()}
        assert sum(len(c) for c in before.values()) == len(CUSTOMERS)  # one replica each
        # The busiest replica dies (never an empty one, whatever the session ids hash to).
        dead = max(names, key=lambda n: len(before[n]))
        left = [n for n in names if n != dead]
        await topo.kill(dead)
        for fake in fakes.values():
            fake.served.clear()
        for session_id in sessions.values():
            done = completed(await run_turn(stub, session_id, QUESTIONS[1]))
            assert done.outcome == pb.TURN_OUTCOME_COMPLETED
            assert list(done.notes) == []
        after = {n: f.customers() for n, f in fakes.items()}
        assert before[dead] and after[dead] == set()
        assert all(before[n] <= after[n] for n in left)  # the others' sessions stayed
        assert after[left[0]] | after[left[1]] == set(CUSTOMERS)
        assert after[left[0]] & after[left[1]] == set()
        # Only the dead replica's sessions moved.
        assert set().union(*(after[n] - before[n] for n in left)) == before[dead]


async def test_an_overloaded_replica_is_skipped_while_another_has_room(topo: Topo) -> None:
    await topo.deployment("r1", ["workhorse"])
    await topo.deployment("r2", ["workhorse"])
    pool = [topo.address("r1"), topo.address("r2")]
    directory = LaneDirectory(
        TopologySettings(lanes={"workhorse": pool}), grpc.aio.insecure_channel
    )
    try:
        await directory.refresh()
        key = affinity_key("session-1", "workhorse")
        first, second = ranked(key, pool)
        assert [e.address for e in directory.candidates("workhorse", key)] == [first, second]
        busy = topo.fakes["r1" if first == pool[0] else "r2"][1]
        busy.reported_in_flight["workhorse"] = busy.max_concurrency
        await directory.refresh()
        assert [e.address for e in directory.candidates("workhorse", key)] == [second, first]
        busy.reported_in_flight["workhorse"] = 0
        await directory.refresh()
        assert [e.address for e in directory.candidates("workhorse", key)] == [first, second]
    finally:
        await directory.close()
