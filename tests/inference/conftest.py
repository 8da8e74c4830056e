"""Inference test fixtures: the session-wide real server comes from tests/fixtures_inference.py
(registered in tests/conftest.py)."""
