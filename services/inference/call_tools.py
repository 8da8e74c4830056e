"""CallTools, the tool-call stage: which generations a request runs, under which grammars, and
the calls parsed from them. Every generation of a request starts from the same rendered
prompt, so the prefix cache serves them all.

A generation that emits exactly one call of a known tool (the parallel paths) does not decode
the call's fixed opener (``<tool_call>\\n{"name":"<tool>","arguments":`` in hermes): its token
ids are appended to the prompt's as prefill, and the grammar covers only the arguments and
the closer. The call is parsed from opener + output, exactly as if the model had written both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb

from services.inference.config import ToolCallFormat
from services.inference.engine import Engine, GenParams
from services.inference.lanes import Lane
from services.inference.prompt import ToolDef, messages_to_dicts, parse_tools
from services.inference.results import GenResult, duration, emitted
from services.inference.tool_calls import (
    CALL_SHAPES,
    BoundedMemo,
    ParsedCall,
    parse_calls,
    parse_selection,
)
from shared.errors import InvalidArgument

if TYPE_CHECKING:
    from services.inference.core import InferenceCore

# (grammar, max_tokens, prompt length) -> the generation's parameters.
ParamsFor = Callable[[str | None, int, int], GenParams]


class ToolCallStage:
    """CallTools over an :class:`InferenceCore` (routing, lane slots, tokenization and
    generation are the core's)."""

    def __init__(self, core: InferenceCore, opener_entries: int = 1024) -> None:
        self.core = core
        # (lane, tool) -> the token ids of the tool's call opener in the lane's format (the
        # lane fixes both the tokenizer and the format; the opener depends on the name only).
        self._openers: BoundedMemo[tuple[str, str], list[int]] = BoundedMemo(opener_entries)

    async def call_tools(self, req: pb.CallToolsRequest) -> pb.CallToolsResponse:
        """Plans:

        - named + parallel (or any named on a llama3_json lane): one generation per named tool,
          each prefilled with its call's opener and decoding the arguments under that tool's
          schema, submitted together so the engine batches them;
        - named, not parallel (hermes): one generation under "exactly these calls in order";
        - auto/required + parallel: a selection generation (a JSON list of tool names) then one
          generation per selected tool, together, prefilled like the named ones;
        - auto/required, not parallel: one generation allowing 1..max_calls calls (0 = free
          text too, for auto); llama3_json lanes allow exactly one call per generation.

        Unspecified mode means auto. Unconstrained decoding drops every grammar and the
        prefill (to measure what the model does alone).
        """
        core = self.core
        started = time.monotonic()
        messages = messages_to_dicts(req.messages)
        if not req.tools:
            raise InvalidArgument("tools", "at least one tool is required")
        tools = parse_tools(req.tools)
        lane, choice = await core.route(req.lane)
        fmt = lane.spec.tool_call_format
        core.grammars.check_tools(tools, fmt)
        max_calls = req.max_calls or core.settings.default_max_tool_calls
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
        base = core.lane_params(lane, req.sampling, default_max=per_call)
        ids, _ = await core.off_loop(
            core.render_tokenize, lane, messages, tools, base.max_tokens, True
        )

        def params(grammar: str | None, max_tokens: int, prompt_len: int = len(ids)) -> GenParams:
            return GenParams(
                max_tokens=max(1, min(max_tokens, lane.engine.max_model_len - prompt_len)),
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
        async with core.slot(lane, sequences):
            if named and (req.parallel or fmt is ToolCallFormat.LLAMA3_JSON):
                calls = await self._parallel(lane, ids, named, params, base, results, constrained)
            elif named:
                grammar = core.grammars.sequence(named, fmt)
                res = await core.collect(lane, ids, params(grammar, base.max_tokens * len(named)))
                results.append(res)
                calls = parse_calls(res.text, tools, fmt)
                for call, tool in zip(calls, named, strict=False):
                    if call.ok and call.name != tool.name:
                        call.ok, call.error = False, f"expected a call of {tool.name!r}"
            elif req.parallel:
                min_calls = 1 if mode == pb.ToolChoice.MODE_REQUIRED else 0
                sel_grammar = core.grammars.selection(tools, min_calls, max_calls)
                sel = await core.collect(lane, ids, params(sel_grammar, 16 * max_calls + 8))
                results.append(sel)
                picked = parse_selection(sel.text, tools, max_calls)
                if picked is None:
                    calls = [
                        ParsedCall("", "", "", False, "tool selection is not a JSON list", sel.text)
                    ]
                elif picked:
                    chosen = [by_name[n] for n in picked]
                    calls = await self._parallel(
                        lane, ids, chosen, params, base, results, constrained
                    )
            else:
                min_calls = 1 if mode == pb.ToolChoice.MODE_REQUIRED else 0
                grammar = core.grammars.calls(tools, fmt, min_calls, max_calls)
                budget = base.max_tokens * (1 if fmt is ToolCallFormat.LLAMA3_JSON else max_calls)
                res = await core.collect(lane, ids, params(grammar, budget))
                results.append(res)
                calls = parse_calls(res.text, tools, fmt)
                if not calls and min_calls:
                    calls = [ParsedCall("", "", "", False, "no tool call in the output", res.text)]
        calls = calls[:max_calls]
        core.count_calls(lane, calls)
        usage = common_pb2.Usage(
            prompt_tokens=sum(r.prompt_tokens for r in results),
            completion_tokens=sum(r.completion_tokens for r in results),
            cached_prompt_tokens=sum(r.cached_tokens for r in results),
        )
        return pb.CallToolsResponse(
            calls=[emitted(c) for c in calls],
            usage=usage,
            lane=core.lane_choice(lane, choice),
            generations=len(results),
            elapsed=duration(time.monotonic() - started),
        )

    async def _parallel(
        self,
        lane: Lane,
        ids: list[int],
        tools: Sequence[ToolDef],
        params: ParamsFor,
        base: GenParams,
        results: list[GenResult],
        constrained: bool,
    ) -> list[ParsedCall]:
        """One generation per tool, all submitted at once so the engine batches them.
        Constrained: each is prefilled with its call's opener (appended to the shared
        prompt's ids, which stay as they are for the prefix cache) and decodes the rest."""
        core = self.core
        fmt = lane.spec.tool_call_format
        shape = CALL_SHAPES[fmt]
        # Per tool: the opener text (prefilled), the prompt ids, the grammar.
        jobs: list[tuple[str, list[int], str | None]] = []
        if constrained:
            openers = await self._opener_ids(lane, [t.name for t in tools])
            for tool in tools:
                prompt = ids + openers[tool.name]
                core.prompt_room(lane, len(prompt))
                jobs.append((shape.opener(tool.name), prompt, core.grammars.arguments(tool, fmt)))
        else:
            jobs = [("", ids, None) for _ in tools]
        tasks = [
            asyncio.ensure_future(
                core.collect(lane, prompt, params(grammar, base.max_tokens, len(prompt)))
            )
            for _, prompt, grammar in jobs
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
        for tool, (opener, _, _), res in zip(tools, jobs, outs, strict=True):
            results.append(res)
            text = opener + res.text
            parsed = parse_calls(text, tools, fmt, expected=tool.name)
            if not parsed:
                parsed = [ParsedCall("", tool.name, "", False, "no tool call in the output", text)]
            first = parsed[0]
            if not first.name:
                first.name = tool.name  # the call this generation was for, even if cut short
            calls.append(first)
        return calls

    async def _opener_ids(self, lane: Lane, names: Sequence[str]) -> dict[str, list[int]]:
        """Token ids of each named tool's call opener in the lane's format, encoded on their
        own (off the event loop) and memoized per (lane, tool)."""
        found: dict[str, list[int]] = {}
        missing: list[str] = []
        for name in names:
            ids = self._openers.get((lane.name, name))
            if ids is None:
                missing.append(name)
            else:
                found[name] = ids
        if missing:
            shape = CALL_SHAPES[lane.spec.tool_call_format]
            texts = [shape.opener(name) for name in missing]
            encoded = await self.core.off_loop(_encode_all, lane.engine, texts)
            for name, ids in zip(missing, encoded, strict=True):
                found[name] = ids
                self._openers.put((lane.name, name), ids)
        return found


def _encode_all(engine: Engine, texts: Sequence[str]) -> list[list[int]]:
    """Blocking: each text's token ids on its own (run through off_loop)."""
    return [engine.encode(text) for text in texts]
