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

from services.inference.config import InferenceSettings, LanesConfig, StageName, ToolCallFormat
from services.inference.continue_answer import ContinueOrAnswer, continue_or_answer
from services.inference.counting import count_all
from services.inference.dtype import DtypeChoice
from services.inference.engine import (
    Delta,
    Engine,
    EngineDead,
    EngineFactory,
    EngineRejected,
    GenerationFailed,
)
from services.inference.engine import GenParams as GenParams
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
from services.inference.tool_calls import (
    GrammarBuilder,
    ParsedCall,
    json_schema_grammar,
    parse_calls,
    parse_selection,
)
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

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._cpu, functools.partial(fn, *args)
        )

    # ---- request preparation ----------------------------------------------------------------

    async def _route(self, selector: pb.LaneSelector) -> tuple[Lane, RouteChoice]:
        stage = _STAGES.get(selector.stage)
        choice = self.router.choose(selector.lane, stage, selector.escalation_level)
        lane = self.lanes[choice.lane.name]
        await self.board.require_serving(lane)
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
        validate_sampling(sampling, lane.engine.max_model_len)
        return gen_params(lane.spec.sampling, sampling, default_max)

    def _render_tokenize(
        self,
        lane: Lane,
        messages: list[dict[str, Any]],
        tools: Sequence[ToolDef],
        max_tokens: int,
        with_few_shot: bool = False,
    ) -> tuple[list[int], int]:
        """Blocking: the prompt exactly as the engine gets it (run through _off_loop)."""
        prompt = lane.renderer.render(messages, tools, with_few_shot=with_few_shot)
        return self._tokenize(lane, prompt, max_tokens)

    async def _prepare_generate(
        self, req: pb.GenerateRequest | pb.StreamGenerateRequest
    ) -> Prepared:
        messages = messages_to_dicts(req.messages)
        tools = parse_tools(req.tools)
        lane, choice = await self._route(req.lane)
        splitter = None
        default_max = None
        if isinstance(req, pb.StreamGenerateRequest):
            splitter = continue_or_answer(
                req, lane.spec, tools, self.grammars, self.settings.default_max_tool_calls
            )
            if splitter is not None:
                default_max = splitter.default_max_tokens(lane.spec.sampling)
        params = self._params(lane, req.sampling, default_max)
        grammar = None
        if req.response_format.json_schema:
            grammar = self._response_grammar(req.response_format.json_schema)
        if splitter is not None:
            grammar = await self._off_loop(splitter.grammar, self.grammars)
        ids, max_tokens = await self._off_loop(
            self._render_tokenize, lane, messages, tools, params.max_tokens
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

    async def _collect(self, lane: Lane, ids: list[int], params: GenParams) -> GenResult:
        started = time.monotonic()
        result = GenResult(prompt_tokens=len(ids))
        parts: list[str] = []
        async for delta in self._deltas(lane, ids, params):
            result.add(delta, started)
            parts.append(delta.text)
        result.text = "".join(parts)
        self.metrics.account(lane.name, result, time.monotonic() - started)
        return result

    def _choice(self, lane: Lane, choice: RouteChoice) -> pb.LaneChoice:
        return pb.LaneChoice(lane=lane.name, model=lane.spec.model, reason=choice.reason)

    async def generate(self, req: pb.GenerateRequest) -> pb.GenerateResponse:
        started = time.monotonic()
        prep = await self._prepare_generate(req)
        async with self._slot(prep.lane):
            result = await self._collect(prep.lane, prep.prompt_ids, prep.params)
        return pb.GenerateResponse(
            text=result.text,
            usage=result.usage(),
            finish_reason=FINISH[result.finish],
            lane=self._choice(prep.lane, prep.choice),
            time_to_first_token=duration(result.ttft_s),
            elapsed=duration(time.monotonic() - started),
        )

    async def stream_generate(
        self, req: pb.StreamGenerateRequest
    ) -> AsyncGenerator[pb.StreamGenerateResponse, None]:
        started = time.monotonic()
        prep = await self._prepare_generate(req)
        lane, splitter = prep.lane, prep.splitter
        async with self._slot(lane):
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
                self._count_calls(lane, calls)
                yield pb.StreamGenerateResponse(
                    tool_calls=pb.ToolCallsEmitted(calls=[emitted(c) for c in calls])
                )
        yield pb.StreamGenerateResponse(
            summary=pb.GenerationSummary(
                usage=result.usage(),
                finish_reason=FINISH[result.finish],
                lane=self._choice(lane, prep.choice),
                time_to_first_token=duration(result.ttft_s),
                elapsed=duration(time.monotonic() - started),
            )
        )

    def _count_calls(self, lane: Lane, calls: Sequence[ParsedCall]) -> None:
        for call in calls:
            self.metrics.calls.labels(lane.name, "ok" if call.ok else "failed").inc()

    @contextlib.asynccontextmanager
    async def _slot(self, lane: Lane, sequences: int = 1) -> AsyncIterator[None]:
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
        lane, choice = await self._route(req.lane)
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
        per_call = lane.spec.sampling.tool_call_max_tokens
        base = self._params(lane, req.sampling, default_max=per_call)
        ids, _ = await self._off_loop(
            self._render_tokenize, lane, messages, tools, base.max_tokens, True
        )
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
        # Sequences this request may hold at once: one per named tool in parallel, the
        # selection plus up to max_calls argument generations, else one.
        if named and (req.parallel or fmt is ToolCallFormat.LLAMA3_JSON):
            sequences = len(named)
        elif req.parallel and not named:
            sequences = max_calls + 1
        else:
            sequences = 1
        async with self._slot(lane, sequences):
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
        self._count_calls(lane, calls)
        usage = common_pb2.Usage(
            prompt_tokens=sum(r.prompt_tokens for r in results),
            completion_tokens=sum(r.completion_tokens for r in results),
            cached_prompt_tokens=sum(r.cached_tokens for r in results),
        )
        return pb.CallToolsResponse(
            calls=[emitted(c) for c in calls],
            usage=usage,
            lane=self._choice(lane, choice),
            generations=len(results),
            elapsed=duration(time.monotonic() - started),
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
        lanes = []
        for lane in self.lanes.values():
            dtype = lane.engine.dtype_choice or DtypeChoice(
                str(lane.spec.engine_args.get("dtype", "auto")), "", "engine not started"
            )
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
                    dtype=dtype.dtype,
                    device=dtype.device,
                    dtype_reason=dtype.reason,
                )
            )
        return pb.ListLanesResponse(preset=self.config.preset, lanes=lanes)

    # ---- CountTokens -----------------------------------------------------------------------

    async def count_tokens(self, req: pb.CountTokensRequest) -> pb.CountTokensResponse:
        """Counts in the lane's tokenizer; no engine generation, no lane slot (it works while
        the lane is at its cap)."""
        messages = messages_to_dicts(req.messages) if req.messages else None
        tools = parse_tools(req.tools)
        lane, choice = await self._route(req.lane)

        def work() -> Any:
            prompt = None
            if messages is not None:
                prompt = lane.renderer.render(messages, tools)
            return count_all(lane.engine, prompt, req.messages, req.texts, req.truncate_texts_to)

        counts = await self._off_loop(work)
        return pb.CountTokensResponse(
            prompt_tokens=counts.prompt_tokens,
            max_model_len=lane.engine.max_model_len,
            lane=self._choice(lane, choice),
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
