"""The inference service's logic, independent of gRPC plumbing: lanes, generation, CallTools.

Handlers in service.py call these methods with the request messages; every client-caused
problem leaves as a domain error (shared.errors) with a message written here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jsonschema
from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb
from google.protobuf import duration_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.inference.config import InferenceSettings, LanesConfig, StageName, ToolCallFormat
from services.inference.engine import Delta, Engine, EngineDead, EngineFactory, EngineRejected
from services.inference.engine import GenParams as GenParams
from services.inference.lanes import Lane, LaneStatus
from services.inference.prompt import PromptRenderer, ToolDef, messages_to_dicts, parse_tools
from services.inference.router import LaneRouter, RouteChoice
from services.inference.tool_calls import (
    GrammarBuilder,
    ParsedCall,
    json_schema_grammar,
    new_call_id,
    parse_calls,
    parse_selection,
)
from shared.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

LaneStateCallback = Callable[[str, bool], Awaitable[None]]
"""(lane name, serving?) -> None: keeps per-lane health names in step with engines."""

_STAGES = {
    common_pb2.STAGE_PLAN: StageName.PLAN,
    common_pb2.STAGE_TOOL_CALL: StageName.TOOL_CALL,
    common_pb2.STAGE_COMPOSE: StageName.COMPOSE,
}
_FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
_LANE_STATE = {
    LaneStatus.STARTING: pb.LANE_STATE_STARTING,
    LaneStatus.SERVING: pb.LANE_STATE_SERVING,
    LaneStatus.FAILED: pb.LANE_STATE_FAILED,
}


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
    return d


@dataclass
class GenResult:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish: str = "stop"
    ttft_s: float = 0.0

    def add(self, delta: Delta, started: float) -> None:
        """Fold one engine delta in (the output text is the caller's: it streams or joins it);
        time to first token counts from `started`."""
        if delta.new_tokens and not self.ttft_s:
            self.ttft_s = time.monotonic() - started
        self.completion_tokens += delta.new_tokens
        if delta.finished:
            self.finish = delta.finish_reason or "stop"
            self.prompt_tokens = delta.prompt_tokens or self.prompt_tokens
            self.cached_tokens = delta.cached_tokens

    def usage(self) -> common_pb2.Usage:
        return common_pb2.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_prompt_tokens=self.cached_tokens,
        )


@dataclass
class Metrics:
    registry: CollectorRegistry
    ttft: Histogram = field(init=False)
    tokens: Counter = field(init=False)
    rejected: Counter = field(init=False)
    calls: Counter = field(init=False)

    def __post_init__(self) -> None:
        self.ttft = Histogram(
            "agentmesh_inference_ttft_seconds",
            "Time to first token.",
            ["lane"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
            registry=self.registry,
        )
        self.tokens = Counter(
            "agentmesh_inference_tokens",
            "Tokens by lane and kind (prompt, cached, completion).",
            ["lane", "kind"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "agentmesh_inference_rejected",
            "Requests refused at a lane's concurrency cap.",
            ["lane"],
            registry=self.registry,
        )
        self.calls = Counter(
            "agentmesh_inference_tool_calls",
            "Emitted tool calls by lane and parse outcome.",
            ["lane", "outcome"],
            registry=self.registry,
        )

    def account(self, lane: str, result: GenResult) -> None:
        self.tokens.labels(lane, "prompt").inc(result.prompt_tokens)
        self.tokens.labels(lane, "cached").inc(result.cached_tokens)
        self.tokens.labels(lane, "completion").inc(result.completion_tokens)
        if result.ttft_s:
            self.ttft.labels(lane).observe(result.ttft_s)


@dataclass
class Prepared:
    """A routed, rendered, tokenized request ready for the engine."""

    lane: Lane
    choice: RouteChoice
    prompt_ids: list[int]
    params: GenParams


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
        self.metrics = Metrics(registry or CollectorRegistry())
        self.engines: dict[str, Engine] = {}
        self.lanes: dict[str, Lane] = {}
        # Live engine request ids -> lane (lets tests and operators see what is running).
        self.live_requests: dict[str, str] = {}
        keys: dict[str, str] = {}
        for spec in lanes_config.hosted():
            key = spec.engine_key()
            if key not in keys:
                engine_id = f"engine-{len(keys)}"
                keys[key] = engine_id
                self.engines[engine_id] = engine_factory(engine_id, spec.model, spec.engine_args)
            engine = self.engines[keys[key]]
            self.lanes[spec.name] = Lane(
                spec, engine, PromptRenderer(spec.template_path(), spec.few_shot)
            )
        self._on_state: LaneStateCallback | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self, on_state: LaneStateCallback | None = None) -> None:
        """Start engines one at a time (memory); lanes go SERVING as their engine does."""
        self._on_state = on_state
        for engine_id, engine in self.engines.items():
            lanes = [lane for lane in self.lanes.values() if lane.engine is engine]
            names = ", ".join(lane.name for lane in lanes)
            log.info("starting %s for lanes %s", engine_id, names)
            try:
                await engine.start()
            except Exception:
                log.exception("%s failed to start; lanes %s stay NOT_SERVING", engine_id, names)
                for lane in lanes:
                    await self._set_status(lane, LaneStatus.FAILED)
                continue
            for lane in lanes:
                await self._set_status(lane, LaneStatus.SERVING)
            log.info("%s ready (max_model_len %d)", engine_id, engine.max_model_len)
        if not any(lane.status is LaneStatus.SERVING for lane in self.lanes.values()):
            raise RuntimeError("no lane could start; see the errors above")

    async def watch(self, interval_s: float = 1.0) -> None:
        """Flip lanes to FAILED (and their health) as soon as an engine dies, even when idle."""
        while True:
            await asyncio.sleep(interval_s)
            for lane in self.lanes.values():
                if lane.status is LaneStatus.SERVING and lane.engine.errored:
                    log.error("engine of lane %s died", lane.name)
                    await self._set_status(lane, LaneStatus.FAILED)

    async def _set_status(self, lane: Lane, status: LaneStatus) -> None:
        lane.status = status
        if self._on_state is not None:
            await self._on_state(lane.name, status is LaneStatus.SERVING)

    async def _engine_died(self, engine: Engine) -> None:
        for lane in self.lanes.values():
            if lane.engine is engine and lane.status is not LaneStatus.FAILED:
                await self._set_status(lane, LaneStatus.FAILED)

    async def close(self) -> None:
        for engine in self.engines.values():
            try:
                await engine.shutdown()
            except Exception:
                log.exception("engine shutdown failed")

    # ---- request preparation ----------------------------------------------------------------

    def _route(self, selector: pb.LaneSelector) -> tuple[Lane, RouteChoice]:
        stage = _STAGES.get(selector.stage)
        choice = self.router.choose(selector.lane, stage, selector.escalation_level)
        lane = self.lanes[choice.lane.name]
        lane.check_serving()
        return lane, choice

    def _tokenize(self, lane: Lane, prompt: str, max_tokens: int) -> tuple[list[int], int]:
        ids = lane.engine.encode(prompt)
        limit = lane.engine.max_model_len
        if len(ids) >= limit:
            raise InvalidArgument(
                "messages",
                f"prompt is {len(ids)} tokens; lane {lane.name!r} holds {limit} tokens "
                "including the output",
                reason="PROMPT_TOO_LONG",
                metadata={"prompt_tokens": str(len(ids)), "max_model_len": str(limit)},
            )
        return ids, min(max_tokens, limit - len(ids))

    def _params(
        self, lane: Lane, sampling: pb.SamplingParams, default_max: int | None = None
    ) -> GenParams:
        d = lane.spec.sampling
        explicit_max = sampling.max_tokens if sampling.HasField("max_tokens") else 0
        return GenParams(
            max_tokens=explicit_max or default_max or d.max_tokens,
            temperature=sampling.temperature if sampling.HasField("temperature") else d.temperature,
            top_p=sampling.top_p if sampling.HasField("top_p") and sampling.top_p > 0 else d.top_p,
            seed=sampling.seed if sampling.HasField("seed") else None,
            stop=tuple(sampling.stop),
        )

    def _prepare_generate(self, req: pb.GenerateRequest | pb.StreamGenerateRequest) -> Prepared:
        messages = messages_to_dicts(req.messages)
        tools = parse_tools(req.tools)
        lane, choice = self._route(req.lane)
        params = self._params(lane, req.sampling)
        if params.temperature < 0:
            raise InvalidArgument("sampling.temperature", "must be >= 0")
        grammar = None
        if req.response_format.json_schema:
            grammar = self._response_grammar(req.response_format.json_schema)
        prompt = lane.renderer.render(messages, tools)
        ids, max_tokens = self._tokenize(lane, prompt, params.max_tokens)
        return Prepared(lane, choice, ids, replace(params, max_tokens=max_tokens, grammar=grammar))

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
            await self._engine_died(lane.engine)
            raise Unavailable(f"lane {lane.name!r} is not serving", reason="ENGINE_DEAD") from None
        except EngineRejected:
            log.warning("engine rejected a request on lane %s", lane.name, exc_info=True)
            raise InvalidArgument("request", "rejected by the engine's validation") from None
        finally:
            self.live_requests.pop(request_id, None)

    async def _collect(self, lane: Lane, ids: list[int], params: GenParams) -> GenResult:
        started = time.monotonic()
        result = GenResult(prompt_tokens=len(ids))
        parts: list[str] = []
        async for delta in self._deltas(lane, ids, params):
            result.add(delta, started)
            parts.append(delta.text)
        result.text = "".join(parts)
        self.metrics.account(lane.name, result)
        return result

    def _choice(self, lane: Lane, choice: RouteChoice) -> pb.LaneChoice:
        return pb.LaneChoice(lane=lane.name, model=lane.spec.model, reason=choice.reason)

    async def generate(self, req: pb.GenerateRequest) -> pb.GenerateResponse:
        started = time.monotonic()
        prep = self._prepare_generate(req)
        async with self._slot(prep.lane):
            result = await self._collect(prep.lane, prep.prompt_ids, prep.params)
        return pb.GenerateResponse(
            text=result.text,
            usage=result.usage(),
            finish_reason=_FINISH[result.finish],
            lane=self._choice(prep.lane, prep.choice),
            time_to_first_token=_duration(result.ttft_s),
            elapsed=_duration(time.monotonic() - started),
        )

    async def stream_generate(
        self, req: pb.StreamGenerateRequest
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        started = time.monotonic()
        prep = self._prepare_generate(req)
        lane = prep.lane
        async with self._slot(lane):
            result = GenResult(prompt_tokens=len(prep.prompt_ids))
            async for delta in self._deltas(lane, prep.prompt_ids, prep.params):
                result.add(delta, started)
                if delta.text:
                    yield pb.StreamGenerateResponse(text_delta=delta.text)
        self.metrics.account(lane.name, result)
        yield pb.StreamGenerateResponse(
            summary=pb.GenerationSummary(
                usage=result.usage(),
                finish_reason=_FINISH[result.finish],
                lane=self._choice(lane, prep.choice),
                time_to_first_token=_duration(result.ttft_s),
                elapsed=_duration(time.monotonic() - started),
            )
        )

    def _slot(self, lane: Lane) -> Any:
        if lane.in_flight >= lane.spec.max_concurrency:
            self.metrics.rejected.labels(lane.name).inc()
        return lane.slot()

    # ---- CallTools -------------------------------------------------------------------------

    async def call_tools(self, req: pb.CallToolsRequest) -> pb.CallToolsResponse:
        """The tool-call stage. Plans (every one on the same rendered prompt, so the prefix
        cache serves all generations of a request):

        - named + parallel (or any named on a llama3_json lane): one generation per named tool,
          each under that tool's grammar, submitted together so the engine batches them;
        - named, not parallel (hermes): one generation under "exactly these calls in order";
        - auto/required + parallel: a selection generation (a JSON list of tool names) then one
          generation per selected tool, together;
        - auto/required, not parallel: one generation allowing 1..max_calls calls (0 = free
          text too, for auto); llama3_json lanes allow exactly one call per generation.

        Unspecified mode means auto. Unconstrained decoding drops every grammar (to measure).
        """
        started = time.monotonic()
        messages = messages_to_dicts(req.messages)
        if not req.tools:
            raise InvalidArgument("tools", "at least one tool is required")
        tools = parse_tools(req.tools)
        lane, choice = self._route(req.lane)
        fmt = lane.spec.tool_call_format
        self.grammars.check_tools(tools, fmt)
        max_calls = req.max_calls or self.settings.default_max_tool_calls
        mode = req.tool_choice.mode or pb.ToolChoice.MODE_AUTO
        constrained = req.decoding != pb.DECODING_MODE_UNCONSTRAINED
        by_name = {t.name: t for t in tools}
        named: list[ToolDef] = []
        if mode == pb.ToolChoice.MODE_NAMED:
            if not req.tool_choice.names:
                raise InvalidArgument("tool_choice.names", "named mode needs at least one name")
            for i, name in enumerate(req.tool_choice.names):
                if name not in by_name:
                    raise InvalidArgument(
                        f"tool_choice.names[{i}]", f"tool {name!r} is not among the request's tools"
                    )
                named.append(by_name[name])
            if len(named) > max_calls:
                raise InvalidArgument(
                    "tool_choice.names", f"{len(named)} tools named but max_calls is {max_calls}"
                )
        prompt = lane.renderer.render(messages, tools, with_few_shot=True)
        per_call = lane.spec.sampling.tool_call_max_tokens
        base = self._params(lane, req.sampling, default_max=per_call)
        ids, _ = self._tokenize(lane, prompt, base.max_tokens)
        room = lane.engine.max_model_len - len(ids)

        def params(grammar: str | None, max_tokens: int) -> GenParams:
            return GenParams(
                max_tokens=max(1, min(max_tokens, room)),
                temperature=base.temperature,
                top_p=base.top_p,
                seed=base.seed,
                stop=base.stop,
                grammar=grammar if constrained else None,
            )

        results: list[GenResult] = []
        calls: list[ParsedCall] = []
        async with self._slot(lane):
            if named and (req.parallel or fmt is ToolCallFormat.LLAMA3_JSON):
                calls = await self._parallel(lane, ids, named, fmt, params, base, results)
            elif named:
                grammar = self.grammars.sequence(named, fmt)
                res = await self._collect(lane, ids, params(grammar, base.max_tokens * len(named)))
                results.append(res)
                calls = parse_calls(res.text, tools, fmt)
                for call, tool in zip(calls, named, strict=False):
                    if call.ok and call.name != tool.name:
                        call.ok, call.error = False, f"expected a call of {tool.name!r}"
            elif req.parallel:
                min_calls = 1 if mode == pb.ToolChoice.MODE_REQUIRED else 0
                sel_grammar = self.grammars.selection(tools, min_calls, max_calls)
                sel = await self._collect(lane, ids, params(sel_grammar, 16 * max_calls + 8))
                results.append(sel)
                picked = parse_selection(sel.text, tools, max_calls)
                if picked is None:
                    calls = [
                        ParsedCall("", "", "", False, "tool selection is not a JSON list", sel.text)
                    ]
                elif picked:
                    chosen = [by_name[n] for n in picked]
                    calls = await self._parallel(lane, ids, chosen, fmt, params, base, results)
            else:
                min_calls = 1 if mode == pb.ToolChoice.MODE_REQUIRED else 0
                grammar = self.grammars.calls(tools, fmt, min_calls, max_calls)
                budget = base.max_tokens * (1 if fmt is ToolCallFormat.LLAMA3_JSON else max_calls)
                res = await self._collect(lane, ids, params(grammar, budget))
                results.append(res)
                calls = parse_calls(res.text, tools, fmt)
                if not calls and min_calls:
                    calls = [ParsedCall("", "", "", False, "no tool call in the output", res.text)]
        calls = calls[:max_calls]
        for call in calls:
            self.metrics.calls.labels(lane.name, "ok" if call.ok else "failed").inc()
        usage = common_pb2.Usage(
            prompt_tokens=sum(r.prompt_tokens for r in results),
            completion_tokens=sum(r.completion_tokens for r in results),
            cached_prompt_tokens=sum(r.cached_tokens for r in results),
        )
        return pb.CallToolsResponse(
            calls=[_emitted(c) for c in calls],
            usage=usage,
            lane=self._choice(lane, choice),
            generations=len(results),
            elapsed=_duration(time.monotonic() - started),
        )

    async def _parallel(
        self,
        lane: Lane,
        ids: list[int],
        tools: Sequence[ToolDef],
        fmt: ToolCallFormat,
        params: Callable[[str | None, int], GenParams],
        base: GenParams,
        results: list[GenResult],
    ) -> list[ParsedCall]:
        """One generation per tool, all submitted at once so the engine batches them."""
        tasks = [
            asyncio.ensure_future(
                self._collect(lane, ids, params(self.grammars.single_tool(t, fmt), base.max_tokens))
            )
            for t in tools
        ]
        try:
            outs = await asyncio.gather(*tasks)
        except BaseException:
            # One failed (or we were cancelled): don't leave the siblings running in the engine.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

        calls: list[ParsedCall] = []
        for tool, res in zip(tools, outs, strict=True):
            results.append(res)
            parsed = parse_calls(res.text, tools, fmt, expected=tool.name)
            if not parsed:
                parsed = [
                    ParsedCall("", tool.name, "", False, "no tool call in the output", res.text)
                ]
            first = parsed[0]
            if not first.name:
                first.name = tool.name  # the call this generation was for, even if cut short
            calls.append(first)
        return calls

    # ---- ListLanes -------------------------------------------------------------------------

    def list_lanes(self) -> pb.ListLanesResponse:
        return pb.ListLanesResponse(
            preset=self.config.preset,
            lanes=[
                pb.LaneInfo(
                    name=lane.name,
                    model=lane.spec.model,
                    state=_LANE_STATE[lane.status],
                    tool_call_format=lane.spec.tool_call_format.value,
                    max_concurrency=lane.spec.max_concurrency,
                    in_flight=lane.in_flight,
                    max_model_len=lane.engine.max_model_len,
                    engine_id=lane.engine.engine_id,
                )
                for lane in self.lanes.values()
            ],
        )


def _emitted(call: ParsedCall) -> pb.EmittedToolCall:
    return pb.EmittedToolCall(
        call=common_pb2.ToolCall(
            id=call.id or new_call_id(), name=call.name, arguments_json=call.arguments_json
        ),
        outcome=pb.PARSE_OUTCOME_OK if call.ok else pb.PARSE_OUTCOME_FAILED,
        parse_error=call.error,
        raw_text=call.raw_text,
    )
