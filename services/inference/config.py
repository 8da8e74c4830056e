"""Typed configuration of the inference service: settings, lane specs, presets.

The only module of the service that touches ``os.environ``: vLLM reads a few knobs (the
OpenMP thread binding on CPU, usage statistics, offline mode) from the environment, so
:func:`apply_engine_environment` and :func:`apply_cpu_threads` write them right before an
engine starts.
"""

from __future__ import annotations

import logging
import os
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.inference.cpu_threads import AUTO as AUTO_AFFINITY
from services.inference.cpu_threads import CpuThreadsChoice
from services.inference.memory_plan import (
    DevicePlan,
    DeviceSpec,
    ModelShape,
    check,
    plan_deployment,
)
from shared.config import RequestLimits, ServiceSettings

log = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parents[2] / "config" / "lanes"
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"

# Model references with this prefix are prepared locally (see model_prep); anything else is
# handed to vLLM as is (a Hugging Face id or a local folder).
EMBEDDED_PREFIX = "embedded:"
# Under the model cache: Hugging Face snapshots fetched by `agentmesh models pull`.
HF_CACHE_SUBDIR = "hf"


class ToolCallFormat(StrEnum):
    """How a lane's model writes tool calls natively."""

    HERMES = "hermes"  # <tool_call>{"name":..,"arguments":..}</tool_call>, several per generation
    LLAMA3_JSON = "llama3_json"  # one bare {"name":..,"parameters":..} object per generation


class StageName(StrEnum):
    PLAN = "plan"
    TOOL_CALL = "tool_call"
    COMPOSE = "compose"


class SamplingDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=256, ge=1)
    # Budget of one tool call's JSON in CallTools (the seed's "3 x 80 tokens").
    tool_call_max_tokens: int = Field(default=128, ge=8)
    # Streamed generations: output tokens vLLM gathers into one delta after the first
    # (vLLM's per-request stream_interval; 1 sends every token). The first token always
    # goes at once, so time to first token is unchanged; fewer, larger deltas cost less
    # host work per token in the engine's output processor, this service and the client.
    stream_interval: int = Field(default=1, ge=1, le=64)


class FewShotExemplar(BaseModel):
    """One worked example of correct tool use, rendered after the tool registry."""

    model_config = ConfigDict(extra="forbid")

    user: str
    tool_name: str
    arguments: dict[str, Any]


