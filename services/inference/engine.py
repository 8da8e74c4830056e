"""Engines behind a small protocol: vLLM's AsyncLLM in production, fakes in unit tests.

The rest of the service speaks only :class:`Engine` and plain dataclasses, so nothing but this
module imports vLLM (slow to import, and absent from some test environments).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from services.inference.config import apply_cpu_threads
from services.inference.engine_child import install_parent_death_signal
from services.inference.engine_setup import EngineSetup, choose_engine_setup
from services.inference.engine_stats import EngineStats
from services.inference.kv_cache import read_kv_shape
from services.inference.machine import MachineFacts, machine_facts
from services.inference.placement import ProcessPlacement

log = logging.getLogger(__name__)

FinishKind = Literal["stop", "length", "abort"]


class EngineDead(RuntimeError):
    """The engine can no longer serve (its core process died or it was shut down)."""


class EngineRejected(RuntimeError):
    """The engine refused a request as invalid (our validation should have caught it)."""


class GenerationFailed(RuntimeError):
    """One request failed inside a live engine (vLLM's recoverable ``EngineGenerateError``):
    the request is lost, the engine and its lanes keep serving."""


@dataclass(frozen=True)
class GenParams:
    """What one generation needs; mapped onto vLLM's SamplingParams by the engine."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # An EBNF grammar (xgrammar dialect) the whole output must match (JSON schemas are
    # compiled to one by the caller).
    grammar: str | None = None
    # Output tokens gathered into one delta after the first (vLLM's stream_interval);
    # None: the engine's default (every token).
    stream_interval: int | None = None


@dataclass
class Delta:
    """New output of one generation since the previous Delta."""

    text: str
    new_tokens: int
    finished: bool = False
    finish_reason: FinishKind | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0


class Engine(Protocol):
    """What the service needs from an inference engine."""

    engine_id: str
    max_model_len: int
    # The dtype, KV cache and thread binding chosen for the machine (each with its reason);
    # None until the engine started.
    setup: EngineSetup | None

    async def start(self) -> None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def generate(
        self, prompt_token_ids: list[int], params: GenParams, request_id: str
    ) -> AsyncIterator[Delta]: ...

    async def abort(self, request_id: str) -> None: ...

    def has_request(self, request_id: str) -> bool:
        """Whether the engine still tracks the request (tests check aborts with it)."""
        ...

    @property
    def errored(self) -> bool: ...

    async def shutdown(self) -> None: ...


@dataclass
class VllmEngine:
    """vLLM's AsyncLLM in this process (its engine core runs in a child process)."""

    engine_id: str
    model_ref: str
    engine_args: dict[str, Any]
    # Model reference -> what vLLM loads (prepares the embedded model once; may block).
    resolve: Callable[[str], str] = str
    start_timeout_s: float = 600.0
    # "cpu" or "cuda": where the engine runs (the dtype is chosen for it).
    device: str = "cpu"
    # Reads the machine's facts for the dtype, KV cache and thread choices (tests pass their
    # own).
    facts: Callable[[str], MachineFacts] = machine_facts
    # The service's KV cache size in GiB (None: auto) and OpenMP binding ("auto": chosen).
    kv_cache_gib: float | None = None
    cpu_threads_bind: str = "auto"
    # The service's cpu_affinity and what applies it around the start (shared by the
    # service's engines); None: this process and the engine core are left where they are.
    cpu_affinity: str = "auto"
    placement: ProcessPlacement | None = None
    # Where vLLM's stat logger writes engine state (None: no engine stats).
    stats: EngineStats | None = None
    max_model_len: int = field(init=False)
    # The scheduler's sequence cap, known once started (the admission budget's ceiling).
    max_num_seqs: int | None = field(init=False, default=None)
    setup: EngineSetup | None = field(init=False, default=None)
    # Seconds the start waits for a timed-out engine build to unwind after its core processes
    # were killed.
    unwind_timeout_s: float = 30.0
    _llm: Any = field(init=False, default=None)
    _tokenizer: Any = field(init=False, default=None)
    # The one thread that builds and shuts down the engine. The engine core's parent-death
    # signal fires when the thread that spawned it exits, so it lives as long as the engine.
    _owner: ThreadPoolExecutor | None = field(init=False, default=None)
    # Engine-core (and other multiprocessing) children killed after a failed or cancelled
    # start: none of them outlives it.
    killed_on_failed_start: list[int] = field(init=False, default_factory=list)
    # The engine-core processes the start spawned (this process's children; the worker is
    # theirs).
    engine_core_pids: list[int] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.max_model_len = int(self.engine_args.get("max_model_len", 4096))

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        model_path = await asyncio.to_thread(self.resolve, self.model_ref)
        if self.placement is not None:
            # Every allowed core again: the facts read them, the engine's worker inherits them.
            self.placement.before_start()
        facts = await asyncio.to_thread(self.facts, self.device)
        shape = await asyncio.to_thread(read_kv_shape, model_path)
        setup = choose_engine_setup(
            self.engine_args,
            facts,
            shape,
            self.kv_cache_gib,
            self.cpu_threads_bind,
            self.cpu_affinity,
        )
        for line in setup.describe():
            log.info("%s %s", self.engine_id, line)
        self.setup = setup
        args = {"disable_log_stats": True, **setup.engine_args(self.engine_args)}
        engine_args = AsyncEngineArgs(model=model_path, **args)
        # vLLM's engine core reads the binding from the environment when it spawns the worker.
        apply_cpu_threads(setup.cpu_threads)
        # The engine core dies with this process, however it dies (SIGKILL included).
        install_parent_death_signal()
        owner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.engine_id}-owner")
        self._owner = owner
        before = {p.pid for p in multiprocessing.active_children() if p.pid is not None}
        loop = asyncio.get_running_loop()
        # Building the engine blocks (it waits for the core process): keep the loop free for
        # health checks meanwhile.
        loggers = (
            [self.stats.logger_factory(self.model_ref, self.engine_id, self.device)]
            if self.stats is not None
            else None
        )
        build = loop.run_in_executor(
            owner, functools.partial(AsyncLLM.from_engine_args, engine_args, stat_loggers=loggers)
        )
        try:
            self._llm = await asyncio.wait_for(asyncio.shield(build), self.start_timeout_s)
        except BaseException:
            # Timed out, cancelled or failed: the engine core must not outlive the attempt.
            await self._abandon_start(build, before)
            raise
        self.engine_core_pids = [
            p.pid
            for p in multiprocessing.active_children()
            if p.pid is not None and p.pid not in before
        ]
        if self.placement is not None:
            # This process and the engine core off the OpenMP team (the worker, the engine
            # core's child, keeps its binding): placement.py.
            self.placement.after_start(setup.service_cores, self.engine_core_pids)
        self._tokenizer = self._llm.get_tokenizer()
        self.max_model_len = int(self._llm.model_config.max_model_len)
        self.max_num_seqs = int(self._llm.vllm_config.scheduler_config.max_num_seqs)
        cache = self._llm.vllm_config.cache_config
        self.setup = setup.started(int(cache.num_gpu_blocks or 0) * int(cache.block_size))

    async def _abandon_start(self, build: asyncio.Future[Any], before: set[int]) -> None:
        """Kill the processes a failed start spawned, let the build unwind, free its thread."""
        self._kill_new_children(before)
        with contextlib.suppress(BaseException):
            llm = await asyncio.wait_for(asyncio.shield(build), self.unwind_timeout_s)
            # It finished after all (a race with the timeout): shut it down properly.
            await asyncio.to_thread(llm.shutdown)
        self._kill_new_children(before)
        if self._owner is not None:
            self._owner.shutdown(wait=False, cancel_futures=True)
            self._owner = None

    def _kill_new_children(self, before: set[int]) -> None:
        for proc in multiprocessing.active_children():
            if proc.pid is not None and proc.pid not in before:
                log.warning(
                    "%s: killing engine process %d of a failed start", self.engine_id, proc.pid
                )
                with contextlib.suppress(ProcessLookupError, OSError):
                    proc.kill()
                proc.join(5)
                self.killed_on_failed_start.append(proc.pid)

    def _require(self) -> Any:
        if self._llm is None:
            raise EngineDead(f"engine {self.engine_id} is not started")
        if self.errored:
            raise EngineDead(f"engine {self.engine_id} is dead")
        return self._llm

    def encode(self, text: str) -> list[int]:
        self._require()
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False)
        return ids

    def decode(self, token_ids: list[int]) -> str:
        self._require()
        text: str = self._tokenizer.decode(token_ids, skip_special_tokens=False)
        return text

    def _sampling_params(self, params: GenParams) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        structured = None
        if params.grammar is not None:
            structured = StructuredOutputsParams(grammar=params.grammar)
        return SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stop=list(params.stop) or None,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA,
            stream_interval=params.stream_interval,
        )

    async def generate(
        self, prompt_token_ids: list[int], params: GenParams, request_id: str
    ) -> AsyncIterator[Delta]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        llm = self._require()
        sampling = self._sampling_params(params)
        stream = llm.generate({"prompt_token_ids": prompt_token_ids}, sampling, request_id)
        finished = False
        try:
            async for out in stream:
                completion = out.outputs[0] if out.outputs else None
                finished = bool(out.finished)
                reason = completion.finish_reason if completion is not None else None
                yield Delta(
                    text=completion.text if completion is not None else "",
                    new_tokens=len(completion.token_ids) if completion is not None else 0,
                    finished=finished,
                    finish_reason=_finish_kind(reason) if finished else None,
                    prompt_tokens=len(out.prompt_token_ids or prompt_token_ids),
                    cached_tokens=int(out.num_cached_tokens or 0),
                )
        except EngineDeadError as exc:
            raise EngineDead(f"engine {self.engine_id} died") from exc
        except EngineGenerateError as exc:
            # Recoverable in vLLM's terms: only a dead engine makes it fatal.
            if self.errored:
                raise EngineDead(f"engine {self.engine_id} died") from exc
            raise GenerationFailed(f"engine {self.engine_id} failed a request") from exc
        except (VLLMClientError, ValueError) as exc:
            raise EngineRejected(str(exc)) from exc
        finally:
            if not finished:
                # Client cancel / deadline: closing vLLM's generator already aborts; this makes
                # it explicit for every other early exit too.
                await stream.aclose()
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None and not self.errored:
            await self._llm.abort(request_id)

    def has_request(self, request_id: str) -> bool:
        if self._llm is None:
            return False
        return request_id in self._llm.output_processor.external_req_ids

    def unfinished_requests(self) -> int:
        """Requests the engine still tracks (0 when idle; what the soak checks at the end)."""
        if self._llm is None:
            return 0
        return int(self._llm.output_processor.get_num_unfinished_requests())

    @property
    def errored(self) -> bool:
        return self._llm is not None and bool(self._llm.errored)

    async def shutdown(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            # Stop the output handler first, or it reports the core's exit as a crash.
            handler = getattr(llm, "output_handler", None)
            if handler is not None and not handler.done():
                handler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await handler
            owner, self._owner = self._owner, None
            if owner is None:
                await asyncio.to_thread(llm.shutdown)
                return
            try:
                await asyncio.get_running_loop().run_in_executor(owner, llm.shutdown)
            finally:
                owner.shutdown(wait=False)


def _finish_kind(reason: str | None) -> FinishKind:
    if reason == "length":
        return "length"
    if reason == "abort":
        return "abort"
    return "stop"


EngineFactory = Callable[[str, str, dict[str, Any]], Engine]
"""(engine_id, model_ref, engine_args) -> an unstarted engine."""


def vllm_engine_factory(
    resolve: Callable[[str], str],
    start_timeout_s: float,
    device: str = "cpu",
    stats: EngineStats | None = None,
    kv_cache_gib: float | None = None,
    cpu_threads_bind: str = "auto",
    cpu_affinity: str = "auto",
    placement: ProcessPlacement | None = None,
) -> EngineFactory:
    def make(engine_id: str, model_ref: str, engine_args: dict[str, Any]) -> Engine:
        return VllmEngine(
            engine_id,
            model_ref,
            engine_args,
            resolve=resolve,
            start_timeout_s=start_timeout_s,
            device=device,
            stats=stats,
            kv_cache_gib=kv_cache_gib,
            cpu_threads_bind=cpu_threads_bind,
            cpu_affinity=cpu_affinity,
            placement=placement,
        )

    return make
