"""A fake engine for unit tests: deterministic, scriptable, no vLLM.

It tokenizes by characters and 'generates' by replaying a scripted text chosen by a function of
the request (or emitting the shortest text its grammar allows when asked to), in small deltas.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from agentmesh.inference.v1 import inference_pb2_grpc as pb_grpc

from services.inference.config import InferenceSettings, LanesConfig, ToolCallFormat
from services.inference.engine import Delta, EngineDead, GenerationFailed, GenParams
from services.inference.engine_setup import EngineSetup, choose_engine_setup
from services.inference.kv_cache import ModelKvShape
from services.inference.machine import MachineFacts
from services.inference.service import InferenceService
from shared.server import GrpcServer

Script = Callable[[list[int], GenParams], str]

# The opener CallTools prefills for one named call (hermes or llama3_json), at the prompt's end.
_PREFILLED = re.compile(r'(?:<tool_call>\n)?\{"name":"([^"]+)","(?:arguments|parameters)":\Z')


def prefilled_tool(prompt_ids: list[int]) -> str | None:
    """The tool whose call opener the prompt ends with (CallTools prefilled it), else None."""
    found = _PREFILLED.search("".join(chr(i) for i in prompt_ids))
    return found.group(1) if found else None


def hermes_rest(args: dict[str, Any]) -> str:
    """What the model writes of a hermes call after the prefilled opener."""
    return json.dumps(args, separators=(",", ":")) + "}\n</tool_call>"


def llama3_json_speed(lanes: LanesConfig) -> None:
    """A ``start_fake`` configure: the speed lane writes calls in llama3_json (its template)."""
    speed = lanes.lanes["speed"]
    speed.tool_call_format = ToolCallFormat.LLAMA3_JSON
    speed.chat_template = "llama3_json_tools.jinja"


@dataclass
class FakeEngine:
    engine_id: str
    model_ref: str = "fake"
    engine_args: dict[str, Any] = field(default_factory=dict)
    max_model_len: int = 4096
    script: Script = lambda ids, params: "hello from the fake engine"
    delta_chars: int = 4
    # Seconds between deltas (lets tests hold a request open).
    step_s: float = 0.0
    fail_start: bool = False
    # The next this many generations fail as vLLM's recoverable EngineGenerateError does.
    fail_generations: int = 0
    started: bool = False
    dead: bool = False
    live: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)
    requests: list[tuple[list[int], GenParams]] = field(default_factory=list)
    # Set while a request is between deltas (tests wait on it).
    in_generation: asyncio.Event = field(default_factory=asyncio.Event)
    # When set: every delta after the first waits for this event (a test reads the first
    # delta while the generation is provably still running).
    hold_after_first: asyncio.Event | None = None
    # The machine the fake "starts" on and its model's KV shape: its dtype, KV cache and
    # thread binding are chosen for them like a real engine's (None: shape unknown).
    machine: MachineFacts = field(default_factory=lambda: MachineFacts("cpu"))
    kv_shape: ModelKvShape | None = None
    # The service's overrides, as the real engine factory passes them.
    kv_cache_gib: float | None = None
    cpu_threads_bind: str = "auto"
    setup: EngineSetup | None = None

    async def start(self) -> None:
        if self.fail_start:
            raise RuntimeError("fake start failure")
        setup = choose_engine_setup(
            self.engine_args, self.machine, self.kv_shape, self.kv_cache_gib, self.cpu_threads_bind
        )
        # The tokens "its" cache holds: whole blocks of 128 tokens, as vLLM's CPU build.
        per_token = setup.kv_cache.bytes_per_token
        blocks = setup.kv_cache.bytes // (per_token * 128) if per_token else 0
        self.setup = setup.started(blocks * 128)
        self.started = True

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(chr(i) for i in token_ids)

    async def generate(
        self, prompt_token_ids: list[int], params: GenParams, request_id: str
    ) -> AsyncIterator[Delta]:
        if self.dead:
            raise EngineDead("fake engine is dead")
        if self.fail_generations > 0:
            self.fail_generations -= 1
            raise GenerationFailed("fake generation failure")
        self.requests.append((prompt_token_ids, params))
        text = self.script(prompt_token_ids, params)
        limit = params.max_tokens
        finish = "stop"
        if len(text) > limit:
            text, finish = text[:limit], "length"
        self.live.add(request_id)
        finished = False
        try:
            chunks = [text[i : i + self.delta_chars] for i in range(0, len(text), self.delta_chars)]
            for i, chunk in enumerate(chunks):
                self.in_generation.set()
                if self.step_s:
                    await asyncio.sleep(self.step_s)
                if i and self.hold_after_first is not None:
                    await self.hold_after_first.wait()
                if self.dead:
                    raise EngineDead("fake engine died")
                last = i == len(chunks) - 1
                finished = last
                yield Delta(
                    text=chunk,
                    new_tokens=len(chunk),
                    finished=last,
                    finish_reason=finish if last else None,  # type: ignore[arg-type]
                    prompt_tokens=len(prompt_token_ids),
                    cached_tokens=0,
                )
            if not chunks:
                finished = True
                yield Delta("", 0, True, "stop", len(prompt_token_ids), 0)
        finally:
            self.live.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    async def abort(self, request_id: str) -> None:
        self.live.discard(request_id)

    def has_request(self, request_id: str) -> bool:
        return request_id in self.live

    @property
    def errored(self) -> bool:
        return self.dead

    async def shutdown(self) -> None:
        self.started = False


class FakeEngineFactory:
    """Records the engines it made (one per distinct model + engine args)."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.made: list[FakeEngine] = []

    def __call__(self, engine_id: str, model_ref: str, engine_args: dict[str, Any]) -> FakeEngine:
        engine = FakeEngine(engine_id, model_ref, dict(engine_args), **self.kwargs)
        engine.max_model_len = int(engine_args.get("max_model_len", 4096))
        self.made.append(engine)
        return engine


@dataclass
class Fake:
    """An inference server on 127.0.0.1:0 over one fake engine, and a stub to it."""

    server: GrpcServer
    stub: pb_grpc.InferenceServiceStub
    channel: grpc.aio.Channel
    engine: FakeEngine
    service: InferenceService

    async def close(self) -> None:
        await self.channel.close()
        await self.server.stop(grace=1)


async def start_fake(
    factory: FakeEngineFactory,
    configure: Callable[[LanesConfig], None] | None = None,
    **service_kwargs: Any,
) -> Fake:
    """The embedded preset's lanes on ``factory``'s engine; ``configure`` may edit the lanes
    before the service is built; ``service_kwargs`` go to :class:`InferenceService`."""
    settings = InferenceSettings(port=0, metrics_port=0, grace_seconds=1)
    lanes = settings.load_lanes()
    if configure is not None:
        configure(lanes)
    service = InferenceService(settings, lanes, engine_factory=factory, **service_kwargs)
    server = GrpcServer(service, settings)
    await server.start()
    await server.wait_until_serving(10)
    channel = grpc.aio.insecure_channel(server.address)
    return Fake(server, pb_grpc.InferenceServiceStub(channel), channel, factory.made[0], service)
