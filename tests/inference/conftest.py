"""Inference test fixtures: the session-wide real server (re-exported) and fake-engine servers."""

from __future__ import annotations

from tests.fixtures_inference import inference_server, inference_stack

__all__ = ["inference_server", "inference_stack"]
