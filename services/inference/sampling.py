"""Sampling overrides: validated here (INVALID_ARGUMENT naming ``sampling.<field>``) before the
engine sees anything, then merged with the lane's defaults into :class:`GenParams`."""

from __future__ import annotations

import math

from agentmesh.inference.v1 import inference_pb2 as pb

from services.inference.config import SamplingDefaults
from services.inference.engine import GenParams
from shared.errors import InvalidArgument

MAX_TEMPERATURE = 2.0


def validate_sampling(sampling: pb.SamplingParams, max_model_len: int) -> None:
    """Reject overrides the engine would refuse (or misbehave on). How many stop strings and
    how long each is are the request guard's bounds (services/inference/request_checks.py)."""
    if sampling.HasField("temperature"):
        t = sampling.temperature
        if math.isnan(t) or not 0.0 <= t <= MAX_TEMPERATURE:
            raise InvalidArgument(
                "sampling.temperature", f"must be between 0 and {MAX_TEMPERATURE:g}"
            )
    if sampling.HasField("top_p"):
        p = sampling.top_p
        if math.isnan(p) or not 0.0 < p <= 1.0:
            raise InvalidArgument("sampling.top_p", "must be greater than 0 and at most 1")
    if sampling.HasField("max_tokens") and sampling.max_tokens > max_model_len:
        raise InvalidArgument(
            "sampling.max_tokens",
            f"{sampling.max_tokens} exceeds the lane's context of {max_model_len} tokens",
        )
    for i, stop in enumerate(sampling.stop):
        if not stop:
            raise InvalidArgument(f"sampling.stop[{i}]", "must not be empty")


def gen_params(
    defaults: SamplingDefaults, sampling: pb.SamplingParams, default_max: int | None = None
) -> GenParams:
    """The request's overrides over the lane's defaults (max_tokens 0 means the default)."""
    explicit_max = sampling.max_tokens if sampling.HasField("max_tokens") else 0
    return GenParams(
        max_tokens=explicit_max or default_max or defaults.max_tokens,
        temperature=sampling.temperature
        if sampling.HasField("temperature")
        else defaults.temperature,
        top_p=sampling.top_p if sampling.HasField("top_p") else defaults.top_p,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
        stream_interval=defaults.stream_interval,
    )