class LaneSpec(BaseModel):
    """A lane: a model with engine arguments, a tool-call format, a template and limits."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    # "embedded:<name>" (prepared locally) or a Hugging Face id / local folder.
    model: str
    # Passed to vLLM's AsyncEngineArgs verbatim. Lanes with equal (model, engine_args) share
    # one engine.
    engine_args: dict[str, Any] = Field(default_factory=dict)
    tool_call_format: ToolCallFormat = ToolCallFormat.HERMES
    # File name under services/inference/templates, or an absolute path.
    chat_template: str = "hermes_tools.jinja"
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    # RPCs in flight on this lane before new ones get RESOURCE_EXHAUSTED.
    max_concurrency: int = Field(default=16, ge=1)
    few_shot: list[FewShotExemplar] = Field(default_factory=list, max_length=3)
    # Automatic selection: the escalation level this lane answers (None: only when named).
    escalation_level: int | None = Field(default=None, ge=0)
    stages: list[StageName] = Field(
        default_factory=lambda: [StageName.PLAN, StageName.TOOL_CALL, StageName.COMPOSE]
    )
    # The model's shape for the per-device memory plan (GPU presets; see memory_plan.py).
    memory: ModelShape | None = None

    @property
    def max_model_len(self) -> int:
        return int(self.engine_args.get("max_model_len", 4096))

    def engine_key(self) -> str:
        """Lanes with the same key share an engine."""
        args = yaml.safe_dump(self.engine_args, sort_keys=True)
        return f"{self.model}\n{args}"

    def template_path(self) -> Path:
        path = Path(self.chat_template)
        return path if path.is_absolute() else TEMPLATES_DIR / path


class LanesConfig(BaseModel):
    """A preset file: every lane it defines and the subset this process hosts."""

    model_config = ConfigDict(extra="forbid")

    preset: str
    lanes: dict[str, LaneSpec]
    # Lanes this process serves; empty means all of them.
    hosted_lanes: list[str] = Field(default_factory=list)
    # GPU presets: the card, and the lanes each deployment (one process, its own GPUs) hosts.
    # Every deployment and this process's hosted set are checked by the memory plan at load.
    device: DeviceSpec | None = None
    deployments: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> LanesConfig:
        for name, lane in self.lanes.items():
            lane.name = name
        unknown = [n for n in self.hosted_lanes if n not in self.lanes]
        if unknown:
            raise ValueError(f"hosted_lanes names unknown lanes: {', '.join(unknown)}")
        if not self.hosted_lanes:
            self.hosted_lanes = list(self.lanes)
        for deployment, names in self.deployments.items():
            missing = [n for n in names if n not in self.lanes]
            if missing:
                raise ValueError(f"deployment {deployment} names unknown lanes: {missing}")
        if self.device is not None:
            layouts = {**self.deployments, "this process": self.hosted_lanes}
            check([self._plan(name, lanes) for name, lanes in layouts.items()])
        return self

    def _plan(self, deployment: str, names: list[str]) -> DevicePlan:
        """One engine per distinct (model, engine args) among ``names``."""
        assert self.device is not None
        engines: dict[str, LaneSpec] = {}
        for name in names:
            engines.setdefault(self.lanes[name].engine_key(), self.lanes[name])
        return plan_deployment(
            deployment,
            [(lane.name, lane.memory, lane.engine_args) for lane in engines.values()],
            self.device,
        )

    def hosted(self) -> list[LaneSpec]:
        return [self.lanes[n] for n in self.hosted_lanes]


class InferenceLimits(RequestLimits):
    """What one inference request may carry (checked before rendering or schema parsing)."""

    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_messages: int = Field(default=256, ge=1)
    max_message_chars: int = Field(default=256_000, ge=1)
    max_tools: int = Field(default=64, ge=1)
    max_tool_name_chars: int = Field(default=64, ge=1)
    max_tool_description_chars: int = Field(default=4096, ge=1)
    # A tool's parameters_json_schema and response_format.json_schema.
    max_schema_bytes: int = Field(default=64 * 1024, ge=64)
    max_schema_depth: int = Field(default=16, ge=2)
    # Tool calls replayed in the history (assistant messages' tool_calls).
    max_tool_calls_per_message: int = Field(default=32, ge=1)
    max_arguments_bytes: int = Field(default=64 * 1024, ge=64)
    max_arguments_depth: int = Field(default=32, ge=2)
    max_stop_sequences: int = Field(default=8, ge=0)
    max_stop_chars: int = Field(default=64, ge=1)
    max_named_tools: int = Field(default=32, ge=1)
    max_calls: int = Field(default=32, ge=1)
    # CountTokens texts.
    max_texts: int = Field(default=256, ge=1)
    max_text_chars: int = Field(default=256_000, ge=1)
    # CountTokens: text of messages, tools and texts together (the field that crosses it is
    # named).
    max_count_text_bytes: int = Field(default=1 << 20, ge=1024)


class InferenceSettings(ServiceSettings):
    """Settings of the inference service (env prefix ``AGENTMESH_INFERENCE_``)."""

    model_config = SettingsConfigDict(
        env_prefix="AGENTMESH_INFERENCE_", env_nested_delimiter="__", extra="ignore"
    )

    port: int = 50052
    metrics_port: int = 9102
    # A shipped preset under config/lanes/ ("embedded", "rtx4090") ...
    preset: str = "embedded"
    # ... or a lanes file of your own (wins over preset).
    lanes_file: Path | None = None
    # Overrides the preset's hosted_lanes (a JSON list in the environment).
    hosted_lanes: list[str] | None = None
    # Where prepared models live; default data_dir/models.
    model_cache_dir: Path | None = None
    # vLLM CPU build: KV cache size of each engine in GiB, or "auto": chosen at engine start
    # from the memory available and what the engine can fill (kv_cache.py). A lane's
    # engine_args.kv_cache_memory_bytes wins over both.
    cpu_kvcache_gib: float | Literal["auto"] = "auto"
    # vLLM CPU build: the cores the engine's OpenMP threads bind to (VLLM_CPU_OMP_THREADS_BIND):
    # "auto" (chosen at engine start, leaving cores to vLLM's scheduler and this service:
    # cpu_threads.py), "nobind", or a core list such as "0-13".
    cpu_omp_threads_bind: str = "auto"
    # The cores of this process (every thread): "auto" pins it, with vLLM's engine core, to
    # the allowed cores off the engine's OpenMP team once a CPU engine with a bound team
    # started (placement.py); a core list pins the whole process, engines included, at start;
    # empty leaves it alone.
    cpu_affinity: str = AUTO_AFFINITY
    cpu_affinity_keywords: ClassVar[frozenset[str]] = frozenset({AUTO_AFFINITY})
    # Calls returned by CallTools when the request does not say (the per-turn cap).
    default_max_tool_calls: int = Field(default=5, ge=1)
    # Threads that render templates and tokenize (off the event loop); the tokenizer is shared
    # with the engine's detokenizer and only read, so a few threads are safe.
    tokenize_threads: int = Field(default=2, ge=1, le=16)
    # Seconds an engine may take to start before warm-up fails.
    engine_start_timeout_s: float = 600.0
    # Don't send usage statistics anywhere (no network here anyway).
    disable_usage_stats: bool = True
    limits: InferenceLimits = Field(default_factory=InferenceLimits)

    @field_validator("cpu_kvcache_gib")
    @classmethod
    def _positive_kvcache(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and value <= 0:
            raise ValueError('cpu_kvcache_gib must be a positive number of GiB or "auto"')
        return value

    def kvcache_gib(self) -> float | None:
        """The explicit KV cache size in GiB; None for auto."""
        return None if self.cpu_kvcache_gib == "auto" else float(self.cpu_kvcache_gib)

    def models_dir(self) -> Path:
        return self.model_cache_dir or (self.data_dir / "models")

    def load_lanes(self) -> LanesConfig:
        path = self.lanes_file or (PRESETS_DIR / f"{self.preset}.yaml")
        if not path.is_file():
            raise FileNotFoundError(f"lanes file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"lanes file {path} must hold a mapping")
        # Top-level "x-..." keys hold YAML anchors (shared engine args), not settings.
        raw = {k: v for k, v in raw.items() if not str(k).startswith("x-")}
        raw.setdefault("preset", path.stem)
        config = LanesConfig.model_validate(raw)
        if self.hosted_lanes:
            config = LanesConfig.model_validate(
                {**config.model_dump(), "hosted_lanes": self.hosted_lanes}
            )
        return config


def hf_cache_dir(settings: InferenceSettings) -> Path:
    """Where `agentmesh models pull` puts Hugging Face weights and serving finds them."""
    return settings.models_dir() / HF_CACHE_SUBDIR


def apply_engine_environment(settings: InferenceSettings, device: Literal["cpu", "gpu"]) -> None:
    """Write the vLLM knobs that only exist as environment variables (before engine start).

    Each engine's KV cache size is its kv_cache_memory_bytes engine argument (kv_cache.py),
    so vLLM's legacy VLLM_CPU_KVCACHE_SPACE, which would override every engine's, is
    removed; the thread binding is written per engine start (:func:`apply_cpu_threads`).
    """
    if device == "cpu":
        stale = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        if stale is not None:
            log.warning(
                "ignoring VLLM_CPU_KVCACHE_SPACE=%s: set AGENTMESH_INFERENCE_CPU_KVCACHE_GIB "
                "(or kv_cache_memory_bytes in the lane file) instead",
                stale,
            )
    if settings.disable_usage_stats:
        os.environ["VLLM_NO_USAGE_STATS"] = "1"
        os.environ["DO_NOT_TRACK"] = "1"
    # Nothing may download weights at run time.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def apply_cpu_threads(choice: CpuThreadsChoice) -> None:
    """Write an engine's OpenMP binding where vLLM reads it (right before the engine starts:
    its engine core reads it when it spawns the worker). Nothing on CUDA."""
    if not choice.bind:
        return
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = choice.bind
    if choice.reserved is None:
        os.environ.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
    else:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(choice.reserved)
