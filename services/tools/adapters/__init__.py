"""Backends of the tools, each behind a small Protocol (see :mod:`.base`)."""
