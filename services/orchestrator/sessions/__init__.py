"""Durable session state behind the SessionStore protocol (SQL and Redis backends)."""
