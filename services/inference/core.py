"""The inference service's logic, independent of gRPC plumbing: lanes, generation, CallTools.

Handlers in service.py call these methods with the request messages; every client-caused
problem leaves as a domain error (shared.errors) with a message written here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import jsonschema
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb
from prometheus_client import CollectorRegistry, Gauge

from services.inference.call_tools import ToolCallStage
from services.inference.config import InferenceSettings, LanesConfig, StageName
from services.inference.continue_answer import ContinueOrAnswer, continue_or_answer
from services.inference.counting import count_all
from services.inference.engine import (
    Delta,
    Engine,
    EngineDead,
    EngineFactory,
    EngineRejected,
    GenerationFailed,
)
from services.inference.engine import GenParams as GenParams
from services.inference.engine_setup import not_started
from services.inference.lanes import (
    EngineDeathHook,
    Lane,
    LaneBoard,
    LaneStateSink,
    LaneStatus,
    SequenceBudget,
    engine_sequence_cap,
)
from services.inference.prompt import PromptRenderer, ToolDef, messages_to_dicts, parse_tools
from services.inference.results import FINISH, GenResult, Metrics, duration, emitted
from services.inference.router import LaneRouter, RouteChoice
from services.inference.sampling import gen_params, validate_sampling
from services.inference.tool_calls import GrammarBuilder, ParsedCall, json_schema_grammar
from shared.errors import InvalidArgument, ResourceExhausted, Unavailable

T = TypeVar("T")

log = logging.getLogger(__name__)

_STAGES = {
    common_pb2.STAGE_PLAN: StageName.PLAN,
    common_pb2.STAGE_TOOL_CALL: StageName.TOOL_CALL,
    common_pb2.STAGE_COMPOSE: StageName.COMPOSE,
}
_LANE_STATE = {
    LaneStatus.STARTING: pb.LANE_STATE_STARTING,
    LaneStatus.SERVING: pb.LANE_STATE_SERVING,
    LaneStatus.FAILED: pb.LANE_STATE_FAILED,
}


@dataclass
class Prepared:
    """A routed, rendered, tokenized request ready for the engine."""

    lane: Lane
    choice: RouteChoice
    prompt_ids: list[int]
    params: GenParams
    # Set for "continue or answer" streams (tool_choice auto/required with tools).
    splitter: ContinueOrAnswer | None = None


class InferenceCore:
    def __init__(
        self,
        lanes_config: LanesConfig,
        settings: InferenceSettings,
        engine_factory: EngineFactory,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = lanes_config
        self.settings = settings
        self.router = LaneRouter(lanes_config.hosted(), list(lanes_config.lanes.values()))
        self.grammars = GrammarBuilder()
        self.tool_stage = ToolCallStage(self)
        self.metrics = Metrics(registry or CollectorRegistry())
        self.engines: dict[str, Engine] = {}
        self.lanes: dict[str, Lane] = {}
        # Live engine request ids -> lane (lets tests and operators see what is running).
        self.live_requests: dict[str, str] = {}
        # Template rendering and tokenization are CPU work: off the event loop, here.
        self._cpu = ThreadPoolExecutor(
            max_workers=settings.tokenize_threads, thread_name_prefix="inference-tokenize"
        )
        # One sequence budget per engine, shared by its lanes (admission counts sequences).
        self.budgets: dict[str, SequenceBudget] = {}
        keys: dict[str, str] = {}
        for spec in lanes_config.hosted():
            key = spec.engine_key()
            if key not in keys:
                engine_id = f"engine-{len(keys)}"
                keys[key] = engine_id
                self.engines[engine_id] = engine_factory(engine_id, spec.model, spec.engine_args)
                self.budgets[engine_id] = SequenceBudget(
                    engine_id, engine_sequence_cap(spec.engine_args)
                )
            engine = self.engines[keys[key]]
            self.lanes[spec.name] = Lane(
                spec,
                engine,
                PromptRenderer(spec.template_path(), spec.few_shot),
                self.budgets[keys[key]],
            )
        self.board = LaneBoard(self.lanes)
        self._engine_gauges(self.metrics.registry)

    def _engine_gauges(self, registry: CollectorRegistry) -> None:
        """Per engine: sequences reserved by admission and requests vLLM still tracks."""
        in_use = Gauge(
            "agentmesh_inference_engine_sequences_in_use",
            "Sequences admitted and not finished, per engine (never above its budget).",
            ["engine"],
            registry=registry,
        )
        budget = Gauge(
            "agentmesh_inference_engine_sequence_budget",
            "The engine's sequence budget (its max_num_seqs).",
            ["engine"],
            registry=registry,
        )
        unfinished = Gauge(
            "agentmesh_inference_engine_unfinished_requests",
            "Requests the engine itself still tracks (0 when idle).",
            ["engine"],
            registry=registry,
        )
        for engine_id, engine in self.engines.items():
            seqs = self.budgets[engine_id]
            in_use.labels(engine_id).set_function(functools.partial(_in_use, seqs))
            budget.labels(engine_id).set_function(functools.partial(_capacity, seqs))
            unfinished.labels(engine_id).set_function(functools.partial(_unfinished, engine))

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(
        self,
        on_state: LaneStateSink | None = None,
        on_engine_death: EngineDeathHook | None = None,
    ) -> None:
        """Start engines one at a time (memory); lanes go SERVING as their engine does."""
        self.board.bind(on_state, on_engine_death)
        for engine_id, engine in self.engines.items():
            names = ", ".join(lane.name for lane in self.lanes.values() if lane.engine is engine)
            log.info("starting %s for lanes %s", engine_id, names)
            try:
                await engine.start()
            except Exception:
                log.exception("%s failed to start; lanes %s stay NOT_SERVING", engine_id, names)
                await self.board.engine_state(engine, LaneStatus.FAILED)
                continue
            budget = self.budgets[engine_id]
            cap = getattr(engine, "max_num_seqs", None)
            if isinstance(cap, int) and cap > 0:
                budget.capacity = cap  # what the scheduler really runs at once
            await self.board.engine_state(engine, LaneStatus.SERVING)
            log.info(
                "%s ready (max_model_len %d, %d sequences shared by its lanes)",
                engine_id,
                engine.max_model_len,
                budget.capacity,
            )
        if not self.board.any_serving():
            raise RuntimeError("no lane could start; see the errors above")

    async def watch(self, interval_s: float = 1.0) -> None:
        """Flip lanes to FAILED (and their health) as soon as an engine dies, even when idle."""
        while True:
            await asyncio.sleep(interval_s)
            await self.board.sweep()

    async def close(self) -> None:
        for engine in self.engines.values():
            try:
                await engine.shutdown()
            except Exception:
                log.exception("engine shutdown failed")
        self._cpu.shutdown(wait=False, cancel_futures=True)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._cpu, functools.partial(fn, *args)
        )

    # ---- request preparation ----------------------------------------------------------------

    async def route(self, selector: pb.LaneSelector) -> tuple[Lane, RouteChoice]:
        stage = _STAGES.get(selector.stage)
        choice = self.router.choose(selector.lane, stage, selector.escalation_level)
        lane = self.lanes[choice.lane.name]
        await self.board.require_serving(lane)
        return lane, choice

    def _tokenize(self, lane: Lane, prompt: str, max_tokens: int) -> tuple[list[int], int]:
        ids = lane.engine.encode(prompt)
        return ids, min(max_tokens, self.prompt_room(lane, len(ids)))

    def prompt_room(self, lane: Lane, prompt_tokens: int) -> int:
        """Tokens left for the output after a prompt of ``prompt_tokens``; none is
        INVALID_ARGUMENT (PROMPT_TOO_LONG)."""
        limit = lane.engine.max_model_len
        if prompt_tokens >= limit:
            raise InvalidArgument(
                "messages",
                f"prompt is {prompt_tokens} tokens; lane {lane.name!r} holds {limit} tokens "
                "including the output",
                reason="PROMPT_TOO_LONG",
                metadata={"prompt_tokens": str(prompt_tokens), "max_model_len": str(limit)},
            )
        return limit - prompt_tokens

    def lane_params(
        self, lane: Lane, sampling: pb.SamplingParams, default_max: int | None = None
    ) -> GenParams:
        validate_sampling(sampling, lane.engine.max_model_len)
        return gen_params(lane.spec.sampling, sampling, default_max)

    def render_tokenize(
        self,
        lane: Lane,
        messages: list[dict[str, Any]],
        tools: Sequence[ToolDef],
        max_tokens: int,
        with_few_shot: bool = False,
    ) -> tuple[list[int], int]:
        """Blocking: the prompt exactly as the engine gets it (run through off_loop)."""
        prompt = lane.renderer.render(messages, tools, with_few_shot=with_few_shot)
        return self._tokenize(lane, prompt, max_tokens)

    async def _prepare_generate(
        self, req: pb.GenerateRequest | pb.StreamGenerateRequest
    ) -> Prepared:
        messages = messages_to_dicts(req.messages)
        tools = parse_tools(req.tools)
        lane, choice = await self.route(req.lane)
        splitter = None
        default_max = None
        if isinstance(req, pb.StreamGenerateRequest):
            splitter = continue_or_answer(
                req, lane.spec, tools, self.grammars, self.settings.default_max_tool_calls
            )
            if splitter is not None:
                default_max = splitter.default_max_tokens(lane.spec.sampling)
        params = self.lane_params(lane, req.sampling, default_max)
        grammar = None
        if req.response_format.json_schema:
            grammar = self._response_grammar(req.response_format.json_schema)
        if splitter is not None:
            grammar = await self.off_loop(splitter.grammar, self.grammars)
        ids, max_tokens = await self.off_loop(
            self.render_tokenize, lane, messages, tools, params.max_tokens
        )
        return Prepared(
            lane, choice, ids, replace(params, max_tokens=max_tokens, grammar=grammar), splitter
        )

    def _response_grammar(self, schema_text: str) -> str:
        field_name = "response_format.json_schema"
        try:
            schema = json.loads(schema_text)
        except ValueError:
            raise InvalidArgument(field_name, "not valid JSON") from None
        if not isinstance(schema, dict):
            raise InvalidArgument(field_name, "must be a JSON object")
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError:
            raise InvalidArgument(field_name, "not a valid JSON Schema") from None
        return str(json_schema_grammar(schema, field_name, "response format"))

    # ---- generation ------------------------------------------------------------------------

    async def _deltas(self, lane: Lane, ids: list[int], params: GenParams) -> AsyncIterator[Delta]:
        """Engine deltas, with engine failures turned into UNAVAILABLE."""
        request_id = f"{lane.name}-{uuid.uuid4().hex[:12]}"
        self.live_requests[request_id] = lane.name
        try:
            async for delta in lane.engine.generate(ids, params, request_id):
                yield delta
        except EngineDead:
            log.error("engine failed while serving lane %s", lane.name)
            await self.board.engine_died(lane.engine)
            raise Unavailable(f"lane {lane.name!r} is not serving", reason="ENGINE_DEAD") from None
        except GenerationFailed:
            # One lost request; the engine lives and its lanes keep serving.
            log.warning("a generation failed on lane %s", lane.name, exc_info=True)
            raise Unavailable(
                f"the generation failed on lane {lane.name!r}; retry", reason="GENERATION_FAILED"
            ) from None
        except EngineRejected:
            log.warning("engine rejected a request on lane %s", lane.name, exc_info=True)
            raise InvalidArgument("request", "rejected by the engine's validation") from None
        finally:
            self.live_requests.pop(request_id, None)

    async def collect(self, lane: Lane, ids: list[int], params: GenParams) -> GenResult:
        """A generation nobody streams: the engine sends its first token (the time to first
        token) and then the rest in one delta at the end."""
        started = time.monotonic()
        result = GenResult(prompt_tokens=len(ids))
        parts: list[str] = []
        whole = replace(params, stream_interval=max(1, params.max_tokens))
        async for delta in self._deltas(lane, ids, whole):
            result.add(delta, started)
            parts.append(delta.text)
        result.text = "".join(parts)
        self.metrics.account(lane.name, result, time.monotonic() - started)
        return result

    def lane_choice(self, lane: Lane, choice: RouteChoice) -> pb.LaneChoice:
        return pb.LaneChoice(lane=lane.name, model=lane.spec.model, reason=choice.reason)

    async def generate(self, req: pb.GenerateRequest) -> pb.GenerateResponse:
        started = time.monotonic()
        prep = await self._prepare_generate(req)
        async with self.slot(prep.lane):
            result = await self.collect(prep.lane, prep.prompt_ids, prep.params)
        return pb.GenerateResponse(
            text=result.text,
            usage=result.usage(),
            finish_reason=FINISH[result.finish],
            lane=self.lane_choice(prep.lane, prep.choice),
            time_to_first_token=duration(result.ttft_s),
            elapsed=duration(time.monotonic() - started),
        )

    async def stream_generate(
        self, req: pb.StreamGenerateRequest
    ) -> AsyncGenerator[pb.StreamGenerateResponse, None]:
        started = time.monotonic()
        prep = await self._prepare_generate(req)
        lane, splitter = prep.lane, prep.splitter
        async with self.slot(lane):
            result = GenResult(prompt_tokens=len(prep.prompt_ids))
            async for delta in self._deltas(lane, prep.prompt_ids, prep.params):
                result.add(delta, started)
                text = splitter.feed(delta.text) if splitter is not None else delta.text
                if text:
                    yield pb.StreamGenerateResponse(text_delta=text)
        self.metrics.account(lane.name, result, time.monotonic() - started)
        if splitter is not None:
            tail = splitter.finish()
            if tail:
                yield pb.StreamGenerateResponse(text_delta=tail)
            calls = splitter.calls()
            if calls is not None:
                self.count_calls(lane, calls)
                yield pb.StreamGenerateResponse(
                    tool_calls=pb.ToolCallsEmitted(calls=[emitted(c) for c in calls])
                )
        yield pb.StreamGenerateResponse(
            summary=pb.GenerationSummary(
                usage=result.usage(),
                finish_reason=FINISH[result.finish],
                lane=self.lane_choice(lane, prep.choice),
                time_to_first_token=duration(result.ttft_s),
                elapsed=duration(time.monotonic() - started),
            )
        )

    def count_calls(self, lane: Lane, calls: Sequence[ParsedCall]) -> None:
        for call in calls:
            self.metrics.calls.labels(lane.name, "ok" if call.ok else "failed").inc()

    @contextlib.asynccontextmanager
    async def slot(self, lane: Lane, sequences: int = 1) -> AsyncIterator[None]:
        """The lane's RPC slot and ``sequences`` of its engine's budget, or an immediate
        RESOURCE_EXHAUSTED with a retry hint (nothing queues)."""
        await self.board.require_serving(lane)
        async with contextlib.AsyncExitStack() as held:
            try:
                await held.enter_async_context(lane.slot())
                await held.enter_async_context(lane.budget.reserve(sequences, lane.name))
            except ResourceExhausted:
                self.metrics.rejected.labels(lane.name).inc()
                raise
            yield

    # ---- CallTools -------------------------------------------------------------------------

    async def call_tools(self, req: pb.CallToolsRequest) -> pb.CallToolsResponse:
        """The tool-call stage (services/inference/call_tools.py)."""
        return await self.tool_stage.call_tools(req)

    # ---- ListLanes -------------------------------------------------------------------------

    def list_lanes(self) -> pb.ListLanesResponse:
        lanes = []
        for lane in self.lanes.values():
            setup = lane.engine.setup or not_started(lane.spec.engine_args)
            lanes.append(
                pb.LaneInfo(
                    name=lane.name,
                    model=lane.spec.model,
                    state=_LANE_STATE[lane.status],
                    tool_call_format=lane.spec.tool_call_format.value,
                    max_concurrency=lane.spec.max_concurrency,
                    in_flight=lane.in_flight,
                    max_model_len=lane.engine.max_model_len,
                    engine_id=lane.engine.engine_id,
                    dtype=setup.dtype.dtype,
                    device=setup.dtype.device,
                    dtype_reason=setup.dtype.reason,
                    kv_cache_bytes=setup.kv_cache.bytes,
                    kv_cache_tokens=setup.kv_cache.tokens,
                    kv_cache_reason=setup.kv_cache.reason,
                    cpu_threads_bind=setup.cpu_threads.bind,
                    cpu_threads_reason=setup.cpu_threads_reason,
                )
            )
        return pb.ListLanesResponse(preset=self.config.preset, lanes=lanes)

    # ---- CountTokens -----------------------------------------------------------------------

    async def count_tokens(self, req: pb.CountTokensRequest) -> pb.CountTokensResponse:
        """Counts in the lane's tokenizer; no engine generation, no lane slot (it works while
        the lane is at its cap)."""
        messages = messages_to_dicts(req.messages) if req.messages else None
        tools = parse_tools(req.tools)
        lane, choice = await self.route(req.lane)

        def work() -> Any:
            prompt = None
            if messages is not None:
                prompt = lane.renderer.render(messages, tools)
            return count_all(lane.engine, prompt, req.messages, req.texts, req.truncate_texts_to)

        counts = await self.off_loop(work)
        return pb.CountTokensResponse(
            prompt_tokens=counts.prompt_tokens,
            max_model_len=lane.engine.max_model_len,
            lane=self.lane_choice(lane, choice),
            message_tokens=counts.message_tokens,
            texts=counts.texts,
        )


def _unfinished(engine: Engine) -> int:
    count = getattr(engine, "unfinished_requests", None)
    return int(count()) if callable(count) else 0


def _in_use(budget: SequenceBudget) -> int:
    return budget.in_use


def _capacity(budget: SequenceBudget) -> int:
    return budget.capacity
