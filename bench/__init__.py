"""Benchmarks: reproducible, side by side in one run, printing ratios. Never timed tests."""
